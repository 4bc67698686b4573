//! The broker: shared state of one node and the publish path.
//!
//! A publish is resolved to receivers (the owner of a push topic, or the router's matches),
//! stored in each receiver's outbox when its QoS is above 0, and only then hinted to the
//! receiver's live connection through its mailbox. `publish` returns after the stores, so
//! the caller's PUBACK means "in the outbox" (design.md, store before ack).
//!
//! The client table maps a client id to its live connection (if any) and, for a persistent
//! session that is offline, the protocol state that must survive it (QoS 2 packet ids).
//! Takeover waits for the old connection to finish so that its will and session state are
//! settled before the new connection starts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::codec::{min_qos, Qos};
use crate::config::Config;
use crate::mailbox::{Delivery, Mailbox};
use crate::metrics;
use crate::outbox::{now_ms, Enqueued, Limits, MemoryOutbox, Message, Store, StoreError};
use crate::router::{ClientId, Router};
use crate::topic::PushTemplate;

/// Protocol state of a persistent session that outlives its connection.
#[derive(Debug, Default)]
pub struct SessionData {
    /// Inbound QoS 2 packet ids answered with PUBREC, waiting for PUBREL.
    pub incoming_qos2: HashSet<u16>,
    /// Outbound QoS 2 packet ids released with PUBREL, waiting for PUBCOMP.
    pub awaiting_pubcomp: Vec<u16>,
}

struct ClientState {
    conn: Option<Arc<Mailbox>>,
    conn_id: u64,
    /// The last connection asked for a persistent session.
    persistent: bool,
    saved: Option<SessionData>,
}

/// What a new connection starts with.
pub struct Attached {
    pub conn_id: u64,
    pub session_present: bool,
    pub data: SessionData,
    /// Outbox entries at or below this sequence number may have been sent before: DUP = 1.
    pub sent_watermark: u64,
}

pub struct Broker {
    pub config: Config,
    pub router: Router,
    pub store: Store,
    push: Option<PushTemplate>,
    clients: DashMap<ClientId, ClientState>,
    next_conn_id: AtomicU64,
    incarnation: u64,
}

/// How long a new connection waits for the one it replaces to finish its cleanup.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

impl Broker {
    pub fn new(config: Config) -> Broker {
        let limits = Limits {
            max_queued: config.session.max_queued_messages,
            overflow: config.session.overflow,
        };
        Broker {
            push: config
                .push
                .enabled
                .then(|| PushTemplate::new(&config.push.topic_template)),
            store: Store::Memory(MemoryOutbox::new(limits)),
            router: Router::default(),
            clients: DashMap::new(),
            next_conn_id: AtomicU64::new(1),
            incarnation: now_ms() ^ u64::from(std::process::id()) << 40,
            config,
        }
    }

    /// A unique id for a client that connected with an empty one.
    pub fn assign_client_id(&self) -> String {
        let n = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        format!("herald-{:x}-{n}", self.incarnation)
    }

    pub fn push_topic(&self, client: &str) -> Option<String> {
        self.push.as_ref().map(|p| p.topic_for(client))
    }

    /// Registers a new connection for `client`, taking over any older one.
    pub async fn attach(
        &self,
        client: &ClientId,
        clean: bool,
        mailbox: Arc<Mailbox>,
    ) -> Result<Attached, StoreError> {
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let old = {
            let mut e = self.clients.entry(client.clone()).or_insert(ClientState {
                conn: None,
                conn_id: 0,
                persistent: false,
                saved: None,
            });
            e.conn_id = conn_id;
            e.conn.replace(mailbox)
        };
        if let Some(old) = old {
            metrics::takeover();
            old.kick();
            if tokio::time::timeout(TAKEOVER_WAIT, old.wait_done())
                .await
                .is_err()
            {
                tracing::warn!(client = %client, "previous connection did not finish in time");
            }
        }
        let (existed, saved) = match self.clients.get_mut(client) {
            Some(mut e) => {
                let existed = e.persistent;
                e.persistent = !clean;
                (existed, e.saved.take())
            }
            None => (false, None),
        };
        let stored = async {
            let watermark = self.store.attach(client).await?;
            if clean {
                self.router.unsubscribe_all(client);
                if let Err(e) = self.store.clear(client).await {
                    self.store.detach(client).await;
                    return Err(e);
                }
            }
            Ok(watermark)
        };
        let sent_watermark = match stored.await {
            Ok(w) => w,
            Err(e) => {
                // Undo the registration so that the refused client leaves no trace.
                if let Some(mut st) = self.clients.get_mut(client) {
                    if st.conn_id == conn_id {
                        st.conn = None;
                        st.persistent = existed;
                        st.saved = saved;
                    }
                }
                self.clients
                    .remove_if(client, |_, st| st.conn_id == conn_id && !st.persistent);
                return Err(e);
            }
        };
        Ok(Attached {
            conn_id,
            session_present: !clean && existed,
            data: if clean {
                SessionData::default()
            } else {
                saved.unwrap_or_default()
            },
            sent_watermark,
        })
    }

