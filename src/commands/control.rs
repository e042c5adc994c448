//! `moeless control-plane` (run a node) and `moeless admin ...` (the admin REST API from a shell).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use control_plane::client::AdminClient;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct ControlPlaneArgs {
    /// This node's Raft id (non-zero).
    #[arg(long, env = "MOELESS_NODE_ID", default_value_t = 1)]
    pub id: u64,
    /// gRPC address for Raft peers, workers and engines.
    #[arg(long, env = "MOELESS_RAFT_ADDR", default_value = "127.0.0.1:7100")]
    pub raft_addr: SocketAddr,
    /// Admin REST API address (loopback unless told otherwise).
    #[arg(long, env = "MOELESS_ADMIN_ADDR", default_value = "127.0.0.1:7180")]
    pub admin_addr: SocketAddr,
    /// Voters as ID=HOST:PORT,... (this node included); none means a single-node group.
    #[arg(long, env = "MOELESS_PEERS", default_value = "")]
    pub peers: String,
    /// Directory of the durable Raft store.
    #[arg(long, env = "MOELESS_DATA_DIR", default_value = "moeless-data")]
    pub data_dir: PathBuf,
    /// Storage backend of the Raft log, vote and state machine: redb (default), wal (append-only
    /// preallocated segments, the lowest commit latency) or sled.
    /// A data directory keeps the backend it was created with.
    #[arg(long, env = "MOELESS_STORAGE", default_value = "redb")]
    pub storage: control_plane::StorageKind,
    /// How a node with an empty data directory starts: `new` (the lowest-numbered peer bootstraps
    /// the group, and refuses to if a peer already belongs to one) or `existing` (join the group
    /// that is there: never bootstrap, vote only once caught up; for a node added through
    /// `moeless admin add-member`, or one whose disk was replaced, after `remove-member` and `add-member`).
    #[arg(long, env = "MOELESS_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: control_plane::InitialClusterState,
    /// Bearer token required by the admin API (every route but /health).
    #[arg(long, env = "MOELESS_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Election timeout range in milliseconds, MIN-MAX.
    #[arg(long, default_value = "200-400")]
    pub election_timeout_ms: String,
    /// A worker without a heartbeat for this many milliseconds is dead and its instances are re-placed.
    #[arg(long, env = "MOELESS_WORKER_TIMEOUT_MS", default_value_t = 1000)]
    pub worker_timeout_ms: u64,
    /// Directory of PEM files from `moeless certs generate`: mutual TLS on the gRPC listener
    /// (clients must present a certificate from DIR/ca.pem) and to Raft peers, as DIR/NAME.pem.
    /// Without it, gRPC is plaintext and allowed only on loopback (see --insecure).
    #[arg(long, env = "MOELESS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve the admin REST API over HTTPS with this node's certificate from --tls-dir (the one
    /// gRPC uses; it names localhost, 127.0.0.1, ::1 and the --san names it was generated with).
    /// Clients trust DIR/ca.pem: `moeless admin --ca-file DIR/ca.pem`, `curl --cacert`.
    #[arg(long, env = "MOELESS_ADMIN_HTTPS", requires = "tls_dir")]
    pub admin_https: bool,
    /// This node's certificate name in --tls-dir [default: cp-ID].
    #[arg(long, env = "MOELESS_TLS_NAME")]
    pub tls_name: Option<String>,
    /// Accept plaintext gRPC (no --tls-dir) on addresses other than loopback, and an admin API
    /// off loopback without --admin-token.
    #[arg(long, env = "MOELESS_INSECURE")]
    pub insecure: bool,
}

fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("peer id {id:?} is not an integer"))?;
        let addr = addr.trim();
        // An IP or a DNS name (a Kubernetes pod's stable name): resolved when dialled.
        if !control_plane::is_host_port(addr) {
            bail!("peer address {addr:?} is not HOST:PORT");
        }
        if peers.insert(id, addr.to_string()).is_some() {
            bail!("peer id {id} appears twice");
        }
    }
    Ok(peers)
}

