//! Where the Redis connection comes from: one address (`redis://`, `rediss://` with TLS,
//! `unix://`), or the current master of a Sentinel set
//! (`redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`), looked up again
//! after every outage so that a failover is followed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::CALL_TIMEOUT;

/// The connection in use and how to find it again.
pub(super) struct Endpoint {
    sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    /// For the hot path's own connections to a `rediss://` server.
    pub(super) tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    current: parking_lot::RwLock<Current>,
    /// Bumped when the store comes back after an outage: the hot-path connections (`Hot`)
    /// are made again then, to whatever server `current` names.
    epoch: AtomicU64,
}

/// The server in use: a connection manager for the cold commands, and its address and
/// settings for the hot path's own connections.
struct Current {
    manager: ConnectionManager,
    info: redis::ConnectionInfo,
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

async fn current(client: redis::Client) -> redis::RedisResult<Current> {
    let info = client.get_connection_info().clone();
    let manager = match tokio::time::timeout(
        CALL_TIMEOUT,
        ConnectionManager::new_with_config(client, manager_config()),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        }
    };
    Ok(Current { manager, info })
}

impl Endpoint {
    pub(super) async fn open(
        url: &str,
        ca: Option<&std::path::Path>,
    ) -> redis::RedisResult<Endpoint> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            let (client, tls) = if url.starts_with("rediss://") {
                redis_tls(url, ca)?
            } else {
                (redis::Client::open(url)?, None)
            };
            let current = current(client).await?;
            return Ok(Endpoint {
                sentinel: None,
                tls,
                current: parking_lot::RwLock::new(current),
                epoch: AtomicU64::new(0),
            });
        };
        let mut sentinel = sentinel_client(rest)?;
        let current = current(sentinel.async_get_client().await?).await?;
        Ok(Endpoint {
            sentinel: Some(tokio::sync::Mutex::new(sentinel)),
            tls: None,
            current: parking_lot::RwLock::new(current),
            epoch: AtomicU64::new(0),
        })
    }

    pub(super) fn conn(&self) -> ConnectionManager {
        self.current.read().manager.clone()
    }

    pub(super) fn info(&self) -> redis::ConnectionInfo {
        self.current.read().info.clone()
    }

    /// Which connection generation is current (see `reconnected`).
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The store came back after an outage: hot connections are made again, to whatever
    /// server `current` names now.
    pub(super) fn reconnected(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Checks a `store.redis_url` without connecting.
    pub(super) fn validate(url: &str) -> Result<(), String> {
        let r = match url.strip_prefix("redis+sentinel://") {
            Some(rest) => sentinel_client(rest).map(|_| ()),
            None => redis::Client::open(url).map(|_| ()),
        };
        r.map_err(|e| format!("{}: {e}", redacted_url(url)))
    }

    /// After an outage: with Sentinel, connect to whoever is master now. A plain URL's
    /// connection manager reconnects by itself.
    pub(super) async fn refresh(&self) -> redis::RedisResult<()> {
        if let Some(sentinel) = &self.sentinel {
            let client = sentinel.lock().await.async_get_client().await?;
            let fresh = current(client).await?;
            *self.current.write() = fresh;
        }
        Ok(())
    }
}

/// A `rediss://` client for the cold commands and the same trust for the hot path: the CA in
/// `store.redis_ca` (managed Redis with a private CA) or the system's roots.
fn redis_tls(
    url: &str,
    ca: Option<&std::path::Path>,
) -> redis::RedisResult<(
    redis::Client,
    Option<Arc<tokio_rustls::rustls::ClientConfig>>,
)> {
    let fail = |e: String| redis::RedisError::from(std::io::Error::other(e));
    let (client, config) = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("store.redis_ca: {}: {e}", path.display())))?;
            let client = redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )?;
            let config = crate::transport::client_config(path, None)
                .map_err(|e| fail(format!("store.redis_ca: {e}")))?;
            (client, config)
        }
        None => {
            let client = redis::Client::open(url)?;
            let config = system_roots().map_err(fail)?;
            (client, config)
        }
    };
    Ok((client, Some(config)))
}

/// A client config that trusts the system's roots (a managed Redis with a public CA).
fn system_roots() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("rediss://: no trusted roots found on this system; set store.redis_ca".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Userinfo ends at the last '@' before the path; a password may itself hold '@'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

/// `[:password@]host:port[,host:port...]/service[/db]` after the scheme.
fn sentinel_client(spec: &str) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
    let invalid = |why: &str| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "bad sentinel URL",
            why.to_string(),
        ))
    };
    let (auth, rest) = match spec.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, spec),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("missing /service"))?;
    let mut path = path.split('/');
    let service = path
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("missing service name"))?;
    let db: i64 = match path.next() {
        Some(d) if !d.is_empty() => d.parse().map_err(|_| invalid("db is not a number"))?,
        _ => 0,
    };
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut redis_info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(password) = auth.and_then(|a| a.strip_prefix(':').or(Some(a))) {
        if !password.is_empty() {
            redis_info = redis_info.set_password(password);
        }
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
    SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
}

#[cfg(test)]
mod url_tests {
    use super::redacted_url;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted_url("redis://:pw@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://u:p@ss@h:1/2"),
            "rediss://u:***@h:1/2"
        );
        assert_eq!(redacted_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(
            redacted_url("redis+sentinel://:pw@a:1,b:2/m/0"),
            "redis+sentinel://:***@a:1,b:2/m/0"
        );
    }
}