    /// A connection ended. Only the connection that still owns the client id removes state.
    pub async fn detach(&self, client: &ClientId, conn_id: u64, clean: bool, data: SessionData) {
        self.store.detach(client).await;
        let mut owner = false;
        if let Some(mut e) = self.clients.get_mut(client) {
            if e.conn_id == conn_id {
                owner = true;
                e.conn = None;
            }
            if !clean {
                e.saved = Some(data);
            }
        }
        if owner && clean {
            let removed = self
                .clients
                .remove_if(client, |_, e| e.conn_id == conn_id && e.conn.is_none());
            if removed.is_some() {
                self.router.unsubscribe_all(client);
                if let Err(e) = self.store.clear(client).await {
                    tracing::warn!(client = %client, error = %e, "could not clear outbox");
                }
            }
        }
    }

    fn mailbox(&self, client: &str) -> Option<Arc<Mailbox>> {
        self.clients.get(client).and_then(|e| e.conn.clone())
    }

    /// SUBSCRIBE for one filter: the granted QoS, or 0x80.
    pub fn subscribe(&self, client: &ClientId, filter: &str, qos: Qos) -> u8 {
        if let Some(owner) = self.push.as_ref().and_then(|p| p.owner_of_filter(filter)) {
            // The push subscription is implicit; a client may name its own, never another's.
            return if owner == &**client {
                min_qos(qos, Qos::AtLeastOnce) as u8
            } else {
                0x80
            };
        }
        self.router.subscribe(client, filter, qos);
        qos as u8
    }

    pub fn unsubscribe(&self, client: &ClientId, filter: &str) {
        self.router.unsubscribe(client, filter);
    }

    /// Sends the retained messages matching a new subscription, with RETAIN set.
    pub async fn send_retained(
        &self,
        client: &ClientId,
        filter: &str,
        granted: Qos,
    ) -> Result<(), StoreError> {
        for msg in self.router.retained_for(filter, now_ms()) {
            let qos = min_qos(msg.qos, granted);
            self.deliver(client, qos, &msg).await?;
        }
        Ok(())
    }

    /// Routes and stores a message from a client (or a will). Returns once every receiver's
    /// outbox holds it; an error means some outbox may not, and the publisher must not be
    /// acknowledged.
    pub async fn publish(&self, mut msg: Message) -> Result<(), StoreError> {
        let ttl = self.config.session.message_ttl;
        if !ttl.is_zero() && msg.qos != Qos::AtMostOnce {
            msg.expires_at = now_ms() + ttl.as_millis() as u64;
        }
        if let Some(owner) = self.push.as_ref().and_then(|p| p.client_of(&msg.topic)) {
            // Push topics are never retained: a retained copy would be readable by wildcard
            // subscribers, which would break device isolation.
            msg.retain = false;
            let qos = min_qos(msg.qos, Qos::AtLeastOnce);
            let owner: ClientId = Arc::from(owner);
            return self.deliver(&owner, qos, &Arc::new(msg)).await;
        }
        if msg.retain {
            self.router.retain(&Arc::new(msg.clone()));
            msg.retain = false;
        }
        let msg = Arc::new(msg);
        let mut receivers = HashMap::new();
        self.router.matches(&msg.topic, &mut receivers);
        if receivers.is_empty() {
            metrics::dropped(metrics::Drop::NoReceiver);
        }
        let mut result = Ok(());
        for (client, sub_qos) in receivers {
            if let Err(e) = self.deliver(&client, min_qos(msg.qos, sub_qos), &msg).await {
                result = Err(e);
            }
        }
        result
    }

    /// Hands one message to one client: stored first unless QoS 0, then hinted.
    pub async fn deliver(
        &self,
        client: &ClientId,
        qos: Qos,
        msg: &Arc<Message>,
    ) -> Result<(), StoreError> {
        if qos == Qos::AtMostOnce {
            if let Some(mb) = self.mailbox(client) {
                mb.push(Delivery::Direct(msg.clone()));
            }
            return Ok(());
        }
        let seq = match self.store.enqueue(client, qos, msg).await {
            Ok(Enqueued::Stored(seq)) => seq,
            Ok(Enqueued::Rejected) => return Ok(()),
            Err(e) => {
                metrics::store_error();
                return Err(e);
            }
        };
        // Looked up after the store so that a connection registered meanwhile either sees
        // the entry in its first outbox read or gets this hint.
        if let Some(mb) = self.mailbox(client) {
            mb.push(Delivery::Stored {
                seq,
                qos,
                msg: msg.clone(),
            });
        }
        Ok(())
    }

    pub fn is_connected(&self, client: &str) -> bool {
        self.mailbox(client).is_some()
    }
}
