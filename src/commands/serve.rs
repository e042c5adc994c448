//! `moeless serve` and `moeless up`: the OpenAI-compatible endpoint over the engine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use data_plane::engine::Engine;
use endpoint::{ServeConfig, Server, TextTokenizer};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face checkpoint directory. `up` without it serves the built-in random-weight
    /// model with a byte-level tokenizer (its output is not meaningful text).
    #[arg(long, env = "MOELESS_MODEL")]
    pub model: Option<PathBuf>,
    /// Directory holding tokenizer.json (+ tokenizer_config.json); defaults to --model. Without
    /// one, only token-id prompts are accepted and no text is returned.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model id clients send and /v1/models lists (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Where the engine's tensor math runs: auto (GPU 0 when CUDA is usable, else CPU), cpu,
    /// cuda, cuda:N.
    #[arg(long, env = "MOELESS_DEVICE", default_value = "auto")]
    pub device: String,
    #[arg(long, env = "MOELESS_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "MOELESS_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every route except /health.
    #[arg(long, env = "MOELESS_API_KEY")]
    pub api_key: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --ssl-keyfile (vLLM's names).
    #[arg(long, env = "MOELESS_SSL_CERTFILE", requires = "ssl_keyfile")]
    pub ssl_certfile: Option<PathBuf>,
    /// The private key (PEM) of --ssl-certfile.
    #[arg(long, env = "MOELESS_SSL_KEYFILE", requires = "ssl_certfile")]
    pub ssl_keyfile: Option<PathBuf>,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Sequences waiting for their first step before new requests get 429.
    #[arg(long, default_value_t = 1024)]
    pub max_queued: usize,
    /// Prompt plus completion tokens at most (default: the model's maximum positions).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Tokens per engine step (prefill chunks and decode tokens together).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// KV cache blocks (default: as many as --kv-cache-gib holds).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[arg(long, default_value_t = 2.0)]
    pub kv_cache_gib: f64,
    /// Recompute every prompt in full instead of reusing the cached KV blocks of prefixes
    /// other requests already computed (vLLM's flag).
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM before they are aborted.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Run every routed expert on N local worker processes over QUIC, with a local control
    /// plane (0: experts in this process).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub workers: u64,
    /// Placement of experts on the workers.
    #[arg(long, value_enum, default_value = "static")]
    pub plan: super::cluster::PlanKind,
    /// Memory budget of each worker for expert instances, in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub worker_memory_gb: f64,
    /// Run the routed experts on the workers of an external cluster: its control-plane gRPC
    /// addresses, HOST:PORT[,HOST:PORT...]. The model is registered there and served on the
    /// plans its control plane commits. Needs --tls-dir; `up` without --model serves the
    /// built-in model from a temporary directory (for workers on this machine).
    #[arg(long, env = "MOELESS_CONTROL", value_delimiter = ',', conflicts_with = "workers")]
    pub control: Vec<String>,
    /// With --control: directory of PEM files from `moeless certs generate`.
    #[arg(long, env = "MOELESS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --control: this engine's certificate name in --tls-dir.
    #[arg(long, env = "MOELESS_TLS_NAME", default_value = "engine")]
    pub tls_name: String,
    /// With --control: the checkpoint path as the workers see it (default: --model, resolved).
    #[arg(long, env = "MOELESS_WORKER_WEIGHTS")]
    pub worker_weights: Option<PathBuf>,
    /// With --control: how long to wait for the control plane and a first placement plan.
    #[arg(long, default_value_t = 120)]
    pub cluster_wait_s: u64,
    /// With --control: talk to a control plane started without --tls-dir in plaintext;
    /// refused unless every --control address is loopback or --insecure is given.
    #[arg(long, env = "MOELESS_CONTROL_PLAINTEXT")]
    pub control_plaintext: bool,
    /// Accept --control-plaintext to control-plane addresses other than loopback.
    #[arg(long, env = "MOELESS_INSECURE")]
    pub insecure: bool,
}

