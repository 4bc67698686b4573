// jemalloc: size classes without per-allocation headers, and 128-byte-aligned blocks (every
// task and socket registration of tokio) without padding. An idle connection costs about
// 1,000 bytes with it and about 115 more with glibc's malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use herald::config::{Config, LogFormat, StoreKind};

/// Herald: MQTT 3.1.1 push broker.
///
/// With no options it listens on 0.0.0.0:1883 with the in-process store. Every setting lives
/// in the TOML file (see config/herald.toml); flags override the file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// MQTT TCP listener (server.listen).
    #[arg(short, long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Prometheus /metrics listener (metrics.listen).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut config, origin) = match &cli.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => (c, path.display().to_string()),
            Err(e) => {
                eprintln!("herald: {e}");
                return ExitCode::from(2);
            }
        },
        None => (Config::default(), "defaults".to_string()),
    };
    if let Some(l) = cli.listen {
        config.server.listen = Some(l);
    }
    if let Some(m) = cli.metrics_listen {
        config.metrics.listen = Some(m);
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
        let signals = match Signals::new() {
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
        signals.wait().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
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
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
