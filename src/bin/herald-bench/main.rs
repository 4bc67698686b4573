//! herald-bench: load generator for MQTT 3.1.1 brokers (Herald, Mosquitto, any other).
//!
//! It speaks MQTT itself (see `client`) so that the load generator is never the bottleneck,
//! and drives one broker at HOST:PORT through the scenarios of issue 3:
//!
//! - `idle`: N clients connect (keepalive 60 s, clean session, each subscribed to its own
//!   push topic), then sit idle: connect rate, broker RSS per connection, broker CPU.
//! - `push`: devices online with persistent sessions, PUBACKing; one publisher sends QoS 1
//!   round-robin to push/<id> with a window of unacknowledged messages: delivered msgs/s and
//!   end-to-end latency.
//! - `push-rate`: the same at a fixed offered rate: latency.
//! - `qos0`: 1 and 4 publisher-subscriber pairs, QoS 0, bounded lag: msgs/s.
//! - `drain`: devices go offline, 10 QoS 1 messages each are published, all reconnect: time
//!   until every message has arrived.
//! - `churn` (issue 12): the qos0 pairs while `--churn` clients SUBSCRIBE to a wildcard filter
//!   and UNSUBSCRIBE as fast as they can (optionally among `--retained` retained messages):
//!   msgs/s, latency, SUBSCRIBE round trips/s and SUBACK latency. Not part of `all`.
//! - `handshake` (issue 10): N fresh connections (TCP, TLS without resumption with `--tls`,
//!   CONNECT..CONNACK, DISCONNECT), at most `--concurrency` handshakes in flight:
//!   connections/s and the broker's CPU per connection.
//! - `login-storm` (issue 10): devices get pushes at a fixed rate; then `--logins` clients
//!   log in with a user name and password (one argon2 verification each on the broker) at
//!   once: push latency before, during and after the storm, logins/s.
//! - `storm`: a reconnect storm: `--devices` (default 19,000) persistent sessions, each
//!   subscribed to its push topic, go offline, get `--queued` QoS 1 messages each, then all
//!   reconnect at once (`--storm-concurrency` caps connects in flight): seconds until all are
//!   connected and until all queued messages have arrived, CONNACK latency, refusals by code
//!   (CONNACK 3 retried after `--refused-backoff`), connection errors, broker and store CPU,
//!   Redis commands per reconnect (`--store-addr`). Not part of `all`.
//! - `http` (issue 15): Herald's backend HTTP API (`--http-addr`) against MQTT, on one broker
//!   in one run: QoS 1 push over MQTT, `POST /v1/push/{id}` with `--http-concurrency`
//!   requests in flight on keep-alive connections, the batch `POST /v1/push`, the same with
//!   `receipt=true` (skipped when Herald answers 400), and at a fixed `--http-rate` the
//!   latency from the PUBACK or the 202 to the device. Not part of `all`.
//! - `all`: every scenario but login-storm, churn, storm and http in turn against the same
//!   broker.
//!
//! Every scenario runs over TLS with `--tls --cafile PEM` (rustls, ring, no session
//! resumption: every connection is a full handshake; result names get a `-tls` suffix, e.g.
//! `idle-tls-10000`), and logs in with `--username U --password P`.
//! - `compare`: side-by-side table of earlier JSON results (Herald/Mosquitto ratio, targets).
//!
//! - `cluster-report`: the cluster table of issue 5 (local against forwarded).
//! - `security-report`: the table of issue 10 (TLS and authentication) from the result
//!   directories `scripts/bench.sh --only tls` writes.
//! - `http-report`: the table of issue 15 (HTTP API against MQTT, memory and Redis store side
//!   by side, with the targets).
//!
//! Give `--broker-pid` to get broker RSS and CPU (from /proc), repeated for the nodes of a
//! cluster (summed), and `--store-pid` for those of a store that runs as its own process
//! (redis-server behind Herald --store redis). `--publish-host/--publish-port` send the
//! publisher of push, push-rate and drain to another node than the devices (cluster: publish
//! on node A, devices on node B). `scripts/bench.sh` (`make bench`) runs everything against
//! Herald and Mosquitto, `scripts/bench.sh --cluster` the cluster cases; see BENCHMARKS.md.

