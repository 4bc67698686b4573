//! Herald: an MQTT 3.1.1 push broker.
//!
//! Modules, in the order a message meets them:
//! - `server`: listeners (TCP, TLS, WebSocket, WebSocket over TLS), accept loops, shutdown.
//! - `transport`: TLS (rustls) and WebSocket streams under the same session code.
//! - `session`: one connection's protocol state machine (CONNECT to close).
//! - `auth`: who may connect as which client id (password file, device tokens, client
//!   certificates) and what each may publish and read (ACL).
//! - `codec`: MQTT 3.1.1 wire format (wraps `mqttbytes`, adds the strict checks).
//! - `message`: the shared types (message, QoS, client id, packet ids, the envelope).
//! - `broker`: the node's shared state; resolves receivers and stores before acking.
//! - `topic`: topic names, filters, the push-topic template.
//! - `subscriptions`, `retained`: who gets an ordinary-topic message, and the retained
//!   messages a new subscription gets.
//! - `outbox`: the per-client store of unacknowledged QoS 1/2 messages (source of truth).
//! - `redis`: everything that talks to Redis: key schema, scripts, connection, health.
//! - `mailbox`: hands live messages (hints) from the broker to a connection task;
//!   `keepalive` files connections by deadline, so idle ones cost no periodic work.
//! - `cluster`: many nodes over one Redis: route table, node registry, interest,
//!   forwarding, the sweep, the node-to-node link.
//! - `descriptors`: the descriptor limit, the connection capacity it allows, EMFILE.
//! - `memguard`: slows publishers, then refuses connections, as RSS nears `server.max_memory`.
//! - `config`, `metrics`: operations; `lograte` keeps the lines a remote peer can cause at
//!   will (malformed packets, refused logins) to a few per reason per 10 s.
//! - `http_api`: the backend HTTP API (`http.listen`): pushes by HTTP through the same
//!   `Broker::publish` as an MQTT PUBLISH to the push topic, and a device's status;
//!   `broadcast`: a live-only message to every connected device, never stored;
//!   `receipts`: what became of a message pushed with `receipt=true` (records, webhook).
//! - `admin`, `readiness`: the operations listener (`/metrics`, `/healthz`, `/readyz`,
//!   `POST /admin/drain`) and what decides readiness; `server` runs the drain.
//!
//! Path of a QoS 1 push: a backend's PUBLISH to `push/dev42` is decoded by `codec` in the
//! backend's `session`, which calls `Broker::publish`. The broker sees a push topic (no
//! subscription table), appends the message to dev42's `outbox`, then drops a hint into dev42's
//! `mailbox` if it is online; only after the append does the backend's session write PUBACK.
//! dev42's session wakes, takes the hint (or reads the outbox, after a reconnect or a dropped
//! hint), writes PUBLISH with packet id `seq % 65535 + 1`, and deletes the outbox entry when
//! dev42's PUBACK arrives.
//!
//! The whole path (one node and two), Redis keys, tasks, bounds, failures: ARCHITECTURE.md.

pub mod admin;
pub mod auth;
pub mod broadcast;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod descriptors;
pub mod http_api;
pub mod keepalive;
pub mod lograte;
pub mod mailbox;
pub mod memguard;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod readiness;
pub mod receipts;
pub mod redis;
pub mod retained;
pub mod server;
pub mod session;
pub mod subscriptions;
pub mod topic;
pub mod transport;

pub use config::Config;
pub use server::Server;
