// jemalloc: size classes without per-allocation headers, and 128-byte-aligned blocks (every
// task and socket registration of tokio) without padding. An idle connection costs about
// 1,000 bytes with it and about 115 more with glibc's malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// jemalloc's background thread returns freed memory to the system on time (its dirty-page
// decay, 10 s): without it, decay runs only when the process allocates, and a node that has
// gone quiet after a burst (or an attack) keeps its peak RSS, which the memory guard would
// then read as pressure that never ends. (The prefixed name is tikv-jemallocator's.)
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 23] = b"background_thread:true\0";

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::config::{Config, LogFormat, StoreKind, TlsIdentity};

/// Herald: MQTT 3.1.1 push broker.
///
/// With no options it listens on 0.0.0.0:1883 with the in-process store. Every setting lives
/// in the TOML file (see config/herald.toml); flags override the file.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// MQTT TCP listener (server.listen); "" turns plain TCP off.
    #[arg(short, long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// MQTT over TLS listener, e.g. 0.0.0.0:8883 (server.tls_listen).
    #[arg(long, value_name = "ADDR:PORT")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listeners (tls.cert).
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners (tls.key).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (tls.client_ca).
    #[arg(long, value_name = "PATH")]
    tls_client_ca: Option<PathBuf>,
    /// "cert": a client certificate's CN is the device's identity (tls.identity).
    #[arg(long, value_enum, value_name = "none|cert")]
    tls_identity: Option<TlsIdentity>,
    /// MQTT over WebSocket listener, path /mqtt (server.ws_listen).
    #[arg(long, value_name = "ADDR:PORT")]
    ws_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS listener (server.wss_listen).
    #[arg(long, value_name = "ADDR:PORT")]
    wss_listen: Option<SocketAddr>,
    /// Users and argon2id hashes, made with `herald passwd` (auth.password_file).
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,
    /// Mosquitto-style ACL file (auth.acl_file).
    #[arg(long, value_name = "PATH")]
    acl_file: Option<PathBuf>,
    /// Operations listener (metrics.listen): GET /metrics, /healthz, /readyz, POST /admin/drain.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Backend HTTP API listener (http.listen): POST /v1/push, GET /v1/clients/ID. Without
    /// http.tokens it must be a loopback address.
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<SocketAddr>,
    /// Where outboxes, sessions and retained messages live (store.kind).
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Redis URL for --store redis, e.g. redis://127.0.0.1:6379/0 (store.redis_url).
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// This node's id in a cluster (cluster.node_id; default <hostname>:<client port>).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Node-to-node listener; turns clustering on, needs --store redis (cluster.listen).
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_listen: Option<SocketAddr>,
    /// Address other nodes dial for this node (cluster.advertise; default: the bound
    /// --cluster-listen address).
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_advertise: Option<SocketAddr>,
    /// Log filter, e.g. info, debug, herald=trace (log.level).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format (log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Adds or replaces a user in a password file (the password is read from the terminal,
    /// or from standard input when it is not a terminal); with -D removes the user.
    Passwd {
        /// Remove USER instead.
        #[arg(short = 'D')]
        delete: bool,
        /// The password file (created if missing, mode 0600).
        file: PathBuf,
        user: String,
    },
}

fn passwd(delete: bool, file: &std::path::Path, user: &str) -> ExitCode {
    let password = if delete {
        None
    } else {
        match herald::auth::password::read_new_password() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("herald passwd: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    match herald::auth::password::update_file(file, user, password.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Passwd { delete, file, user }) = &cli.command {
        return passwd(*delete, file, user);
    }
    let (mut config, origin) = match &cli.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => (c, path.display().to_string()),
            Err(e) => {
                eprintln!("herald: {e}");
                return ExitCode::from(2);
            }
        },
        None => {
            let mut c = Config::default();
            c.apply_env();
            (c, "defaults".to_string())
        }
    };
    if let Some(l) = cli.listen {
        config.server.listen = match l.as_str() {
            "" => None,
            a => match a.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("herald: --listen {a:?}: {e}");
                    return ExitCode::from(2);
                }
            },
        };
    }
    let s = &mut config.server;
    s.tls_listen = cli.tls_listen.or(s.tls_listen);
    s.ws_listen = cli.ws_listen.or(s.ws_listen);
    s.wss_listen = cli.wss_listen.or(s.wss_listen);
    let t = &mut config.tls;
    t.cert = cli.tls_cert.or(t.cert.take());
    t.key = cli.tls_key.or(t.key.take());
    t.client_ca = cli.tls_client_ca.or(t.client_ca.take());
    t.identity = cli.tls_identity.unwrap_or(t.identity);
    let a = &mut config.auth;
    a.password_file = cli.password_file.or(a.password_file.take());
    a.acl_file = cli.acl_file.or(a.acl_file.take());
    if let Some(m) = cli.metrics_listen {
        config.metrics.listen = Some(m);
    }
    if let Some(h) = cli.http_listen {
        config.http.listen = Some(h);
    }
    if let Some(s) = cli.store {
        config.store.kind = s;
    }
    if let Some(u) = cli.redis_url {
        config.store.redis_url = u;
    }
    if let Some(n) = cli.node_id {
        config.cluster.node_id = Some(n);
    }
    if let Some(l) = cli.cluster_listen {
        config.cluster.listen = Some(l);
    }
    if let Some(a) = cli.cluster_advertise {
        config.cluster.advertise = Some(a);
    }
    if let Some(l) = cli.log_level {
        config.log.level = l;
    }
    if let Some(f) = cli.log_format {
        config.log.format = f;
    }
    if let Err(e) = config.validate(&format!("{origin} + command line")) {
        eprintln!("herald: {e}");
        return ExitCode::from(2);
    }
    init_logging(&config);

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Listening for signals before the listeners open: a SIGTERM that arrives right
        // after start must still mean a graceful stop.
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGINT/SIGTERM");
                return ExitCode::FAILURE;
            }
        };
        let server = match herald::Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        let drain_requested = server.drain_requested();
        loop {
            tokio::select! {
                s = signals.wait() => match s {
                    Signal::Reload => {
                        tracing::info!("SIGHUP: reloading certificates, password file and ACL");
                        server.reload();
                    }
                    Signal::Stop => break,
                },
                _ = drain_requested.cancelled() => break,
            }
        }
        if !server.can_drain() {
            tracing::info!("shutting down");
            server.shutdown().await;
            return ExitCode::SUCCESS;
        }
        // A cluster node drains (its devices move to the other nodes); a second signal
        // cuts that short.
        tokio::select! {
            _ = server.drain() => ExitCode::SUCCESS,
            _ = async { while signals.wait().await != Signal::Stop {} } => {
                tracing::warn!("second stop signal: exiting now, without finishing the drain");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(config: &Config) {
    // rustls warns at every handshake whose SNI is an IP address (what OpenSSL clients send
    // when told to connect to 127.0.0.1): one line per connection, before any
    // authentication, is log noise anyone can cause. Its errors still show.
    let level = &config.log.level;
    let filter = if level.contains("rustls") {
        tracing_subscriber::EnvFilter::new(level)
    } else {
        tracing_subscriber::EnvFilter::new(format!("{level},rustls=error"))
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn wait(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