mod client;
mod procstat;
mod redisstat;
mod report;
mod scenarios;

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::client::{Target, Tls};
use crate::report::{RunFile, ScenarioResult};
use tokio_rustls::rustls::pki_types::ServerName;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator for MQTT 3.1.1 brokers (issue 3 scenarios)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N clients connect and stay idle: connect rate, RSS per connection, idle CPU.
    Idle(Opts),
    /// QoS 1 push to online devices with a window: msgs/s and latency.
    Push(Opts),
    /// QoS 1 push at a fixed offered rate (--rate): latency.
    PushRate(Opts),
    /// QoS 0 publisher-subscriber pairs (--pairs 1,4): msgs/s.
    Qos0(Opts),
    /// Offline devices get --per-device QoS 1 messages each, then reconnect: drain time.
    Drain(Opts),
    /// Lock contention (issue 12): qos0 pairs publish while --churn clients SUBSCRIBE and
    /// UNSUBSCRIBE in a loop: msgs/s, latency, SUBSCRIBE round trips/s, SUBACK latency.
    ///
    /// The qos0 pairs (--pairs) publish for --secs while --churn clients SUBSCRIBE to a
    /// wildcard filter, wait for the SUBACK, UNSUBSCRIBE, wait for the UNSUBACK, again.
    /// --retained N first stores N retained messages on r/<a>/<b> (cleared after the run),
    /// and --churn-retained makes the churn filters r/<a>/+, which match --retained-fanout of
    /// them each. Best with the broker and this tool both on two cores (taskset -c 0,1); not
    /// part of `all`.
    Churn(Opts),
    /// N fresh connections (TCP + TLS with --tls + CONNECT/CONNACK + DISCONNECT), at most
    /// --concurrency in flight: connections/s, broker CPU per connection.
    Handshake(Opts),
    /// Devices get QoS 1 pushes at --rate; after --baseline-secs, --logins clients log in
    /// with --username/--password at once (--login-concurrency in flight): push latency
    /// before, during and after, logins/s.
    LoginStorm(Opts),
    /// Reconnect storm: --devices (default 19,000) persistent sessions with --queued QoS 1
    /// messages each reconnect at once: time until all are connected and all messages are
    /// in, CONNACK latency, refusals by code, errors, broker and Redis CPU.
    ///
    /// The devices (clean session = false, each subscribed to push/<id> at QoS 1) connect
    /// (--concurrency in flight) and disconnect, --queued QoS 1 messages are published to
    /// each, then every device reconnects at once (a task each; --storm-concurrency caps the
    /// connects in flight, 0: no cap). CONNACK 3 and connection errors are retried after
    /// --refused-backoff (doubling, with jitter) until --timeout; other refusals are final.
    /// Targets: all connected (CONNACK 0, session present) within --target-secs, no error but
    /// CONNACK 3. With --store-pid and --store-addr: Redis CPU and commands per reconnect;
    /// with --metrics-addr: Herald's own takeover and CONNACK counts. Not part of `all`.
    Storm(Opts),
    /// Issue 15: Herald's HTTP API (--http-addr) against MQTT QoS 1 push, on the same broker
    /// and the same --devices in one run.
    ///
    /// Phases of --secs each, the devices online throughout: (a) MQTT QoS 1 push with a
    /// window (as `push`); (b) POST /v1/push/{id}?qos=1, --http-concurrency keep-alive
    /// connections with a request in flight each; (c) the batch POST /v1/push, --batch-size
    /// messages per request, --batch-concurrency in flight; (d) (b) with receipt=true
    /// (skipped, with a note, when Herald answers 400); (e) MQTT, then HTTP, at a fixed
    /// --http-rate: the time from the PUBACK or the 202 to the device's PUBLISH. A message
    /// counts when its device has it. Not part of `all`.
    Http(Opts),
    /// Every scenario but login-storm, churn, storm and http, one after the other.
    All(Opts),
    /// Side-by-side table of JSON results: `compare Herald=DIR Mosquitto=DIR ...`
    /// [--durable NAME].
    Compare(CompareArgs),
    /// Cluster table (issue 5): local (publisher and devices on one node) against forwarded
    /// (publisher on node A, devices on node B), with the targets.
    ClusterReport(ClusterReportArgs),
    /// Issue 10 table (TLS and authentication): `security-report DIR` where DIR is the
    /// output directory of `scripts/bench.sh --only tls`.
    SecurityReport(SecurityReportArgs),
    /// Issue 15 table (HTTP API against MQTT): `http-report NAME=PATH...`, each PATH the
    /// JSON (or a directory of them) of an `http` run, e.g. the memory and the Redis store.
    HttpReport(HttpReportArgs),
}