/// `require_model`: `serve` needs --model; `up` falls back to the built-in model.
pub fn serve(args: ServeArgs, require_model: bool) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // With --workers: the local cluster lives as long as the server.
    let mut cluster = None;
    let mut builtin_dir = None;
    let model_name = args.served_model_name.clone().or_else(|| {
        args.model
            .as_ref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    });
    let mut external = None;
    let device = data_plane::device::select(&args.device)?;
    eprintln!("device: {}", device.description);
    let backend = device.backend;
    let mut load = |dir: &std::path::Path| -> anyhow::Result<Engine> {
        if !args.control.is_empty() {
            let tls_dir = args
                .tls_dir
                .as_deref()
                .context("--control needs --tls-dir (the engine's certificate for mutual TLS)")?;
            let control_tls = if args.control_plaintext {
                let addrs = args.control.iter().map(String::as_str);
                super::tls::check_plaintext("control-plane gRPC", addrs, args.insecure)?;
                None
            } else {
                Some(super::tls::load(tls_dir, &args.tls_name)?)
            };
            let ext = super::cluster::ExternalCluster {
                control: args.control.clone(),
                control_tls,
                tls_dir,
                tls_name: &args.tls_name,
                model: model_name.clone().unwrap_or_else(|| "moeless".into()),
                worker_weights: args.worker_weights.as_ref().map(|p| p.to_string_lossy().into_owned()),
                wait: Duration::from_secs(args.cluster_wait_s),
            };
            let (engine, remote) = super::cluster::external_engine(dir, ext, backend.clone())?;
            external = Some(remote);
            return Ok(engine);
        }
        if args.workers == 0 {
            return Engine::load_local_with(dir, backend.clone())
                .with_context(|| format!("loading model from {}", dir.display()));
        }
        let (engine, c, remote) = super::cluster::distributed_engine(
            dir,
            args.workers as usize,
            args.plan,
            args.worker_memory_gb,
            backend.clone(),
        )?;
        cluster = Some((c, remote));
        Ok(engine)
    };
    let (engine, tokenizer, default_name) = match &args.model {
        Some(dir) => {
            let engine = load(dir)?;
            let tok_dir = args.tokenizer.clone().unwrap_or_else(|| dir.clone());
            let tokenizer = if tok_dir.join("tokenizer.json").exists() {
                Some(
                    TextTokenizer::from_dir(&tok_dir)
                        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?,
                )
            } else {
                eprintln!(
                    "no tokenizer.json in {}: serving token-id prompts only (no text output)",
                    tok_dir.display()
                );
                None
            };
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "moeless".into());
            (engine, tokenizer, name)
        }
        None if require_model => anyhow::bail!("`moeless serve` needs --model DIR (or use `moeless up`)"),
        None => {
            eprintln!(
                "no --model given: serving the built-in random-weight demo model with a byte-level \
                 tokenizer; its output is NOT meaningful text"
            );
            let engine = if args.workers == 0 && args.control.is_empty() {
                Engine::builtin_with(backend.clone()).context("building the built-in model")?
            } else {
                // Workers read expert weights from a checkpoint directory: write the built-in one
                // (with --control, a temporary directory: only workers on this machine read it).
                let dir = tempfile::Builder::new().prefix("moeless-builtin").tempdir()?;
                let path = dir.path().join("moeless-builtin");
                Engine::write_builtin(&path).context("writing the built-in model")?;
                builtin_dir = Some(dir);
                load(&path)?
            };
            (engine, Some(TextTokenizer::bytes()), "moeless-builtin".to_string())
        }
    };
    let cfg = ServeConfig {
        model_name: args.served_model_name.clone().unwrap_or(default_name),
        api_key: args.api_key.clone(),
        max_num_seqs: args.max_num_seqs,
        max_queued: args.max_queued,
        max_model_len: args.max_model_len,
        max_num_batched_tokens: args.max_num_batched_tokens,
        block_size: args.block_size,
        num_kv_blocks: args.num_kv_blocks,
        kv_cache_bytes: (args.kv_cache_gib.max(0.0) * (1u64 << 30) as f64) as usize,
        prefix_caching: !args.no_enable_prefix_caching,
        max_body_bytes: args.max_body_bytes,
        max_n: 16,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        tls: match (&args.ssl_certfile, &args.ssl_keyfile) {
            (Some(cert), Some(key)) => {
                Some(pki::https::server_config_from_pem(cert, key).context("--ssl-certfile/--ssl-keyfile")?)
            }
            _ => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let name = cfg.model_name.clone();
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let server = Server::start(engine, tokenizer, cfg, listener).await?;
        eprintln!(
            "serving model `{name}` at {scheme}://{} (OpenAI API under /v1; Ctrl-C or SIGTERM stops)",
            server.local_addr()
        );
        let stats = server.stats().clone();
        tokio::select! {
            _ = super::signals::wait_for_signal() => eprintln!("shutting down: finishing in-flight requests"),
            _ = async {
                while !stats.dead.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => eprintln!("the engine stopped: shutting down"),
        }
        server.shutdown().await.context("shutting down")
    })?;
    drop(cluster);
    drop(external);
    drop(builtin_dir);
    Ok(())
}

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model id to send (default: none, the server's only model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, env = "MOELESS_API_KEY")]
    pub api_key: Option<String>,
    /// ShareGPT-format JSON (e.g. ../shared/data/prompts/ShareGPT_V3_filtered_1000.json).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Azure LLM trace CSV: arrival times and generated lengths (e.g.
    /// ../shared/data/arrivals/azure-llm-2023/AzureLLMInferenceTrace_conv.csv).
    #[arg(long, conflicts_with = "request_rate")]
    pub arrivals: Option<PathBuf>,
    /// Poisson arrivals at R requests/s (default: all at once).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Divide trace inter-arrival times by this (replay faster than real time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    #[arg(long, default_value_t = 100)]
    pub num_requests: usize,
    /// Completion length (default: the trace's GeneratedTokens, else 128), capped by --max-tokens-cap.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub max_tokens_cap: usize,
    /// Prompts are cut to this many characters (the built-in model's tokens are bytes).
    #[arg(long, default_value_t = 512)]
    pub max_prompt_chars: usize,
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `moeless bench serve`.
pub fn bench_serve(a: ServeBenchArgs) -> anyhow::Result<()> {
    use endpoint::bench;
    let text =
        std::fs::read_to_string(&a.prompts).with_context(|| format!("reading prompts {}", a.prompts.display()))?;
    let prompts = bench::sharegpt_prompts(&text).with_context(|| format!("parsing {}", a.prompts.display()))?;
    let (times, lengths): (Vec<Duration>, Vec<Option<usize>>) = match &a.arrivals {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading arrivals {}", path.display()))?;
            let rows = bench::azure_arrivals(&text).with_context(|| format!("parsing {}", path.display()))?;
            let scale = if a.time_scale > 0.0 { a.time_scale } else { 1.0 };
            rows.into_iter()
                .take(a.num_requests)
                .map(|(t, g)| (t.div_f64(scale), Some(g)))
                .unzip()
        }
        None => {
            let rate = a.request_rate.unwrap_or(f64::INFINITY);
            let t = bench::poisson_arrivals(a.num_requests, rate, a.seed);
            let n = t.len();
            (t, vec![None; n])
        }
    };
    let requests: Vec<bench::BenchRequest> = times
        .into_iter()
        .zip(lengths)
        .enumerate()
        .map(|(i, (at, gen))| bench::BenchRequest {
            prompt: prompts[i % prompts.len()].chars().take(a.max_prompt_chars).collect(),
            max_tokens: a.max_tokens.or(gen).unwrap_or(128).clamp(1, a.max_tokens_cap.max(1)),
            at,
        })
        .collect();
    let cfg = bench::BenchConfig {
        base_url: a.base_url.clone(),
        model: a.model.clone(),
        api_key: a.api_key.clone(),
        requests,
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench::run(&cfg))?;
    println!("successful requests:        {}", report.completed);
    println!("failed requests:            {}", report.failed);
    println!("benchmark duration (s):     {:.2}", report.duration_s);
    println!("request throughput (req/s): {:.2}", report.request_throughput);
    println!("output token throughput:    {:.1} tok/s", report.output_throughput);
    println!("total token throughput:     {:.1} tok/s", report.total_token_throughput);
    for (name, s) in [
        ("TTFT", &report.ttft_ms),
        ("TPOT", &report.tpot_ms),
        ("ITL", &report.itl_ms),
        ("E2E", &report.e2e_ms),
    ] {
        println!(
            "{name:<5} ms  mean {:>9.2}  median {:>9.2}  p99 {:>9.2}",
            s.mean, s.median, s.p99
        );
    }
    if let Some(g) = report.goodput {
        println!("goodput (req/s within SLOs): {g:.2}");
    }
    for e in &report.errors {
        println!("error: {e}");
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if report.failed > 0 {
        anyhow::bail!("{} of {} requests failed", report.failed, cfg.requests.len());
    }
    Ok(())
}
