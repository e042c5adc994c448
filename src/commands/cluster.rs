//! A local cluster as separate processes: an in-process single-node control plane, N
//! `moeless worker` child processes, certificates for mutual TLS, and helpers to register a
//! model and commit placement plans. Used by `forward/generate --workers N` and `up --workers N`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use control_plane::state::{ExpertInstance, ModelSpec, PlanIntent, PlanOrigin};
use control_plane::types::{Command as CpCommand, CommandResponse};
use data_plane::config::{FfnKind, ModelConfig};
use transport::{Identity, TlsFiles};
use worker::remote::{RemoteExperts, RemoteOptions};

const WRITE_WAIT: Duration = Duration::from_secs(5);

/// How experts are placed on the local workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanKind {
    /// Every expert once, round-robin over workers (static expert parallelism).
    Static,
    /// Every expert split over two workers with uneven shares; the placement shifts with each
    /// new plan (exercises replication and plan changes).
    Rotate,
}

pub struct LocalCluster {
    pub runtime: tokio::runtime::Runtime,
    node: Option<control_plane::RunningNode>,
    pub control_addr: String,
    workers: Vec<Option<Child>>,
    pub worker_ids: Vec<u64>,
    pub dir: tempfile::TempDir,
    pub model: String,
    config: ModelConfig,
}

fn moe_keys(config: &ModelConfig) -> Vec<(u32, u32)> {
    (0..config.num_layers)
        .filter(|&l| config.layer_ffn[l] == FfnKind::Moe)
        .flat_map(|l| (0..config.moe.num_experts).map(move |e| (l as u32, e as u32)))
        .collect()
}