#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long)]
    pub port: u16,
    /// Broker process id, for RSS and CPU from /proc. Repeatable: the nodes of a cluster,
    /// whose RSS and CPU are summed (and also shown per node, in the order given).
    #[arg(long)]
    pub broker_pid: Vec<u32>,
    /// Process id of the broker's store when it is a process of its own (redis-server for
    /// Herald --store redis), for its CPU and RSS from /proc.
    #[arg(long)]
    pub store_pid: Option<u32>,
    /// Address of the broker's Redis store: push and push-rate also report the commands it
    /// ran per message (`INFO commandstats` before and after the measured phase).
    #[arg(long)]
    pub store_addr: Option<SocketAddr>,
    /// push, push-rate, drain: the publisher connects here instead of --host (e.g. cluster
    /// node A while the devices are on node B).
    #[arg(long)]
    pub publish_host: Option<String>,
    /// push, push-rate, drain: the publisher's port (default: --port).
    #[arg(long)]
    pub publish_port: Option<u16>,
    /// Name of the result (the "variant" that `compare` and `cluster-report` match on)
    /// instead of the scenario's own, e.g. push-rate-2000. Only with a single scenario.
    #[arg(long)]
    pub variant: Option<String>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Name of the broker in the output.
    #[arg(long, default_value = "broker")]
    pub label: String,
    /// Spread connections over this many source addresses (0: let the kernel choose).
    #[arg(long, default_value_t = 16)]
    pub sources: u32,
    /// First source address.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: Ipv4Addr,
    /// Handshakes (TCP connect + CONNECT..CONNACK) in flight at most.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Runtime worker threads of this tool (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Keepalive of the clients, seconds.
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Seconds for one handshake before it is retried.
    #[arg(long, default_value_t = 10.0)]
    pub handshake_timeout: f64,

    /// TLS (rustls, ring provider) on every connection; session resumption is off, so each
    /// connection is a full handshake.
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA (or certificate) that signed the broker's certificate.
    #[arg(long)]
    pub cafile: Option<PathBuf>,
    /// Name the broker's certificate must carry (default: --host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Do not check the broker's certificate or its handshake signature (saves this tool an
    /// ECDSA verification per connection; the broker's side is the same).
    #[arg(long)]
    pub tls_no_verify: bool,
    /// TLS versions offered: 1.3, 1.2 or any.
    #[arg(long, default_value = "1.3")]
    pub tls_version: String,
    /// User name in every CONNECT (and for the login storm's clients). With it, client ids
    /// should start with it and a separator (e.g. --id-prefix U-dev) for Herald to accept
    /// them without an ACL file.
    #[arg(long)]
    pub username: Option<String>,
    /// Password in every CONNECT with --username.
    #[arg(long, default_value = "")]
    pub password: String,

    /// handshake: connections.
    #[arg(long, default_value_t = 20_000)]
    pub connections: usize,

    /// login-storm: clients that log in (--username, --password) during the storm.
    #[arg(long, default_value_t = 5000)]
    pub logins: usize,
    /// login-storm: logins in flight at most (TCP connect, CONNECT .. CONNACK).
    #[arg(long, default_value_t = 1000)]
    pub login_concurrency: usize,
    /// login-storm: seconds to wait for one login's CONNACK (logins queue for the broker's
    /// password workers, so this is long; a login is never retried).
    #[arg(long, default_value_t = 300.0)]
    pub login_timeout: f64,
    /// login-storm: seconds of pushes measured before the storm.
    #[arg(long, default_value_t = 10.0)]
    pub baseline_secs: f64,
    /// login-storm: seconds of pushes measured after the last login.
    #[arg(long, default_value_t = 3.0)]
    pub after_secs: f64,

    /// idle: clients.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// idle: seconds to sit idle.
    #[arg(long, default_value_t = 30.0)]
    pub idle_secs: f64,
    /// idle: do not subscribe each client to its push topic.
    #[arg(long)]
    pub no_subscribe: bool,
    /// idle: client id prefix.
    #[arg(long, default_value = "idle")]
    pub idle_prefix: String,

    /// push, push-rate, drain: devices (client ids <prefix>0, <prefix>1, ...).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// push, push-rate, drain: device client id prefix; devices use push/<id>.
    #[arg(long, default_value = "dev")]
    pub id_prefix: String,
    /// push, push-rate, qos0, churn: seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// push: publish exactly this many messages instead of for --secs.
    #[arg(long)]
    pub messages: Option<u64>,
    /// push, push-rate, drain: unacknowledged (no PUBACK yet) messages at most.
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// push, push-rate: first send one message to each device and wait until all have
    /// arrived (not counted in the figures), e.g. so that a cluster's node link is up.
    #[arg(long)]
    pub warmup: bool,
    /// push: published but not yet delivered messages at most (and at most 500 per device).
    #[arg(long, default_value_t = 20_000)]
    pub max_lag: u64,
    /// push-rate: offered rate, msgs/s.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Payload bytes (at least 16: the timestamp and sequence number).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// qos0, churn: numbers of pairs to run, e.g. 1,4 (a result each).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub pairs: Vec<usize>,
    /// qos0, churn: messages a publisher may be ahead of its subscriber.
    #[arg(long, default_value_t = 1000)]
    pub lag: u64,
    /// churn: clients that SUBSCRIBE and UNSUBSCRIBE in a loop while the pairs publish (0:
    /// the qos0 baseline).
    #[arg(long, default_value_t = 0)]
    pub churn: usize,
    /// churn: the churn clients subscribe to r/<a>/+ (a moving on each time), which matches
    /// --retained-fanout of the --retained messages, instead of churn/<i>/+/x (none).
    #[arg(long)]
    pub churn_retained: bool,
    /// churn: retained messages stored (QoS 0, on r/<a>/<b>) before the measured phase, and
    /// cleared after it.
    #[arg(long, default_value_t = 0)]
    pub retained: usize,
    /// churn: retained messages under each r/<a>, so matched by one churn SUBSCRIBE.
    #[arg(long, default_value_t = 4)]
    pub retained_fanout: usize,
    /// push, push-rate, drain, login-storm: the broker is fresh, so skip connecting every
    /// device id with a clean session before and after the run (with --username each of
    /// those connections is a password check on the broker).
    #[arg(long)]
    pub no_wipe: bool,
    /// drain: QoS 1 messages per offline device.
    #[arg(long, default_value_t = 10)]
    pub per_device: u64,

    /// storm: QoS 1 messages queued for each device while it is offline.
    #[arg(long, default_value_t = 1)]
    pub queued: u64,
    /// storm: reconnects (TCP connect .. CONNACK) in flight at most; 0: no cap, every device
    /// at once.
    #[arg(long, default_value_t = 0)]
    pub storm_concurrency: usize,
    /// storm: seconds before a device tries again after CONNACK 3 or a connection error
    /// (doubling with each retry up to 8 times this, plus up to 100 % jitter).
    #[arg(long, default_value_t = 0.1)]
    pub refused_backoff: f64,
    /// storm: the target, every device connected within this many seconds.
    #[arg(long, default_value_t = 3.0)]
    pub target_secs: f64,
    /// storm: Herald's metrics endpoint (--metrics-listen), read before and after the storm
    /// for its count of takeovers and of CONNACKs by code.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// http: Herald's backend HTTP API (--http-listen), plain HTTP/1.1.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// http: bearer token for the API (one of http.tokens), if it has any.
    #[arg(long)]
    pub http_token: Option<String>,
    /// http: keep-alive connections for single pushes, one request in flight on each.
    #[arg(long, default_value_t = 64)]
    pub http_concurrency: usize,
    /// http: messages per batch request (POST /v1/push).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// http: batch requests in flight (a connection each).
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
    /// http: the fixed rate (msgs/s) of the latency phases, MQTT and HTTP.
    #[arg(long, default_value_t = 5000.0)]
    pub http_rate: f64,
}

