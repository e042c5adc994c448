//! Three control-plane node processes on loopback, each on its own disk.
//!
//! Each node is the test binary re-executed with `MOELESS_TEST_NODE` set: its `node_process`
//! test calls `node_main`, which runs `control_plane::start` as `moeless control-plane` does, in
//! its own process, so SIGKILL and `abort` are real crashes. A node's stderr is kept in
//! `node{N}.stderr` beside its data directory (appended across restarts).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use control_plane::client::AdminClient;
use control_plane::{Failpoints, StorageKind};
use serde_json::{json, Value};

pub const TOKEN: &str = "cluster-token";
const NODE_ENV: &str = "MOELESS_TEST_NODE";

use chaos_tests::ports::free_loopback_port as free_port;

pub struct Cluster {
    pub raft: Vec<SocketAddr>,
    pub admin: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    storage: StorageKind,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new(storage: StorageKind) -> Self {
        let addrs = || -> Vec<SocketAddr> {
            (0..3)
                .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
                .collect()
        };
        Self {
            raft: addrs(),
            admin: addrs(),
            children: vec![None, None, None],
            storage,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Starts node `i` (0-based) with failpoints enabled and none armed.
    pub fn start(&mut self, i: usize) {
        self.start_with_failpoints(i, "");
    }

    /// Starts node `i` with `MOELESS_FAILPOINTS=spec`.
    pub fn start_with_failpoints(&mut self, i: usize, spec: &str) {
        self.start_node(i, spec, control_plane::InitialClusterState::New);
    }

    /// Starts node `i` with `--initial-cluster-state existing` (a blank node joining the group).
    pub fn start_joining(&mut self, i: usize) {
        self.start_node(i, "", control_plane::InitialClusterState::Existing);
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", i + 1))
    }

    /// Deletes node `i`'s data directory (it must be stopped).
    pub fn wipe(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {} is running", i + 1);
        let dir = self.data_dir(i);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("wipe the node's data directory");
        }
    }

    fn start_node(&mut self, i: usize, spec: &str, initial: control_plane::InitialClusterState) {
        let peers: BTreeMap<u64, String> = self
            .raft
            .iter()
            .enumerate()
            .map(|(j, a)| ((j + 1) as u64, a.to_string()))
            .collect();
        let node = json!({
            "id": i + 1,
            "raft": self.raft[i],
            "admin": self.admin[i],
            "peers": peers,
            "dir": self.data_dir(i),
            "storage": self.storage.as_str(),
            "initial_state": initial.as_str(),
        });
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path(i))
            .expect("node stderr file");
        let exe = std::env::current_exe().expect("test binary path");
        let child = Command::new(exe)
            .args(["node_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(NODE_ENV, node.to_string())
            .env(control_plane::failpoint::ENV, spec)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn node process");
        self.children[i] = Some(child);
    }

    fn stderr_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}.stderr", i + 1))
    }

