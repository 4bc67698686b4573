//! A private Redis Cluster for the tests: `redis-server --cluster-enabled yes` nodes on free
//! loopback ports, each in a directory of its own (AOF on), joined by
//! `redis-cli --cluster create`, and the faults the store must survive: a primary killed
//! (`kill_primary_for_slot`, `wait_failover`), a node restarted (`restart`), a whole shard
//! stopped (`stop_shard`, `start_shard`) and a slot migrated step by step
//! (`migrate_slot_begin`, `migrate_slot_keys`, `migrate_slot_end`) so that a test can act
//! while the slot is half-moved (ASK).
//!
//! `start_with` adds a password (`requirepass`, `masterauth`) or TLS (every port, the
//! cluster bus and replication too, with the server certificate of `pki`; the URL is then
//! `rediss+cluster://` and Herald needs `store.redis_ca` = `pki`'s CA).
//!
//! Every wait polls the nodes' own view (`CLUSTER INFO`, `CLUSTER SLOTS`, `INFO
//! replication`) until it holds; none sleeps a fixed time. Processes are the fixture's own,
//! killed by pid on drop. Without `redis-server` or `redis-cli` on PATH, `start` prints a
//! SKIPPED line and returns `None` (scripts/deps.sh installs both).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald::redis::slots::{SlotMap, SLOTS};

use super::pki::Pki;
use super::process::free_port;

/// How long the fixture waits for the cluster to reach a state. Only reached on failure; a
/// failover (node timeout 2 s, then an election) takes about 4 s.
const STATE_WAIT: Duration = Duration::from_secs(30);

/// Between two polls of the nodes' state.
const POLL: Duration = Duration::from_millis(20);

/// The failure detection time: a primary is failed over this long after it stops answering.
const NODE_TIMEOUT_MS: u64 = 2000;

/// How the nodes are reached, beyond their ports.
#[derive(Clone, Copy, Default)]
pub struct Setup<'a> {
    /// Required by every node (`requirepass`, `masterauth`).
    pub password: Option<&'a str>,
    /// TLS only, with `pki`'s server certificate (`--port 0`, `--tls-port`, bus and
    /// replication over TLS too).
    pub tls: bool,
}

struct Node {
    child: Option<Child>,
    port: u16,
    /// The cluster bus port (`--cluster-port`): chosen free too, since the default
    /// (port + 10000) may be taken or past 65535.
    bus_port: u16,
    dir: PathBuf,
    /// The node id (`CLUSTER MYID`), kept across restarts in nodes.conf.
    id: String,
    /// `requirepass` and `masterauth`, if the cluster has a password.
    password: Option<String>,
    tls: bool,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// Slots being migrated: slot -> (from, to) node indices.
    migrations: HashMap<u16, (usize, usize)>,
    password: Option<String>,
    tls: bool,
    dir: tempfile::TempDir,
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(binary).is_file()))
        .unwrap_or(false)
}