/// storm's --devices when none is given: the idle case's 19,000 (a process opens at most
/// 20,000 files here).
const STORM_DEVICES: usize = 19_000;

#[derive(Args, Debug)]
struct CompareArgs {
    /// NAME=PATH, PATH a JSON file or a directory of them. The ratio is column 1 / column 2.
    #[arg(required = true, num_args = 2..)]
    columns: Vec<String>,
    /// Also write the table as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// A column (third or later) of Herald with a durable store: its ratio to column 2 also
    /// shows the target of issue 4 (QoS 1 push msgs/s >= 1.0). Repeatable.
    #[arg(long)]
    durable: Vec<String>,
}

#[derive(Args, Debug)]
struct ClusterReportArgs {
    /// Results with publisher and devices on one node (cluster on): a directory of JSON
    /// files, several runs of a variant allowed.
    #[arg(long)]
    local: PathBuf,
    /// Results with the publisher on node A and the devices on node B.
    #[arg(long)]
    forwarded: PathBuf,
    /// Results of one node without cluster flags, shown for reference.
    #[arg(long)]
    plain: Option<PathBuf>,
    /// Also write the tables as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct HttpReportArgs {
    /// NAME=PATH, PATH the JSON of an `http` run or a directory of them; a column each.
    #[arg(required = true, num_args = 1..)]
    columns: Vec<String>,
    /// Also write the table as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SecurityReportArgs {
    /// The output directory of `scripts/bench.sh --only tls` (herald-tls/, mosquitto-tls/,
    /// herald-auth/, herald-noauth/ in it).
    dir: PathBuf,
    /// Also write the table as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

impl Opts {
    /// User name and password for CONNECT, when --username is given.
    pub fn login(&self) -> Option<(&str, &[u8])> {
        self.username
            .as_deref()
            .map(|u| (u, self.password.as_bytes()))
    }