    /// Everything node `i` wrote to stderr so far.
    pub fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(self.stderr_path(i)).unwrap_or_default()
    }

    /// The last lines of every node's stderr, for failure messages.
    pub fn stderr_tails(&self) -> String {
        (0..3)
            .map(|i| {
                let all = self.stderr(i);
                let lines: Vec<&str> = all.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!(
                    "--- node {} (running: {}) ---\n{tail}",
                    i + 1,
                    self.children[i].is_some()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            c.wait().expect("reap");
        }
    }

    /// Waits for node `i` to exit on its own; its exit status, or `None` if it still runs.
    pub async fn wait_exit(&mut self, i: usize, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.children[i].as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.children[i] = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn client(&self, i: usize) -> AdminClient {
        AdminClient::new(&self.admin[i].to_string(), Some(TOKEN.into())).expect("client")
    }

    /// Arms failpoints on node `i` at run time. A failpoint that aborts or stops the node can fire
    /// on a concurrent write before the node answers this request, so a lost answer is not an
    /// error here: callers check the effect (the exit status and the failpoint's line on stderr).
    pub async fn arm(&self, i: usize, settings: Value) {
        if let Err(e) = self.client(i).put("/v1/debug/failpoints", &settings).await {
            eprintln!(
                "arming {settings} on node {}: no answer ({e}); checking its effect instead",
                i + 1
            );
        }
    }

    /// The leader of the highest term that a majority (2 of 3) of nodes agree on, excluding `not`.
    /// A restarted node may briefly still claim an old term's leadership; a majority view is not fooled.
    pub async fn leader(&self, not: Option<u64>, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut views = Vec::new();
            for i in 0..3 {
                if self.children[i].is_some() {
                    if let Ok(v) = self.client(i).get("/v1/cluster").await {
                        views.push((i as u64 + 1, v));
                    }
                }
            }
            for (id, v) in &views {
                let term = v["term"].as_u64();
                let leads = v["state"] == "Leader" && v["leader"].as_u64() == Some(*id);
                let agree = views
                    .iter()
                    .filter(|(_, w)| w["leader"].as_u64() == Some(*id) && w["term"].as_u64() == term);
                if leads && Some(*id) != not && agree.count() >= 2 {
                    return *id;
                }
            }
            if Instant::now() >= deadline {
                panic!("no leader within {within:?}; views: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until node `i` has applied plans up to `epoch`.
    pub async fn wait_epoch(&self, i: usize, epoch: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(v) = self.client(i).get("/v1/cluster").await {
                if v["epoch"].as_u64() >= Some(epoch) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not reach epoch {epoch} within {within:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node stderr tails:\n{}", self.stderr_tails());
        }
        for i in 0..3 {
            self.kill(i);
        }
    }
}

/// The body of a node process; returns at once unless started by `Cluster::start`. Exits 1 with
/// a message on stderr when Raft stops on a fatal (storage) error, as `moeless control-plane` does.
pub fn node_main() {
    let Ok(spec) = std::env::var(NODE_ENV) else {
        return;
    };
    // Warnings and errors go to the node's stderr file, which failure messages quote.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let spec: Value = serde_json::from_str(&spec).expect("node spec");
    let id = spec["id"].as_u64().expect("id");
    let mut cfg = control_plane::NodeConfig::new(id, PathBuf::from(spec["dir"].as_str().expect("dir")));
    cfg.raft_addr = spec["raft"].as_str().expect("raft").parse().expect("raft addr");
    cfg.admin_addr = spec["admin"].as_str().expect("admin").parse().expect("admin addr");
    cfg.peers = serde_json::from_value(spec["peers"].clone()).expect("peers");
    cfg.admin_token = Some(TOKEN.into());
    cfg.heartbeat_ms = 50;
    cfg.election_timeout_ms = (200, 400);
    // Writes come only from the test.
    cfg.reconciler = false;
    cfg.storage = spec["storage"]
        .as_str()
        .unwrap_or("redb")
        .parse()
        .expect("storage kind");
    cfg.failpoints = Failpoints::from_env().expect("MOELESS_FAILPOINTS");
    cfg.initial_state = spec["initial_state"]
        .as_str()
        .unwrap_or("new")
        .parse()
        .expect("initial cluster state");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async move {
        let node = control_plane::start(cfg).await?;
        node.wait().await
    });
    if let Err(e) = result {
        eprintln!("control-plane node {id} stopped: {e}");
        std::process::exit(1);
    }
}

pub fn model() -> Value {
    json!({"name": "m", "architecture": "mixtral", "num_layers": 1, "num_experts": 2, "top_k": 1, "weights": "/w"})
}

/// A plan whose `reason` names the write, so that it can be found after restarts.
pub fn tagged_plan(tag: &str) -> Value {
    json!({"model": "m", "reason": tag, "instances": [{"layer": 0, "expert": 1, "worker": 1, "gpu": 0, "share": 1.0}]})
}

/// Registers model `m` and worker 1 (which plans place instances on) through node `i`.
pub async fn setup_model_and_worker(c: &Cluster, i: usize) {
    c.client(i)
        .post("/v1/models", Some(&model()))
        .await
        .expect("register model");
    let mut w = proto::worker::worker_service_client::WorkerServiceClient::connect(format!("http://{}", c.raft[i]))
        .await
        .expect("connect worker service");
    w.register(proto::worker::RegisterRequest {
        worker_id: 1,
        address: "127.0.0.1:9".into(),
        devices: vec![],
        memory_bytes: 1,
    })
    .await
    .expect("register worker");
}

/// Commits a tagged plan through any node that answers (followers forward to the leader);
/// the acknowledged epoch, or `None` if no node acknowledged it in time.
pub async fn write_any(clients: &[AdminClient], tag: &str, first: usize) -> Option<u64> {
    for k in 0..clients.len() {
        let client = &clients[(first + k) % clients.len()];
        let attempt = tokio::time::timeout(
            Duration::from_secs(4),
            client.post("/v1/placement", Some(&tagged_plan(tag))),
        )
        .await;
        if let Ok(Ok(r)) = attempt {
            return r["epoch"].as_u64();
        }
    }
    None
}

/// Every acknowledged (tag, epoch) is there, read linearizably on the leader `i`.
pub async fn assert_acknowledged(c: &Cluster, i: usize, acked: &[(String, u64)]) {
    let api = c.client(i);
    for (tag, epoch) in acked {
        let plan = api
            .get(&format!("/v1/placement/{epoch}"))
            .await
            .unwrap_or_else(|e| panic!("acknowledged write {tag} (epoch {epoch}) is lost: {e}"));
        assert_eq!(plan["reason"], tag.as_str(), "epoch {epoch} holds another write");
    }
}
