//! `moeless worker` (a data-plane worker process) and `moeless certs` (a local CA and node
//! certificates for mutual TLS between planes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use transport::{Identity, Limits, TlsFiles};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// This worker's id (non-zero, unique in the cluster).
    #[arg(long, env = "MOELESS_WORKER_ID")]
    pub id: u64,
    /// Control-plane gRPC addresses, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "MOELESS_CONTROL", value_delimiter = ',', required = true)]
    pub control: Vec<String>,
    /// QUIC address for activation exchange (port 0 picks one).
    #[arg(long, env = "MOELESS_WORKER_LISTEN", default_value = "127.0.0.1:7300")]
    pub listen: SocketAddr,
    /// Address engines and peers dial, when it differs from the listen address.
    #[arg(long, env = "MOELESS_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where expert instances compute: auto (GPU 0 when CUDA is usable, else CPU), cpu, cuda,
    /// cuda:N.
    #[arg(long, env = "MOELESS_DEVICE", default_value = "auto")]
    pub device: String,
    /// Memory budget for expert instances, in GiB.
    #[arg(long, env = "MOELESS_WORKER_MEMORY_GB", default_value_t = 4.0)]
    pub memory_gb: f64,
    /// Compute threads for expert work (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// How long an instance the plan no longer wants stays warm, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub keep_alive_ms: u64,
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// Read weights only from the weight store, never from peers holding the expert warm.
    #[arg(long)]
    pub no_peer_fetch: bool,
    /// Directory of PEM files from `moeless certs generate`; with --tls-name, selects
    /// DIR/ca.pem, DIR/NAME.pem and DIR/NAME.key.
    #[arg(long, env = "MOELESS_TLS_DIR")]
    pub tls_dir: PathBuf,
    #[arg(long, env = "MOELESS_TLS_NAME")]
    pub tls_name: String,
    /// On SIGTERM or Ctrl-C: how long a graceful drain may take (instances move to other
    /// workers, engines stop sending here) before the worker exits anyway. A second signal
    /// exits at once.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// Talk to the control plane in plaintext (one started without --tls-dir); refused unless
    /// every --control address is loopback or --insecure is given. Otherwise the control-plane
    /// link uses mutual TLS with the --tls-dir certificate, like the QUIC links.
    #[arg(long, env = "MOELESS_CONTROL_PLAINTEXT")]
    pub control_plaintext: bool,
    /// Accept --control-plaintext to control-plane addresses other than loopback.
    #[arg(long, env = "MOELESS_INSECURE")]
    pub insecure: bool,
    /// Exit when standard input closes (a local cluster's parent holds the other end, so its
    /// workers do not outlive it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_close: bool,
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let device = data_plane::device::select(&a.device)?;
    eprintln!("device: {} (expert instances compute here)", device.description);
    if !(a.memory_gb > 0.0 && a.memory_gb.is_finite()) {
        bail!("--memory-gb must be a positive number");
    }
    let identity = Identity::load(&TlsFiles::in_dir(&a.tls_dir, &a.tls_name)).context("loading TLS identity")?;
    let control_tls = if a.control_plaintext {
        crate::commands::tls::check_plaintext("control-plane gRPC", a.control.iter().map(String::as_str), a.insecure)?;
        None
    } else {
        Some(crate::commands::tls::load(&a.tls_dir, &a.tls_name)?)
    };
    let exit_on_stdin_close = a.exit_on_stdin_close;
    let drain_timeout = Duration::from_millis(a.drain_timeout_ms);
    let opts = worker::WorkerOptions {
        id: a.id,
        control: a.control,
        listen: a.listen,
        advertise: a.advertise,
        memory_bytes: (a.memory_gb * (1u64 << 30) as f64) as u64,
        threads: a.threads,
        keep_alive: Duration::from_millis(a.keep_alive_ms),
        heartbeat: Duration::from_millis(a.heartbeat_ms.max(10)),
        peer_fetch: !a.no_peer_fetch,
        limits: Limits::default(),
        control_tls,
        backend: device.backend,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let running = worker::start(opts, &identity).await?;
        eprintln!("worker listening on {} (QUIC)", running.addr);
        let parent_gone = async {
            if exit_on_stdin_close {
                use tokio::io::AsyncReadExt;
                let mut sink = Vec::new();
                let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let mut terminate = super::signals::terminate_signal()?;
        let graceful = tokio::select! {
            _ = terminate.recv() => true,
            _ = parent_gone => {
                eprintln!("parent closed stdin: exiting");
                false
            }
        };
        if graceful {
            eprintln!("draining (a second signal exits at once)");
            tokio::select! {
                outcome = running.drain(Duration::from_secs(1), drain_timeout) => match outcome {
                    worker::DrainOutcome::Drained => eprintln!("drained: exiting"),
                    worker::DrainOutcome::TimedOut { why } => eprintln!("drain timed out ({why}): exiting"),
                },
                _ = terminate.recv() => eprintln!("second signal: exiting without draining"),
            }
        }
        running.shutdown().await;
        anyhow::Ok(())
    })
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Creates a CA (DIR/ca.pem, DIR/ca.key) if absent and a certificate per node name.
    Generate {
        #[arg(long)]
        out: PathBuf,
        /// Node names, comma-separated (e.g. cp-1,cp-2,worker-1,engine).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Extra subject alternative names (host names or IPs) for every node certificate.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
    },
}

pub fn certs(c: CertsCommand) -> anyhow::Result<()> {
    match c {
        CertsCommand::Generate { out, names, san } => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            transport::generate(&out, &refs, &san)?;
            eprintln!("wrote a CA and {} node certificates to {}", names.len(), out.display());
            Ok(())
        }
    }
}
