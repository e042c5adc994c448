//! `moeless bench engine`: decode and prefill throughput of the engine on a generated
//! Mixtral-shaped checkpoint, side by side with candle-transformers' Mixtral on the same
//! checkpoint (with the `candle` feature), and the fraction of the memory-bandwidth roofline
//! reached at batch 1.
//!
//! `moeless bench exchange`: QUIC (the transport crate, mutual TLS) against plain TCP between
//! two processes, for expert-sized messages.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use data_plane::config::Arch;
use data_plane::engine::{argmax, read_config, Engine};
use data_plane::model::LogitsWanted;
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Engine throughput against candle-transformers' Mixtral and the bandwidth roofline.
    Engine(EngineBenchArgs),
    /// Load test of an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, E2E, goodput.
    Serve(super::serve::ServeBenchArgs),
    /// Message exchange between two processes: QUIC with mutual TLS against plain TCP.
    Exchange(ExchangeBenchArgs),
    /// One MoE layer's expert call in process against remote workers (dispatch overhead).
    Dispatch(super::bench_dp::DispatchBenchArgs),
    /// Raw read bandwidth against expert instance cold starts.
    ColdStart(super::bench_dp::ColdStartBenchArgs),
    /// GPU data plane: expert FFN and MoE layer TFLOP/s against the device's GEMM peak, cold starts.
    Gpu(super::bench_gpu::GpuBenchArgs),
    /// Decode tokens/s over 1, 2, 4 workers with trace-replayed routing: static vs MoEless placement.
    DecodeWorkers(super::bench_dp::DecodeWorkersBenchArgs),
}

#[derive(Args, Debug)]
pub struct EngineBenchArgs {
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Expert FFN (intermediate) size.
    #[arg(long, default_value_t = 7168)]
    pub ffn: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    /// Weight types to measure (comma-separated: f32, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    /// Decode batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Prompt length of the prefill measurement (one sequence).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Decode steps timed per repetition.
    #[arg(long, default_value_t = 8)]
    pub decode_steps: usize,
    /// Tokens of context each decoding sequence starts from.
    #[arg(long, default_value_t = 16)]
    pub decode_context: usize,
    /// Also time decoding with the server's paged KV cache (blocks of 16 in a shared pool)
    /// beside per-sequence buffers, in the same run.
    #[arg(long)]
    pub paged: bool,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Where generated checkpoints are kept (reused when the shape matches).
    #[arg(long, default_value = "target/bench-models")]
    pub dir: PathBuf,
    /// Where the engine runs: cpu, cuda, cuda:N, or auto (CUDA when usable).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Skip the candle-transformers peer even when it is compiled in.
    #[arg(long)]
    pub no_peer: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Engine(a) => engine(a),
        BenchCommand::Serve(a) => super::serve::bench_serve(a),
        BenchCommand::Exchange(a) => exchange(a),
        BenchCommand::Dispatch(a) => super::bench_dp::dispatch(a),
        BenchCommand::ColdStart(a) => super::bench_dp::cold_start(a),
        BenchCommand::DecodeWorkers(a) => super::bench_dp::decode_workers(a),
        BenchCommand::Gpu(a) => super::bench_gpu::run(a),
    }
}

/// The engine backend a `--device` names.
pub(super) fn backend_for(device: &str) -> anyhow::Result<std::sync::Arc<dyn data_plane::backend::Backend>> {
    let d = data_plane::device::select(device)?;
    eprintln!("device: {}", d.description);
    Ok(d.backend)
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Copy bandwidth in bytes/s (bytes read plus bytes written, the STREAM convention), median
/// of several 256 MiB copies.
fn memcpy_bandwidth() -> f64 {
    let n = 64 << 20; // f32 elements = 256 MiB
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(&dst);
        rates.push(2.0 * (n * 4) as f64 / s);
    }
    median(rates)
}