fn parse_range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s.split_once('-').with_context(|| format!("{s:?} is not MIN-MAX"))?;
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    if a == 0 || a >= b {
        bail!("election timeout range {s:?} needs 0 < MIN < MAX");
    }
    Ok((a, b))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn control_plane(a: ControlPlaneArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if a.id == 0 {
        bail!("--id must be non-zero");
    }
    let peers = parse_peers(&a.peers)?;
    if !peers.is_empty() && !peers.contains_key(&a.id) {
        bail!("--peers must include this node ({})", a.id);
    }
    let mut config = control_plane::NodeConfig::new(a.id, a.data_dir);
    config.raft_addr = a.raft_addr;
    config.admin_addr = a.admin_addr;
    config.peers = peers;
    config.admin_token = a.admin_token.filter(|t| !t.is_empty());
    config.heartbeat_ms = a.heartbeat_ms;
    if a.worker_timeout_ms == 0 {
        bail!("--worker-timeout-ms must be non-zero");
    }
    config.worker_timeout_ms = a.worker_timeout_ms;
    config.election_timeout_ms = parse_range(&a.election_timeout_ms)?;
    config.storage = a.storage;
    config.initial_state = a.initial_cluster_state;
    // MOELESS_FAILPOINTS (fault injection, see control_plane::failpoint); unset in production.
    config.failpoints = control_plane::Failpoints::from_env().context("reading MOELESS_FAILPOINTS")?;
    if config.failpoints.is_enabled() {
        tracing::warn!(armed = ?config.failpoints.list(), "failpoints enabled");
    }
    let tls_name = a.tls_name.clone().unwrap_or_else(|| format!("cp-{}", a.id));
    if let (true, Some(dir)) = (a.admin_https, &a.tls_dir) {
        config.admin_tls = Some(crate::commands::tls::load_https(dir, &tls_name)?);
    }
    config.tls = match &a.tls_dir {
        Some(dir) => Some(crate::commands::tls::load(dir, &tls_name)?),
        None => {
            let raft_addr = a.raft_addr.to_string();
            let addrs = std::iter::once(raft_addr.as_str()).chain(config.peers.values().map(String::as_str));
            crate::commands::tls::check_plaintext("gRPC (Raft, workers, engines)", addrs, a.insecure)?;
            None
        }
    };
    if config.admin_token.is_none() {
        crate::commands::tls::check_admin_open(a.admin_addr, a.insecure)?;
    }
    runtime()?.block_on(async move {
        let node = control_plane::start(config)
            .await
            .context("starting the control-plane node")?;
        // One line on stdout for scripts and tests: where this node listens.
        println!(
            "{}",
            json!({"event": "listening", "id": a.id, "raft_addr": node.raft_addr, "admin_addr": node.admin_addr})
        );
        let fatal = node.fatal();
        tokio::select! {
            _ = super::signals::wait_for_signal() => {
                eprintln!("stopping: handing leadership over first");
                node.stop_gracefully(Duration::from_secs(3)).await;
            }
            // A node that can no longer persist must not go on answering: exit non-zero so a
            // supervisor restarts it, and it recovers from what its disk holds.
            e = fatal => return Err(anyhow::Error::from(e).context(format!("control-plane node {} stopped", a.id))),
        }
        Ok(())
    })
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Admin API address of any control-plane node.
    #[arg(long, env = "MOELESS_ADMIN_ADDR", default_value = "127.0.0.1:7180", global = true)]
    pub addr: String,
    #[arg(long, env = "MOELESS_ADMIN_TOKEN", global = true)]
    pub token: Option<String>,
    /// HTTPS to a node started with --admin-https, trusting only this CA certificate (PEM,
    /// DIR/ca.pem of `moeless certs generate`).
    #[arg(long, env = "MOELESS_ADMIN_CA", global = true)]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Leader, term and members.
    Cluster,
    /// Liveness of the node.
    Health,
    /// Show the policy, or replace it with --set JSON.
    Policy {
        #[arg(long)]
        set: Option<String>,
    },
    /// The latest plan, the latest of one model with --model, or the one with --epoch.
    Placement {
        #[arg(long, conflicts_with = "model")]
        epoch: Option<u64>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Commit a plan given as JSON ({"model", "instances": [...], "expected_epoch"?}).
    CommitPlan { json: String },
    /// Registered workers.
    Workers,
    /// Mark a worker draining.
    Drain { worker: u64 },
    /// Registered models.
    Models,
    /// Register a model given as JSON.
    AddModel { json: String },
    /// Predictor state.
    Predictor,
    /// Run the placement policy now.
    Rebalance,
    /// The cost ledger.
    Cost,
    /// Add a voter.
    AddMember {
        id: u64,
        raft_addr: String,
        #[arg(long, default_value = "")]
        admin_addr: String,
    },
    /// Remove a voter.
    RemoveMember { id: u64 },
}

fn json_arg(s: &str) -> anyhow::Result<Value> {
    serde_json::from_str(s).with_context(|| format!("argument is not JSON: {s}"))
}

pub fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::with_ca(&a.addr, a.token.filter(|t| !t.is_empty()), a.ca_file.as_deref())?;
    let out = runtime()?.block_on(async move {
        match a.command {
            AdminCommand::Cluster => client.get("/v1/cluster").await,
            AdminCommand::Health => client.get("/health").await,
            AdminCommand::Policy { set: None } => client.get("/v1/policy").await,
            AdminCommand::Policy { set: Some(s) } => client.put("/v1/policy", &json_arg(&s)?).await,
            AdminCommand::Placement {
                epoch: None,
                model: None,
            } => client.get("/v1/placement").await,
            AdminCommand::Placement {
                epoch: None,
                model: Some(m),
            } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("model", &m);
                client.get(&format!("/v1/placement?{}", query.finish())).await
            }
            AdminCommand::Placement { epoch: Some(e), .. } => client.get(&format!("/v1/placement/{e}")).await,
            AdminCommand::CommitPlan { json } => client.post("/v1/placement", Some(&json_arg(&json)?)).await,
            AdminCommand::Workers => client.get("/v1/workers").await,
            AdminCommand::Drain { worker } => client.post(&format!("/v1/workers/{worker}/drain"), None).await,
            AdminCommand::Models => client.get("/v1/models").await,
            AdminCommand::AddModel { json } => client.post("/v1/models", Some(&json_arg(&json)?)).await,
            AdminCommand::Predictor => client.get("/v1/predictor").await,
            AdminCommand::Rebalance => client.post("/v1/rebalance", None).await,
            AdminCommand::Cost => client.get("/v1/cost").await,
            AdminCommand::AddMember {
                id,
                raft_addr,
                admin_addr,
            } => {
                let body = json!({"id": id, "raft_addr": raft_addr, "admin_addr": admin_addr});
                client.post("/v1/members", Some(&body)).await
            }
            AdminCommand::RemoveMember { id } => client.delete(&format!("/v1/members/{id}")).await,
        }
        .map_err(anyhow::Error::from)
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:1, 2=127.0.0.1:2").unwrap();
        assert_eq!(p.len(), 2);
        assert!(parse_peers("1=nope").is_err());
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").is_err());
        assert!(parse_peers("").unwrap().is_empty());
        // Kubernetes: stable pod names behind a headless service.
        let p = parse_peers("1=moeless-cp-0.moeless-cp:7100,2=[::1]:7100").unwrap();
        assert_eq!(p[&1], "moeless-cp-0.moeless-cp:7100");
        for bad in ["1=:7100", "1=host:0", "1=host:port", "1=host", "1=a b:1"] {
            assert!(parse_peers(bad).is_err(), "{bad}");
        }
        assert!(parse_range("400-800").is_ok());
        assert!(parse_range("800-400").is_err());
    }
}
