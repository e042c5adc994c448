//! A control-plane cluster of real `moeless control-plane` processes, and the faults the harness
//! injects into it: SIGKILL, SIGSTOP/SIGCONT, graceful stop (SIGINT), restart from disk, and
//! partitions (see `net`). Processes are killed when the cluster is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::net::Network;

pub const ADMIN_TOKEN: &str = "chaos-token";

/// Timeouts the nodes run with (the CLI's defaults, written out so a change there is visible).
#[derive(Debug, Clone)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            election_timeout_ms: (200, 400),
        }
    }
}

pub struct ControlPlane {
    binary: PathBuf,
    pub network: Network,
    raft: Vec<SocketAddr>,
    admin: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    dir: tempfile::TempDir,
    timing: RaftTiming,
    http: reqwest::Client,
}

/// `moeless certs generate`: a CA in `dir` (kept if there) and a certificate per name.
pub fn generate_certs(binary: &Path, dir: &Path, names: &[String]) -> Result<()> {
    let out = Command::new(binary)
        .args(["certs", "generate", "--out"])
        .arg(dir)
        .args(["--names", &names.join(",")])
        .output()
        .context("running moeless certs generate")?;
    if !out.status.success() {
        bail!("moeless certs generate: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    crate::ports::free_port(ip).context("binding a free port")
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// One node's view from GET /v1/cluster.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub leader: Option<u64>,
    pub term: u64,
    pub state: String,
    pub last_applied: Option<u64>,
}

impl ControlPlane {
    /// Lays out `n` nodes (not started yet).
    pub fn new(binary: &Path, n: usize, network: Network, timing: RaftTiming) -> Result<Self> {
        let mut raft = Vec::new();
        let mut admin = Vec::new();
        for i in 0..n {
            let ip = network.node_ip(i);
            // In a namespace each node has its own address, so fixed ports cannot clash.
            let (r, a) = if network.supports_partitions() {
                (7100, 7180)
            } else {
                (free_port(ip)?, free_port(ip)?)
            };
            raft.push(SocketAddr::new(ip, r));
            admin.push(SocketAddr::new(ip, a));
        }
        let http = pki::https::http_client_builder()
            .timeout(Duration::from_millis(500))
            .build()
            .context("building the HTTP client")?;
        let dir = tempfile::Builder::new().prefix("moeless-chaos-").tempdir()?;
        // Every gRPC link runs over mutual TLS, as in a deployment (nodes in namespaces have
        // addresses other than loopback, where plaintext is refused anyway).
        let names: Vec<String> = (1..=n).map(|i| format!("cp-{i}")).collect();
        generate_certs(binary, &dir.path().join("tls"), &names)?;
        Ok(Self {
            binary: binary.to_path_buf(),
            network,
            raft,
            admin,
            children: (0..n).map(|_| None).collect(),
            paused: vec![false; n],
            dir,
            timing,
            http,
        })
    }

    pub fn len(&self) -> usize {
        self.admin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admin.is_empty()
    }

    pub fn admin_addr(&self, i: usize) -> SocketAddr {
        self.admin[i]
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Starts node `i` (index from 0; its Raft id is `i + 1`) on its data directory.
    pub fn start(&mut self, i: usize) -> Result<()> {
        self.start_as(i, "new")
    }

    /// Starts node `i` with `--initial-cluster-state existing`: a blank node joining the group
    /// that is there (it never bootstraps and votes only once caught up).
    pub fn start_joining(&mut self, i: usize) -> Result<()> {
        self.start_as(i, "existing")
    }

    fn start_as(&mut self, i: usize, initial_cluster_state: &str) -> Result<()> {
        if self.children[i].is_some() {
            bail!("node {} is already running", i + 1);
        }
        let peers = self
            .raft
            .iter()
            .enumerate()
            .map(|(j, a)| format!("{}={a}", j + 1))
            .collect::<Vec<_>>()
            .join(",");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{}.log", i + 1)))
            .context("opening the node log")?;
        let mut argv = self.network.exec_prefix(i);
        argv.push(self.binary.display().to_string());
        argv.extend(
            [
                "control-plane",
                "--id",
                &(i + 1).to_string(),
                "--raft-addr",
                &self.raft[i].to_string(),
                "--admin-addr",
                &self.admin[i].to_string(),
                "--peers",
                &peers,
                "--initial-cluster-state",
                initial_cluster_state,
                "--data-dir",
                &self.dir.path().join(format!("node{}", i + 1)).display().to_string(),
                "--admin-token",
                ADMIN_TOKEN,
                "--tls-dir",
                &self.dir.path().join("tls").display().to_string(),
                "--heartbeat-ms",
                &self.timing.heartbeat_ms.to_string(),
                "--election-timeout-ms",
                &format!(
                    "{}-{}",
                    self.timing.election_timeout_ms.0, self.timing.election_timeout_ms.1
                ),
            ]
            .map(String::from),
        );
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            // The failpoint facility on, nothing armed: fsync-failure arms it over the admin API.
            .env("MOELESS_FAILPOINTS", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}: {}", i + 1, argv.join(" ")))?;
        self.children[i] = Some(child);
        self.paused[i] = false;
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.len() {
            self.start(i)?;
        }
        Ok(())
    }

    fn pid(&self, i: usize) -> Result<u32> {
        self.children[i]
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("node {} is not running", i + 1))
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused[i] = false;
    }

    /// SIGINT, the graceful stop `moeless control-plane` handles; SIGKILL after `grace`.
    pub fn stop(&mut self, i: usize, grace: Duration) -> Result<()> {
        signal(self.pid(i)?, "INT")?;
        if self.wait_exit(i, grace)?.is_some() {
            return Ok(());
        }
        self.kill(i);
        bail!("node {} did not stop within {grace:?} of SIGINT", i + 1)
    }

    /// Waits up to `within` for node `i` to exit on its own; its exit status if it did.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let Some(c) = self.children[i].as_mut() else {
                bail!("node {} is not running", i + 1);
            };
            if let Some(status) = c.try_wait()? {
                self.children[i] = None;
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(None)
    }

    /// PUTs `body` to `path` on node `i` with the admin token.
    pub async fn put(&self, i: usize, path: &str, body: &Value) -> Result<Value> {
        self.request(reqwest::Method::PUT, i, path, Some(body), Duration::from_millis(500))
            .await
    }

    /// One admin request to node `i` with the admin token; a non-2xx answer is an error.
    pub async fn request(
        &self,
        method: reqwest::Method,
        i: usize,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let url = format!("http://{}{path}", self.admin[i]);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(ADMIN_TOKEN)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("{status} from {url}: {body}");
        }
        Ok(body)
    }

    /// Deletes node `i`'s data directory (it must be stopped): it restarts as a blank node.
    pub fn wipe(&mut self, i: usize) -> Result<()> {
        if self.is_running(i) {
            bail!("node {} is running", i + 1);
        }
        let dir = self.dir.path().join(format!("node{}", i + 1));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Node `i` as the admin API's `POST /v1/members` takes it.
    pub fn member(&self, i: usize) -> Value {
        serde_json::json!({"id": i + 1, "raft_addr": self.raft[i].to_string(), "admin_addr": self.admin[i].to_string()})
    }

    /// SIGSTOP: the process is frozen, its sockets stay open.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        signal(self.pid(i)?, "STOP")?;
        self.paused[i] = true;
        Ok(())
    }

    pub fn resume(&mut self, i: usize) -> Result<()> {
        signal(self.pid(i)?, "CONT")?;
        self.paused[i] = false;
        Ok(())
    }

    pub fn set_isolated(&self, i: usize, isolated: bool) -> Result<()> {
        match &self.network {
            Network::Namespaces(n) => n.set_isolated(i, isolated),
            Network::Loopback => bail!("partitions need network namespaces (run as root)"),
        }
    }

    /// GET `path` on the first node that answers it.
    pub async fn get_any(&self, path: &str) -> Option<Value> {
        for i in 0..self.len() {
            if let Ok(v) = self.get(i, path).await {
                return Some(v);
            }
        }
        None
    }

    /// GET `path` on node `i` with the admin token.
    pub async fn get(&self, i: usize, path: &str) -> Result<Value> {
        let url = format!("http://{}{path}", self.admin[i]);
        let resp = self.http.get(&url).bearer_auth(ADMIN_TOKEN).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("{status} from {url}: {body}");
        }
        Ok(body)
    }

    pub async fn view(&self, i: usize) -> Option<NodeView> {
        let v = self.get(i, "/v1/cluster").await.ok()?;
        Some(NodeView {
            leader: v["leader"].as_u64(),
            term: v["term"].as_u64()?,
            state: v["state"].as_str()?.to_string(),
            last_applied: v["last_applied"].as_u64(),
        })
    }

    /// The leader (index) that a majority of the running nodes agree on in its term, if any.
    pub async fn leader(&self) -> Option<usize> {
        let mut views = Vec::new();
        for i in 0..self.len() {
            if self.is_running(i) && !self.paused[i] {
                if let Some(v) = self.view(i).await {
                    views.push((i, v));
                }
            }
        }
        let majority = self.len() / 2 + 1;
        views.iter().find_map(|(i, v)| {
            let id = *i as u64 + 1;
            let leads = v.state == "Leader" && v.leader == Some(id);
            let agree = views
                .iter()
                .filter(|(_, w)| w.leader == Some(id) && w.term == v.term)
                .count();
            (leads && agree >= majority).then_some(*i)
        })
    }

    pub async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {within:?} (logs in {})", self.dir.path().display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True when every node runs, answers, follows one leader in one term and has applied the
    /// same log index.
    pub async fn converged(&self) -> bool {
        let mut views = Vec::new();
        for i in 0..self.len() {
            if !self.is_running(i) || self.paused[i] {
                return false;
            }
            match self.view(i).await {
                Some(v) => views.push(v),
                None => return false,
            }
        }
        let first = &views[0];
        first.leader.is_some()
            && views
                .iter()
                .all(|v| v.leader == first.leader && v.term == first.term && v.last_applied == first.last_applied)
    }

    /// Waits for `converged`; returns how long it took.
    pub async fn wait_converged(&self, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if self.converged().await {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!(
                    "cluster did not converge within {within:?} (logs in {})",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The nodes' gRPC addresses (what workers and engines dial).
    pub fn raft_addrs(&self) -> Vec<SocketAddr> {
        self.raft.clone()
    }

    /// Where `moeless certs generate` put the cluster's CA and certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Per node, its Raft id and admin address (for clients).
    pub fn admin_addrs(&self) -> BTreeMap<usize, SocketAddr> {
        self.admin.iter().copied().enumerate().collect()
    }

    /// Keeps the data directory and logs after the run (for a failed scenario).
    pub fn keep_logs(&mut self) -> PathBuf {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        dir.keep()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for i in 0..self.len() {
            if self.paused[i] {
                if let Ok(pid) = self.pid(i) {
                    let _ = signal(pid, "CONT");
                }
            }
            self.kill(i);
        }
    }
}