/// Read bandwidth in bytes/s with every core streaming its share of a 1 GiB buffer (bigger than
/// any last-level cache we run on), median of 5 passes: the ceiling for weight streaming, which
/// only reads.
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 256 << 20; // f32 elements = 1 GiB
    let src: Vec<f32> = (0..n).map(|i| (i % 251) as f32).collect();
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = src
            .par_chunks(1 << 16)
            .map(|c| {
                // Eight independent sums, so the loads are the limit, not the add chain.
                let mut acc = [0.0f32; 8];
                for v in c.chunks_exact(8) {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        rates.push((n * 4) as f64 / t.elapsed().as_secs_f64());
    }
    median(rates)
}

fn shape_of(a: &EngineBenchArgs) -> ModelShape {
    ModelShape {
        vocab: a.vocab,
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.hidden / a.heads,
        experts: a.experts,
        top_k: a.top_k,
        expert_intermediate: a.ffn,
        dense_intermediate: a.ffn,
        max_positions: 4096,
    }
}

/// Generates the checkpoint unless one of the same shape is already there.
pub(super) fn ensure_checkpoint(dir: &Path, shape: &ModelShape, dtype: SaveDtype) -> anyhow::Result<()> {
    if let Ok(cfg) = read_config(dir) {
        if cfg.hidden_size == shape.hidden
            && cfg.num_layers == shape.layers
            && cfg.moe.num_experts == shape.experts
            && cfg.moe.expert_intermediate == shape.expert_intermediate
            && cfg.vocab_size == shape.vocab
            && cfg.num_kv_heads == shape.kv_heads
            && dir.join("model.safetensors").exists()
        {
            eprintln!("  reusing checkpoint {}", dir.display());
            return Ok(());
        }
    }
    eprintln!("  generating checkpoint {} ...", dir.display());
    let t = Instant::now();
    write_random_checkpoint(dir, Arch::Mixtral, shape, 1234, dtype)
        .with_context(|| format!("generating {}", dir.display()))?;
    eprintln!("  generated in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Parameters read per decoded token at batch 1 (top-k experts per layer, not all).
fn params_per_token(s: &ModelShape) -> (f64, f64) {
    let h = s.hidden as f64;
    let attn = h * (s.heads * s.head_dim) as f64 * 2.0 + h * (s.kv_heads * s.head_dim) as f64 * 2.0;
    let router = h * s.experts as f64;
    let expert = 3.0 * h * s.expert_intermediate as f64;
    let non_expert = s.layers as f64 * (attn + router) + s.vocab as f64 * h;
    (non_expert, s.layers as f64 * s.top_k as f64 * expert)
}

fn prompts(batch: usize, len: usize, vocab: usize, salt: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..len)
                .map(|i| ((i * 7919 + b * 104729 + salt * 31) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Decode tokens/s of our engine: prefill `batch` prompts of `context` tokens, then time `steps`
/// batched steps; `paged`: the caches are blocks of one shared pool, as the server runs them.
fn ours_decode(
    engine: &Engine,
    batch: usize,
    steps: usize,
    context: usize,
    vocab: usize,
    rep: usize,
    paged: bool,
) -> anyhow::Result<f64> {
    let ps = prompts(batch, context.max(1), vocab, rep);
    const BLOCK: usize = 16;
    let pool = paged.then(|| engine.new_kv_pool(BLOCK, batch * (context + steps + 1).div_ceil(BLOCK), false));
    let mut caches: Vec<_> = ps
        .iter()
        .map(|_| pool.as_ref().map_or_else(|| engine.new_cache(), |p| p.new_cache()))
        .collect();
    let toks: Vec<&[u32]> = ps.iter().map(|p| p.as_slice()).collect();
    let (logits, _) = engine.step(&mut caches, &toks, LogitsWanted::Last)?;
    let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l.row(0))]).collect();
    let t = Instant::now();
    for _ in 0..steps {
        let toks: Vec<&[u32]> = next.iter().map(|n| n.as_slice()).collect();
        let (logits, _) = engine.step(&mut caches, &toks, LogitsWanted::Last)?;
        next = logits.iter().map(|l| [argmax(l.row(0))]).collect();
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn ours_prefill(engine: &Engine, len: usize, vocab: usize, rep: usize) -> anyhow::Result<f64> {
    let ps = prompts(1, len, vocab, rep + 1000);
    let mut caches = vec![engine.new_cache()];
    let t = Instant::now();
    engine.step(&mut caches, &[&ps[0]], LogitsWanted::Last)?;
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

#[cfg(feature = "candle")]
fn peer(dir: &Path, dtype: SaveDtype, batch: usize, a: &EngineBenchArgs, prefill: bool) -> anyhow::Result<Option<f64>> {
    use candle_mixtral_peer::{run_mixtral, PeerDtype};
    if a.no_peer {
        return Ok(None);
    }
    let run = |d: PeerDtype| -> anyhow::Result<f64> {
        Ok(if prefill {
            run_mixtral(dir, d, 1, a.prompt_len, 1, a.repeats)?.prefill_tokens_per_s
        } else {
            run_mixtral(dir, d, batch, 16, a.decode_steps, a.repeats)?.decode_tokens_per_s
        })
    };
    if dtype == SaveDtype::Bf16 {
        match run(PeerDtype::Bf16) {
            Ok(t) => return Ok(Some(t)),
            // What a candle user does with a bf16 checkpoint until that is fixed: load it as f32.
            Err(e) => eprintln!("  candle bf16 failed ({e:#}); measuring candle loading the same checkpoint as f32"),
        }
    }
    Ok(Some(run(PeerDtype::F32)?))
}

#[cfg(not(feature = "candle"))]
fn peer(_: &Path, _: SaveDtype, _: usize, _: &EngineBenchArgs, _: bool) -> anyhow::Result<Option<f64>> {
    Ok(None)
}

fn engine(a: EngineBenchArgs) -> anyhow::Result<()> {
    if a.heads == 0 || !a.hidden.is_multiple_of(a.heads) {
        anyhow::bail!("--hidden {} must be a multiple of --heads {}", a.hidden, a.heads);
    }
    let shape = shape_of(&a);
    if !cfg!(feature = "candle") {
        eprintln!("note: built without the `candle` feature; the candle-transformers peer is not measured");
        eprintln!("      (cargo run --release --features candle -- bench engine)");
    }
    eprintln!("measuring memory copy bandwidth ...");
    let bw = memcpy_bandwidth();
    eprintln!("  {:.2} GB/s (read + write)", bw / 1e9);
    eprintln!("measuring read bandwidth, all cores ...");
    let read_bw = read_bandwidth();
    eprintln!("  {:.2} GB/s", read_bw / 1e9);
    let backend = backend_for(&a.device)?;
    // The roofline compares weight bytes per token with host memory bandwidth: CPU only.
    let host_roofline = backend.name() == "cpu";
    let (non_expert, expert) = params_per_token(&shape);
    let mut results = Vec::new();
    println!("| dtype | measure | MoEless tok/s | candle tok/s | ratio |");
    println!("|---|---|---|---|---|");
    for dt in &a.dtypes {
        let dtype = match dt.as_str() {
            "f32" => SaveDtype::F32,
            "bf16" => SaveDtype::Bf16,
            other => anyhow::bail!("unknown dtype '{other}' (f32, bf16)"),
        };
        eprintln!("[{dt}] checkpoint");
        let dir = a.dir.join(format!(
            "mixtral-h{}-l{}-e{}-f{}-{dt}",
            a.hidden, a.layers, a.experts, a.ffn
        ));
        ensure_checkpoint(&dir, &shape, dtype)?;
        eprintln!("[{dt}] loading MoEless engine ...");
        let engine =
            Engine::load_local_with(&dir, backend.clone()).with_context(|| format!("loading {}", dir.display()))?;
        let bytes_per_param = if dtype == SaveDtype::Bf16 { 2.0 } else { 4.0 };
        let mut measures: Vec<(String, usize, bool)> =
            a.batches.iter().map(|&b| (format!("decode b={b}"), b, false)).collect();
        measures.push((format!("prefill {} tokens", a.prompt_len), 1, true));
        for (name, batch, is_prefill) in measures {
            eprintln!("[{dt}] {name}: MoEless x{} ...", a.repeats);
            let decode =
                |rep, paged| ours_decode(&engine, batch, a.decode_steps, a.decode_context, a.vocab, rep, paged);
            let mut ours = Vec::new();
            for rep in 0..a.repeats {
                ours.push(if is_prefill {
                    ours_prefill(&engine, a.prompt_len, a.vocab, rep)?
                } else {
                    decode(rep, false)?
                });
            }
            let ours = median(ours);
            if a.paged && !is_prefill {
                // Alternate with fresh owned runs so drift hits both alike.
                let (mut owned, mut paged) = (Vec::new(), Vec::new());
                for rep in 0..a.repeats {
                    owned.push(decode(rep, false)?);
                    paged.push(decode(rep, true)?);
                }
                let (owned, paged) = (median(owned), median(paged));
                println!(
                    "| {dt} | {name} paged KV (context {}) | {paged:.2} | owned {owned:.2} | {:.3}x |",
                    a.decode_context,
                    paged / owned
                );
                results.push(json!({"dtype": dt, "measure": format!("{name} paged"), "batch": batch,
                    "context": a.decode_context, "paged_tokens_per_s": paged, "owned_tokens_per_s": owned,
                    "paged_over_owned": paged / owned}));
            }
            eprintln!("[{dt}] {name}: candle ...");
            let theirs = match peer(&dir, dtype, batch, &a, is_prefill) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("[{dt}] {name}: candle failed: {e:#}");
                    None
                }
            };
            let ratio = theirs.map(|t| ours / t);
            println!(
                "| {dt} | {name} | {ours:.2} | {} | {} |",
                theirs.map(|t| format!("{t:.2}")).unwrap_or_else(|| "-".into()),
                ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
            );
            let mut row = json!({"dtype": dt, "measure": name, "batch": batch, "moeless_tokens_per_s": ours,
                "candle_tokens_per_s": theirs, "ratio": ratio});
            if !is_prefill && batch == 1 && host_roofline {
                let bytes_per_token = (non_expert + expert) * bytes_per_param;
                let frac = bytes_per_token * ours / bw;
                let read_frac = bytes_per_token * ours / read_bw;
                row["bytes_per_token"] = json!(bytes_per_token);
                row["roofline_fraction"] = json!(frac);
                row["read_roofline_fraction"] = json!(read_frac);
                println!(
                    "| {dt} | roofline b=1 | {:.1}% of {:.2} GB/s copy, {:.1}% of {:.2} GB/s read ({:.0} MB/token) | | |",
                    frac * 100.0,
                    bw / 1e9,
                    read_frac * 100.0,
                    read_bw / 1e9,
                    bytes_per_token / 1e6
                );
            }
            results.push(row);
        }
    }
    if let Some(out) = &a.out {
        let doc = json!({"device": backend.name(), "memcpy_bytes_per_s": bw, "read_bytes_per_s": read_bw, "shape": format!("{shape:?}"), "results": results});
        std::fs::write(out, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExchangeBenchArgs {
    /// Message sizes in KiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096,8192")]
    pub sizes_kib: Vec<usize>,
    /// Requests in flight during the throughput runs (streams on one QUIC connection, or TCP
    /// connections).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Repetitions per size; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Request payload per throughput run and transport, in MiB.
    #[arg(long, default_value_t = 64)]
    pub mib_per_run: usize,
    /// QUIC connections the client keeps to the echo server; requests take them in turn.
    #[arg(long, default_value_t = 1)]
    pub quic_connections: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Internal: run the QUIC and TCP echo servers on this IP (the benchmark starts a copy of
    /// itself with it), print their addresses and serve until stdin closes.
    #[arg(long, hide = true)]
    pub serve_on: Option<std::net::IpAddr>,
    /// Internal: the certificate directory the serving copy uses.
    #[arg(long, hide = true)]
    pub certs: Option<PathBuf>,
}

/// The serving copy of `moeless bench exchange`: echo servers until stdin closes.
fn exchange_serve(ip: std::net::IpAddr, certs: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let identity = transport::Identity::load(&transport::TlsFiles::in_dir(certs, "bench-server"))?;
        let servers = transport::bench::serve_echo(ip, &identity, transport::Limits::default()).await?;
        println!("quic={} tcp={}", servers.quic.local_addr(), servers.tcp_addr);
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        // Serve until the parent closes our stdin (or dies).
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        servers.shutdown().await;
        Ok(())
    })
}

/// Kills the serving copy if the benchmark ends early.
struct ServingChild(std::process::Child);

impl Drop for ServingChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if !matches!(self.0.try_wait(), Ok(Some(_))) {
                let _ = self.0.kill();
            }
        }
        let _ = self.0.wait();
    }
}

fn exchange(a: ExchangeBenchArgs) -> anyhow::Result<()> {
    if let Some(ip) = a.serve_on {
        let certs = a.certs.context("--serve-on needs --certs")?;
        return exchange_serve(ip, &certs);
    }
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let certs = std::env::temp_dir().join(format!("moeless-bench-exchange-{}", std::process::id()));
    transport::generate(&certs, &["bench-server", "bench-client"], &[])
        .with_context(|| format!("generating certificates in {}", certs.display()))?;
    let exe = std::env::current_exe().context("locating the moeless executable")?;
    eprintln!("starting the echo servers in a second process ({}) ...", exe.display());
    let mut child = ServingChild(
        Command::new(&exe)
            .args(["bench", "exchange", "--serve-on", "127.0.0.1", "--certs"])
            .arg(&certs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?,
    );
    let stdout = child.0.stdout.take().context("the serving process has no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the serving process's addresses")?;
    let (quic_addr, tcp_addr) = parse_serving_line(&line)
        .with_context(|| format!("the serving process said {line:?} instead of its addresses"))?;
    eprintln!("  QUIC on {quic_addr}, TCP on {tcp_addr}");

    let config = transport::bench::ExchangeConfig {
        sizes: a.sizes_kib.iter().map(|k| k << 10).collect(),
        concurrency: a.concurrency,
        repeats: a.repeats,
        bytes_per_run: a.mib_per_run << 20,
        quic_connections: a.quic_connections,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rows = rt.block_on(async {
        let identity = transport::Identity::load(&transport::TlsFiles::in_dir(&certs, "bench-client"))?;
        let mut progress = |line: String| eprintln!("{line}");
        transport::bench::run_exchange(&identity, quic_addr, tcp_addr, &config, &mut progress).await
    })?;
    drop(child);
    let _ = std::fs::remove_dir_all(&certs);

    println!(
        "Throughput with {} requests in flight ({} QUIC connection(s)), p50 round trip at 1; medians of {} runs; response 8 bytes.",
        a.concurrency, a.quic_connections, a.repeats
    );
    println!("| size | QUIC MB/s | TCP MB/s | QUIC/TCP | QUIC p50 ms | TCP p50 ms | QUIC/TCP p50 |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} KiB | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.2} |",
            r.size >> 10,
            r.quic_mb_s,
            r.tcp_mb_s,
            r.throughput_ratio(),
            r.quic_p50_ms,
            r.tcp_p50_ms,
            r.latency_ratio()
        );
    }
    if let Some(out) = &a.json {
        let results: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({"size_bytes": r.size, "quic_mb_per_s": r.quic_mb_s, "tcp_mb_per_s": r.tcp_mb_s,
                    "throughput_ratio": r.throughput_ratio(), "quic_p50_ms": r.quic_p50_ms, "tcp_p50_ms": r.tcp_p50_ms,
                    "latency_ratio": r.latency_ratio(), "quic_mb_per_s_runs": r.quic_mb_s_runs,
                    "tcp_mb_per_s_runs": r.tcp_mb_s_runs, "quic_p50_ms_runs": r.quic_p50_ms_runs,
                    "tcp_p50_ms_runs": r.tcp_p50_ms_runs})
            })
            .collect();
        let doc = json!({"concurrency": a.concurrency, "quic_connections": a.quic_connections,
            "repeats": a.repeats, "mib_per_run": a.mib_per_run,
            "response_bytes": 8, "results": results});
        std::fs::write(out, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn parse_serving_line(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    let mut quic = None;
    let mut tcp = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("quic=") {
            quic = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("tcp=") {
            tcp = v.parse().ok();
        }
    }
    Some((quic?, tcp?))
}