impl LocalCluster {
    /// Starts the control plane and `n` workers for the checkpoint in `model_dir`, registers
    /// the model, and waits until every worker has registered. `threads`: each worker's compute
    /// threads (0 = all cores).
    pub fn start(
        n: usize,
        model_dir: &Path,
        config: &ModelConfig,
        worker_memory_gb: f64,
        device: &str,
        threads: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(n >= 1, "--workers must be at least 1");
        let mut dir = tempfile::Builder::new().prefix("moeless-cluster").tempdir()?;
        // Keep certificates, the Raft store and worker logs for a post-mortem.
        if std::env::var_os("MOELESS_KEEP_CLUSTER_DIR").is_some() {
            dir.disable_cleanup(true);
        }
        let names: Vec<String> = ["engine", "control-plane"]
            .into_iter()
            .map(String::from)
            .chain((1..=n).map(|i| format!("worker-{i}")))
            .collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        transport::generate(&dir.path().join("tls"), &name_refs, &[]).context("generating certificates")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut cp_config = control_plane::NodeConfig::new(1, dir.path().join("control-plane"));
        // Workers and the engine reach the control plane over mutual TLS too.
        cp_config.tls = Some(crate::commands::tls::load(&dir.path().join("tls"), "control-plane")?);
        let node = runtime.block_on(control_plane::start(cp_config))?;
        let control_addr = node.raft_addr.to_string();
        let model_dir = std::fs::canonicalize(model_dir)
            .with_context(|| format!("resolving model directory {}", model_dir.display()))?;
        let model = model_dir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        let spec = ModelSpec {
            name: model.clone(),
            architecture: config.arch.model_type().to_string(),
            num_layers: config.num_layers as u32,
            num_experts: config.moe.num_experts as u32,
            top_k: config.moe.top_k as u32,
            weights: model_dir.to_string_lossy().into_owned(),
        };
        let n_ = node.node.clone();
        runtime.block_on(async move {
            // The single node elects itself; writes before that are retried inside `write`.
            n_.write(CpCommand::PutModel(spec), Duration::from_secs(10)).await
        })?;
        let exe = std::env::current_exe().context("locating the moeless executable")?;
        let mut workers = Vec::new();
        let mut worker_ids = Vec::new();
        for i in 1..=n {
            let log = std::fs::File::create(dir.path().join(format!("worker-{i}.log")))?;
            let child = Command::new(&exe)
                .args(["worker", "--id", &i.to_string(), "--control", &control_addr])
                .args(["--listen", "127.0.0.1:0", "--heartbeat-ms", "50"])
                .arg("--memory-gb")
                .arg(worker_memory_gb.to_string())
                .arg("--tls-dir")
                .arg(dir.path().join("tls"))
                .args(["--tls-name", &format!("worker-{i}"), "--exit-on-stdin-close"])
                .args(["--device", device])
                .args(["--threads", &threads.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting a worker process")?;
            workers.push(Some(child));
            worker_ids.push(i as u64);
        }
        let me = Self {
            runtime,
            node: Some(node),
            control_addr,
            workers,
            worker_ids,
            dir,
            model,
            config: config.clone(),
        };
        me.wait_registered(n, Duration::from_secs(60))?;
        Ok(me)
    }

    fn node(&self) -> anyhow::Result<&control_plane::Node> {
        Ok(&self.node.as_ref().context("control plane stopped")?.node)
    }

    fn wait_registered(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let node = self.node()?.clone();
        loop {
            let count = self.runtime.block_on(node.state_machine().read(|s| s.workers.len()));
            if count >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {count} of {n} workers registered within {timeout:?}; see the logs in {}",
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The instances of a plan of `kind`; `round` shifts a rotating placement.
    pub fn plan(&self, kind: PlanKind, round: usize) -> Vec<ExpertInstance> {
        let ids = &self.worker_ids;
        let n = ids.len();
        let mut out = Vec::new();
        for (idx, (layer, expert)) in moe_keys(&self.config).into_iter().enumerate() {
            let first = (idx + round) % n;
            match kind {
                PlanKind::Static => out.push(ExpertInstance {
                    layer,
                    expert,
                    worker: ids[idx % n],
                    gpu: 0,
                    share: 1.0,
                }),
                PlanKind::Rotate if n == 1 => {
                    // Two replicas on the one worker still exercise the uneven split.
                    for share in [0.7, 0.3] {
                        out.push(ExpertInstance {
                            layer,
                            expert,
                            worker: ids[0],
                            gpu: 0,
                            share,
                        });
                    }
                }
                PlanKind::Rotate => {
                    for (k, share) in [(0, 0.7), (1, 0.3)] {
                        out.push(ExpertInstance {
                            layer,
                            expert,
                            worker: ids[(first + k) % n],
                            gpu: 0,
                            share,
                        });
                    }
                }
            }
        }
        out
    }

    /// Commits a plan; returns its epoch.
    pub fn commit(&self, instances: Vec<ExpertInstance>, reason: &str) -> anyhow::Result<u64> {
        let intent = PlanIntent {
            model: self.model.clone(),
            instances,
            reason: reason.into(),
            origin: PlanOrigin::Operator,
        };
        let node = self.node()?.clone();
        let (_, resp) = self.runtime.block_on(node.write(
            CpCommand::CommitPlan {
                intent,
                expected_epoch: None,
            },
            WRITE_WAIT,
        ))?;
        match resp {
            CommandResponse::PlanCommitted { epoch } => Ok(epoch),
            other => bail!("plan not committed: {other:?}"),
        }
    }

    fn engine_identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::load(&TlsFiles::in_dir(
            &self.dir.path().join("tls"),
            "engine",
        ))?)
    }

    /// The engine's remote expert function, once the current plan is active.
    pub fn remote(&self) -> anyhow::Result<Arc<RemoteExperts>> {
        let mut opts = RemoteOptions::new(vec![self.control_addr.clone()], self.model.clone());
        opts.control_tls = Some(crate::commands::tls::load(&self.dir.path().join("tls"), "engine")?);
        RemoteExperts::connect(opts, &self.engine_identity()?, None, Duration::from_secs(120))
    }

    /// SIGKILLs worker `i` (0-based).
    pub fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.workers.get_mut(i).and_then(Option::take) {
            c.kill()?;
            let _ = c.wait();
        }
        Ok(())
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(node) = self.node.take() {
            self.runtime.block_on(node.shutdown());
        }
    }
}

/// An engine whose routed experts run on a fresh local cluster of `workers` processes, reading
/// weights from `dir`, with the first plan of `kind` active.
pub fn distributed_engine(
    dir: &Path,
    workers: usize,
    kind: PlanKind,
    worker_memory_gb: f64,
    backend: Arc<dyn data_plane::backend::Backend>,
) -> anyhow::Result<(data_plane::engine::Engine, LocalCluster, Arc<RemoteExperts>)> {
    let config = data_plane::engine::read_config(dir)?;
    // Workers compute where the engine does.
    let cluster = LocalCluster::start(workers, dir, &config, worker_memory_gb, backend.name(), 0)?;
    let epoch = cluster.commit(cluster.plan(kind, 0), "local cluster")?;
    eprintln!(
        "local cluster: {workers} worker processes, plan epoch {epoch} ({kind:?}); logs in {}",
        cluster.log_dir().display()
    );
    let remote = cluster.remote()?;
    anyhow::ensure!(
        remote.wait_active(epoch, Duration::from_secs(120)),
        "plan {epoch} did not become active"
    );
    let ckpt = data_plane::checkpoint::Checkpoint::open(dir)?;
    let model = data_plane::model::Model::load(&ckpt, config, backend)?;
    let engine = data_plane::engine::Engine::new(Arc::new(model), remote.clone(), remote.clone());
    Ok((engine, cluster, remote))
}

/// Where an engine finds an external cluster (`serve --control`).
pub struct ExternalCluster<'a> {
    /// Control-plane gRPC addresses (any or all voters).
    pub control: Vec<String>,
    /// Mutual TLS to the control plane (`None`: plaintext, checked by the caller).
    pub control_tls: Option<pki::grpc::GrpcTls>,
    /// The engine's TLS identity: DIR/ca.pem, DIR/NAME.pem, DIR/NAME.key.
    pub tls_dir: &'a Path,
    pub tls_name: &'a str,
    /// The model name plans and workers use.
    pub model: String,
    /// Where workers read the expert weights (default: this engine's checkpoint directory).
    pub worker_weights: Option<String>,
    /// How long to wait for the control plane and a first active plan.
    pub wait: Duration,
}

