//! The route table: where each client is connected (`herald:route:{cid}`, node / inc /
//! epoch) and its fencing counter (`herald:epoch:{cid}`). "Route" in Herald means only
//! this: a client's entry in this table.

use crate::message::ClientId;
use crate::redis::keys::{self, Client};
use crate::redis::StoreError;

use super::Cluster;

/// Where a client was last connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node: String,
    pub inc: u64,
    pub epoch: u64,
}

/// The result of registering a new connection in the route table.
pub struct Claim {
    pub epoch: u64,
    pub previous: Option<Route>,
}

fn parse(node: Option<String>, inc: Option<String>, epoch: Option<String>) -> Option<Route> {
    let node = node.filter(|n| !n.is_empty())?;
    Some(Route {
        node,
        inc: inc.and_then(|i| i.parse().ok()).unwrap_or(0),
        epoch: epoch.and_then(|e| e.parse().ok()).unwrap_or(0),
    })
}

/// The fields of a route, as HMGET returns them.
type Row = (Option<String>, Option<String>, Option<String>);

fn hmget(client: &str) -> redis::Cmd {
    let mut c = redis::cmd("HMGET");
    c.arg(keys::client(Client::Route, client))
        .arg("node")
        .arg("inc")
        .arg("epoch");
    c
}

impl Cluster {
    /// CONNECT: bump the client's epoch and make this node its route, in one step
    /// (`scripts::CLAIM`).
    pub async fn claim(&self, client: &str) -> Result<Claim, StoreError> {
        let mut call = self.redis.scripts().claim.prepare_invoke();
        call.key(keys::client(Client::Route, client))
            .key(keys::client(Client::Epoch, client))
            .arg(&*self.id)
            .arg(self.inc.to_string());
        let (epoch, node, inc, old_epoch): (u64, String, String, String) =
            self.redis.invoke(&call).await?;
        Ok(Claim {
            epoch,
            previous: parse(Some(node), Some(inc), Some(old_epoch)),
        })
    }

    /// A connection ended: remove its route if it is still the current one, and with
    /// `clear` the client's session state too, in the same step (`scripts::RELEASE`).
    /// True if the route was removed.
    pub async fn release(&self, client: &str, epoch: u64, clear: bool) -> Result<bool, StoreError> {
        let mut call = self.redis.scripts().release.prepare_invoke();
        call.key(keys::client(Client::Route, client))
            .key(keys::client(Client::Epoch, client));
        for k in keys::session_state(client) {
            call.key(k);
        }
        call.arg(&*self.id)
            .arg(self.inc.to_string())
            .arg(epoch.to_string())
            .arg(if clear { "1" } else { "0" });
        let released: u8 = self.redis.invoke(&call).await?;
        Ok(released == 1)
    }

    pub async fn route(&self, client: &str) -> Result<Option<Route>, StoreError> {
        let (node, inc, epoch): Row = self.redis.query(&hmget(client)).await?;
        Ok(parse(node, inc, epoch))
    }

    /// Routes of many clients, in one round trip (each client's key is in its own slot).
    pub async fn routes(&self, clients: &[ClientId]) -> Result<Vec<Option<Route>>, StoreError> {
        let cmds: Vec<redis::Cmd> = clients.iter().map(|c| hmget(c)).collect();
        let rows: Vec<Row> = self.redis.query_each(&cmds).await?;
        Ok(rows.into_iter().map(|(n, i, e)| parse(n, i, e)).collect())
    }
}