/// One connection per admin command: the fixture talks to nodes that come and go.
fn connect(port: u16, password: Option<&str>, tls: bool) -> redis::RedisResult<redis::Connection> {
    let addr = if tls {
        redis::ConnectionAddr::TcpTls {
            host: "127.0.0.1".into(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp("127.0.0.1".into(), port)
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(addr)?;
    if let Some(pw) = password {
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    let client = if tls {
        let ca = std::fs::read(Pki::get().ca_path()).expect("test CA");
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )?
    } else {
        redis::Client::open(info)?
    };
    let con = client.get_connection_with_timeout(Duration::from_millis(500))?;
    con.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(con)
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// `field:value` lines of an INFO-style reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

impl Node {
    /// Starts redis-server and waits until this process (not another on the port) answers.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(
            self.child.is_none(),
            "redis node {} already running",
            self.port
        );
        let mut server = Command::new("redis-server");
        if self.tls {
            let (pki, cert) = (Pki::get(), Pki::get().server());
            server
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&cert.cert)
                .arg("--tls-key-file")
                .arg(&cert.key)
                .arg("--tls-ca-cert-file")
                .arg(pki.ca_path())
                .args(["--tls-auth-clients", "no"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        } else {
            server.args(["--port", &self.port.to_string()]);
        }
        let mut child = server
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // A replica may take over however long its link was down: tests kill at will.
            .args(["--cluster-replica-validity-factor", "0"])
            // Replicas stay with the primary the test gave them.
            .args(["--cluster-allow-replica-migration", "no"])
            // A primary otherwise waits 5 s for more replicas before a full sync.
            .args(["--repl-diskless-sync-delay", "0"])
            // CLUSTER SLOTS lists a replica only once its replication offset is past 0,
            // which on an idle primary takes its first ping (every 10 s by default).
            .args(["--repl-ping-replica-period", "1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .args(["--logfile", "redis.log"])
            .args(
                self.password
                    .iter()
                    .flat_map(|pw| ["--requirepass", pw.as_str(), "--masterauth", pw.as_str()]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis node on {} exited: {status} (log: {})",
                    self.port,
                    self.dir.join("redis.log").display()
                ));
            }
            let info: redis::RedisResult<String> = self.query(&cmd(&["INFO", "server"]));
            if let Ok(info) = info {
                if field(&info, "process_id") == Some(&child.id().to_string()) {
                    break;
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis node on {} does not answer", self.port));
            }
            std::thread::sleep(POLL);
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, by the pid of the process this node started.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.connect()?)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        connect(self.port, self.password.as_deref(), self.tls)
    }
}

impl RedisCluster {
    /// `primaries` shards of one primary and `replicas_per_primary` replicas each, created
    /// and in agreement (state ok, every slot served, every replica in sync). `None`, with a
    /// SKIPPED line, when redis-server or redis-cli is not installed.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Option<RedisCluster> {
        RedisCluster::start_with(primaries, replicas_per_primary, Setup::default())
    }

    /// `start`, with a password or TLS.
    pub fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
        setup: Setup<'_>,
    ) -> Option<RedisCluster> {
        let Setup { password, tls } = setup;
        let missing: Vec<&str> = ["redis-server", "redis-cli"]
            .into_iter()
            .filter(|b| !on_path(b))
            .collect();
        if !missing.is_empty() {
            let test = std::thread::current().name().unwrap_or("?").to_string();
            // One write, so that parallel tests' output does not cut the line.
            let line = format!(
                "SKIPPED: {test}: {} not on PATH (Debian: redis-server, redis-tools)\n",
                missing.join(", ")
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            return None;
        }
        assert!(primaries >= 3, "Redis Cluster needs at least 3 primaries");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..primaries * (1 + replicas_per_primary) {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let mut node = Node {
                child: None,
                port: free_port(),
                bus_port: free_port(),
                dir: node_dir,
                id: String::new(),
                password: password.map(String::from),
                tls,
            };
            // Another process may take a free port before redis-server binds it.
            let mut tries = 0;
            while let Err(e) = node.spawn() {
                tries += 1;
                assert!(tries < 5, "{e}");
                node.port = free_port();
                node.bus_port = free_port();
            }
            node.id = node
                .query(&cmd(&["CLUSTER", "MYID"]))
                .expect("CLUSTER MYID");
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut cli = Command::new("redis-cli");
        if tls {
            cli.arg("--tls").arg("--cacert").arg(Pki::get().ca_path());
        }
        let out = cli
            .args(
                password
                    .iter()
                    .flat_map(|pw| ["-a", *pw, "--no-auth-warning"]),
            )
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas_per_primary.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        let cluster = RedisCluster {
            nodes,
            migrations: HashMap::new(),
            password: password.map(String::from),
            tls,
            dir,
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ready();
        Some(cluster)
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) with every node as a seed, and the
    /// password if any.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let auth = match &self.password {
            Some(pw) => format!(":{pw}@"),
            None => String::new(),
        };
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}+cluster://{auth}{}/", seeds.join(","))
    }

    /// Runs `cmd` on `node` itself (no redirection followed: a test sees MOVED and ASK).
    pub fn query<T: redis::FromRedisValue>(
        &self,
        node: usize,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        self.nodes[node].query(cmd)
    }

    /// Runs the pipeline `p` on `node` itself, in one connection (`READONLY` or `ASKING`
    /// first, say).
    pub fn query_pipe<T: redis::FromRedisValue>(
        &self,
        node: usize,
        p: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        p.query(&mut self.nodes[node].connect()?)
    }

    /// Runs `cmd`, whose keys are all in `key`'s slot, on the primary serving that slot: what
    /// a test reads of Herald's keys without going through Herald's own client.
    pub fn query_key<T: redis::FromRedisValue>(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let primary = self.primary_for_slot(herald::redis::slots::key_slot(key.as_bytes()));
        self.query(primary, cmd)
    }

    /// Every key matching `pattern` on every primary (KEYS: test data only).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut all = Vec::new();
        for node in self.primaries() {
            let found: Vec<String> = self
                .query(node, redis::cmd("KEYS").arg(pattern))
                .expect("KEYS");
            all.extend(found);
        }
        all.sort();
        all
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port
    }

    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].running()
    }

    /// Where the nodes keep their files (nodes.conf, AOF, redis.log), one directory each.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// `node`'s view of the slots (`CLUSTER SLOTS`), if it answers.
    fn view_of(&self, node: usize) -> Option<SlotMap> {
        let reply: redis::Value = self.query(node, &cmd(&["CLUSTER", "SLOTS"])).ok()?;
        SlotMap::from_cluster_slots(&reply, "127.0.0.1").ok()
    }

    /// The slot map as the first running node that answers sees it.
    pub fn slot_map(&self) -> SlotMap {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .find_map(|i| self.view_of(i))
            .expect("no running node answers CLUSTER SLOTS")
    }

    /// The node index serving `slot` as primary.
    pub fn primary_for_slot(&self, slot: u16) -> usize {
        let map = self.slot_map();
        let primary = map.primary(slot).expect("slot served");
        self.index_of_port(primary.port)
            .expect("a node of this cluster")
    }

    /// The replicas of the shard serving `slot`.
    pub fn replicas_for_slot(&self, slot: u16) -> Vec<usize> {
        let map = self.slot_map();
        let shard = map
            .shard_of_slot(slot)
            .and_then(|i| map.shard(i))
            .expect("slot served");
        shard
            .replicas
            .iter()
            .filter_map(|r| self.index_of_port(r.port))
            .collect()
    }

    /// Every node serving slots as primary, by index.
    pub fn primaries(&self) -> Vec<usize> {
        self.slot_map()
            .shards()
            .iter()
            .filter_map(|s| self.index_of_port(s.primary.port))
            .collect()
    }

    /// A primary other than the one serving `slot` (where to migrate it).
    pub fn other_primary(&self, slot: u16) -> usize {
        let from = self.primary_for_slot(slot);
        self.primaries()
            .into_iter()
            .find(|&p| p != from)
            .expect("another primary")
    }

    /// SIGKILLs the primary serving `slot`; returns its index. Its replica takes over after
    /// the node timeout (`wait_failover`).
    pub fn kill_primary_for_slot(&mut self, slot: u16) -> usize {
        let primary = self.primary_for_slot(slot);
        self.nodes[primary].kill();
        primary
    }

    /// SIGKILLs `node`.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Waits until a running node serves `slot` and the running nodes agree again (the
    /// killed primary's replica promoted, state ok); returns the new primary.
    pub fn wait_failover(&self, slot: u16) -> usize {
        self.wait_ready();
        self.primary_for_slot(slot)
    }

    /// Starts a killed node again on its port and directory (its nodes.conf and AOF), and
    /// waits until it has rejoined: a failed-over primary comes back as a replica of its
    /// successor, in sync.
    pub fn restart(&mut self, node: usize) {
        if let Err(e) = self.nodes[node].spawn() {
            panic!("{e}");
        }
        self.wait_ready();
    }

    /// SIGKILLs the primary serving `slot` and its replicas; returns them (for
    /// `start_shard`). With full coverage required (Redis's default), the whole cluster
    /// refuses commands until they are back.
    pub fn stop_shard(&mut self, slot: u16) -> Vec<usize> {
        let mut shard = vec![self.primary_for_slot(slot)];
        shard.extend(self.replicas_for_slot(slot));
        for &n in &shard {
            self.nodes[n].kill();
        }
        shard
    }

    /// Starts the nodes `stop_shard` returned (the primary first) and waits until the
    /// cluster is ok again. A primary that failed with its slots is trusted again only after
    /// twice the node timeout, so this takes about 4 s.
    pub fn start_shard(&mut self, shard: &[usize]) {
        for &n in shard {
            if let Err(e) = self.nodes[n].spawn() {
                panic!("{e}");
            }
        }
        self.wait_ready();
    }

    /// Step 1 of moving `slot` to the primary `to`: `to` IMPORTING, the current primary
    /// MIGRATING. From here a command for a key of `slot` that the old primary no longer
    /// holds is answered with ASK.
    pub fn migrate_slot_begin(&mut self, slot: u16, to: usize) {
        let from = self.primary_for_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let s = slot.to_string();
        let (from_id, to_id) = (self.nodes[from].id.clone(), self.nodes[to].id.clone());
        let _: () = self
            .query(to, &cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]))
            .expect("SETSLOT IMPORTING");
        let _: () = self
            .query(from, &cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]))
            .expect("SETSLOT MIGRATING");
        self.migrations.insert(slot, (from, to));
    }

    /// Step 2: moves every key of `slot` from the old primary to the new one (MIGRATE, 100
    /// at a time); returns how many moved.
    pub fn migrate_slot_keys(&self, slot: u16) -> usize {
        let (from, to) = self.migration(slot);
        let s = slot.to_string();
        let to_port = self.nodes[to].port.to_string();
        let mut moved = 0;
        loop {
            let keys: Vec<Vec<u8>> = self
                .query(from, &cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]))
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                return moved;
            }
            let mut migrate = cmd(&["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000"]);
            if let Some(pw) = &self.password {
                migrate.arg("AUTH").arg(pw);
            }
            migrate.arg("KEYS");
            for k in &keys {
                migrate.arg(k.as_slice());
            }
            let _: () = self.query(from, &migrate).expect("MIGRATE");
            moved += keys.len();
        }
    }

    /// Step 3: `slot` belongs to the new primary (`CLUSTER SETSLOT <slot> NODE` on it, the
    /// old one, then every other primary); waits until every running node says so. From
    /// here the old primary answers MOVED.
    pub fn migrate_slot_end(&mut self, slot: u16) {
        let (from, to) = self.migration(slot);
        let s = slot.to_string();
        let to_id = self.nodes[to].id.clone();
        let mut order = vec![to, from];
        order.extend(
            self.primaries()
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for n in order {
            let _: () = self
                .query(n, &cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]))
                .expect("SETSLOT NODE");
        }
        self.migrations.remove(&slot);
        let to_port = self.nodes[to].port;
        self.wait_for(&format!("every node sees slot {slot} on node {to}"), || {
            self.running().all(|n| {
                self.view_of(n)
                    .and_then(|m| m.primary(slot).map(|p| p.port))
                    == Some(to_port)
            })
        });
        self.wait_ready();
    }

    fn migration(&self, slot: u16) -> (usize, usize) {
        *self
            .migrations
            .get(&slot)
            .unwrap_or_else(|| panic!("slot {slot}: no migrate_slot_begin"))
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].running())
    }

    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + STATE_WAIT;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "redis cluster: timed out after {STATE_WAIT:?} waiting until {what} (logs in {})",
                self.dir.path().display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the running nodes agree and the cluster is usable: each says state ok
    /// with every slot served by a node not failing, all see the same slot map, that map
    /// names exactly the running nodes (primaries running, failed nodes gone, restarted
    /// ones rejoined), and every running replica's link to its primary is up.
    pub fn wait_ready(&self) {
        self.wait_for("the cluster is ok and its nodes agree", || self.agreed());
    }

    fn agreed(&self) -> bool {
        let mut first: Option<SlotMap> = None;
        for n in self.running() {
            let Ok(info) = self.query::<String>(n, &cmd(&["CLUSTER", "INFO"])) else {
                return false;
            };
            let slots_ok = SLOTS.to_string();
            if field(&info, "cluster_state") != Some("ok")
                || field(&info, "cluster_slots_ok") != Some(slots_ok.as_str())
            {
                return false;
            }
            let Some(view) = self.view_of(n) else {
                return false;
            };
            match &first {
                None => first = Some(view),
                Some(f) if *f != view => return false,
                Some(_) => {}
            }
            let Ok(replication) = self.query::<String>(n, &cmd(&["INFO", "replication"])) else {
                return false;
            };
            if field(&replication, "role") == Some("slave")
                && field(&replication, "master_link_status") != Some("up")
            {
                return false;
            }
        }
        let Some(map) = first else {
            return false;
        };
        let mut named: Vec<u16> = map
            .shards()
            .iter()
            .flat_map(|s| std::iter::once(&s.primary).chain(&s.replicas))
            .map(|a| a.port)
            .collect();
        named.sort_unstable();
        let mut running: Vec<u16> = self.running().map(|n| self.nodes[n].port).collect();
        running.sort_unstable();
        map.is_complete() && named == running
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}