/// An engine whose routed experts run on the workers of an external cluster: registers the
/// model with its control plane (idempotent), then follows the plans the control plane commits
/// for it (the reconciler places a new model on the live workers).
pub fn external_engine(
    dir: &Path,
    ext: ExternalCluster<'_>,
    backend: Arc<dyn data_plane::backend::Backend>,
) -> anyhow::Result<(data_plane::engine::Engine, Arc<RemoteExperts>)> {
    anyhow::ensure!(!ext.control.is_empty(), "--control needs at least one address");
    let config = data_plane::engine::read_config(dir)?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("resolving model directory {}", dir.display()))?;
    let identity = Identity::load(&TlsFiles::in_dir(ext.tls_dir, ext.tls_name)).context("loading the TLS identity")?;
    let request = proto::engine::RegisterModelRequest {
        name: ext.model.clone(),
        architecture: config.arch.model_type().to_string(),
        num_layers: config.num_layers as u32,
        num_experts: config.moe.num_experts as u32,
        top_k: config.moe.top_k as u32,
        weights: ext
            .worker_weights
            .clone()
            .unwrap_or_else(|| dir.to_string_lossy().into_owned()),
    };
    let client = worker::control::ControlClient::new(ext.control.clone(), ext.control_tls.clone());
    let deadline = Instant::now() + ext.wait;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let created = rt.block_on(async {
        loop {
            let attempt = async {
                client
                    .engine()
                    .await?
                    .register_model(request.clone())
                    .await
                    .map_err(anyhow::Error::from)
            };
            match attempt.await {
                Ok(r) => return anyhow::Ok(r.into_inner().created),
                // A shape conflict will not go away by retrying.
                Err(e)
                    if e.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::FailedPrecondition) =>
                {
                    return Err(e.context("registering the model"));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("registering the model with {:?}", ext.control)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registering the model; retrying");
                    client.rotate();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })?;
    eprintln!(
        "control plane {:?}: model `{}` {}; waiting for its placement plan",
        ext.control,
        ext.model,
        if created { "registered" } else { "already registered" }
    );
    let mut opts = RemoteOptions::new(ext.control.clone(), ext.model.clone());
    opts.control_tls = ext.control_tls;
    let remote = RemoteExperts::connect(
        opts,
        &identity,
        None,
        deadline.saturating_duration_since(Instant::now()),
    )?;
    eprintln!("plan epoch {} active", remote.active_epoch());
    let ckpt = data_plane::checkpoint::Checkpoint::open(&dir)?;
    let model = data_plane::model::Model::load(&ckpt, config, backend)?;
    let engine = data_plane::engine::Engine::new(Arc::new(model), remote.clone(), remote.clone());
    Ok((engine, remote))
}