    /// A scenario's name for this transport: `push` or `push-tls`.
    pub fn named(&self, base: &str) -> String {
        if self.tls {
            format!("{base}-tls")
        } else {
            base.to_string()
        }
    }
}

fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4()))
}

fn target_for(o: &Opts, addr: SocketAddr, tls: Option<&Tls>) -> Target {
    Target {
        addr,
        first_source: u32::from(o.source_base),
        sources: if addr.ip().is_loopback() {
            o.sources
        } else {
            0
        },
        tls: tls.cloned(),
    }
}

/// The TLS client of --tls (None without it).
fn tls_for(o: &Opts) -> Result<Option<Tls>, String> {
    if !o.tls {
        return Ok(None);
    }
    let config = client::tls_config(o.cafile.as_deref(), o.tls_no_verify, &o.tls_version)?;
    let name = o.tls_server_name.clone().unwrap_or_else(|| o.host.clone());
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("--tls-server-name {name}: {e}"))?;
    Ok(Some(Tls {
        connector: tokio_rustls::TlsConnector::from(config),
        server_name,
    }))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // storm has a --devices default of its own.
    let storm_devices = matches
        .subcommand_matches("storm")
        .is_some_and(|m| m.value_source("devices") != Some(ValueSource::CommandLine));
    let (which, opts) = match cli.cmd {
        Cmd::Compare(a) => {
            return match report::compare(&a.columns, &a.durable, a.markdown.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("herald-bench: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::ClusterReport(a) => {
            return match report::cluster_report(
                &a.local,
                &a.forwarded,
                a.plain.as_deref(),
                a.markdown.as_deref(),
            ) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("herald-bench: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::SecurityReport(a) => {
            return match report::security_report(&a.dir, a.markdown.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("herald-bench: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::HttpReport(a) => {
            return match report::http_report(&a.columns, a.markdown.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("herald-bench: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::Http(o) => ("http", o),
        Cmd::Idle(o) => ("idle", o),
        Cmd::Handshake(o) => ("handshake", o),
        Cmd::LoginStorm(o) => ("login-storm", o),
        Cmd::Push(o) => ("push", o),
        Cmd::PushRate(o) => ("push-rate", o),
        Cmd::Qos0(o) => ("qos0", o),
        Cmd::Drain(o) => ("drain", o),
        Cmd::Churn(o) => ("churn", o),
        Cmd::Storm(mut o) => {
            if storm_devices {
                o.devices = STORM_DEVICES;
            }
            ("storm", o)
        }
        Cmd::All(o) => ("all", o),
    };
    let Some(addr) = resolve(&opts.host, opts.port) else {
        eprintln!("herald-bench: cannot resolve {}:{}", opts.host, opts.port);
        return ExitCode::from(2);
    };
    let tls = match tls_for(&opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let target = target_for(&opts, addr, tls.as_ref());
    let pub_host = opts.publish_host.as_deref().unwrap_or(&opts.host);
    let pub_port = opts.publish_port.unwrap_or(opts.port);
    let Some(pub_addr) = resolve(pub_host, pub_port) else {
        eprintln!("herald-bench: cannot resolve {pub_host}:{pub_port}");
        return ExitCode::from(2);
    };
    let pub_target = target_for(&opts, pub_addr, tls.as_ref());
    if opts.variant.is_some() && which == "all" {
        eprintln!("herald-bench: --variant names the result of a single scenario, not `all`");
        return ExitCode::from(2);
    }
    client::now_ns();
    let rt = if opts.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut results = rt.block_on(run(which, &opts, &target, &pub_target));
    if let Some(v) = &opts.variant {
        for r in &mut results {
            r.variant = v.clone();
        }
    }
    if which == "http" {
        report::print_http(&opts.label, &results);
    } else {
        report::print_run(&opts.label, &results);
    }
    if let Some(path) = &opts.json {
        let file = RunFile {
            tool: format!("herald-bench {}", env!("CARGO_PKG_VERSION")),
            label: opts.label.clone(),
            broker: format!("{}:{}", opts.host, opts.port),
            publish_broker: (pub_addr != addr).then(|| pub_addr.to_string()),
            broker_pid: opts.broker_pid.first().copied(),
            broker_pids: opts.broker_pid.clone(),
            store_pid: opts.store_pid,
            unix_time: started,
            results: results.clone(),
        };
        let text = serde_json::to_string_pretty(&file).expect("results serialize");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("herald-bench: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if results.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(which: &str, o: &Opts, target: &Target, pub_target: &Target) -> Vec<ScenarioResult> {
    let mut out = Vec::new();
    let all = which == "all";
    if all || which == "idle" {
        out.push(progress(scenarios::idle(o, target, o.clients).await));
    }
    if all || which == "push" {
        out.push(progress(scenarios::push(o, target, pub_target, None).await));
    }
    if all || which == "push-rate" {
        out.push(progress(
            scenarios::push(o, target, pub_target, Some(o.rate)).await,
        ));
    }
    if all || which == "qos0" {
        for &p in &o.pairs {
            out.push(progress(scenarios::qos0(o, target, p.max(1)).await));
        }
    }
    if which == "churn" {
        for &p in &o.pairs {
            out.push(progress(scenarios::churn(o, target, p.max(1)).await));
        }
    }
    if all || which == "drain" {
        out.push(progress(scenarios::drain(o, target, pub_target).await));
    }
    if all || which == "handshake" {
        out.push(progress(
            scenarios::handshake(o, target, o.connections).await,
        ));
    }
    if which == "login-storm" {
        out.push(progress(
            scenarios::login_storm(o, target, pub_target).await,
        ));
    }
    if which == "storm" {
        out.push(progress(scenarios::storm(o, target, pub_target).await));
    }
    if which == "http" {
        out.push(progress(scenarios::http(o, target, pub_target).await));
    }
    out
}

fn progress(mut r: ScenarioResult) -> ScenarioResult {
    let st = client::tls_stats();
    let (full, resumed) = (st.full.load(Relaxed), st.resumed.load(Relaxed));
    if full + resumed > 0 {
        r.param("tls", st.first.get().cloned().unwrap_or_default());
        r.param("tls_resumption", "off");
        r.metric("tls_full_handshakes", full as f64);
        if resumed > 0 {
            r.error(format!(
                "{resumed} TLS sessions were resumed (resumption is meant to be off)"
            ));
        }
    }
    eprintln!(
        "herald-bench: {} {}",
        r.variant,
        if r.ok { "done" } else { "FAILED" }
    );
    r
}
