//! `moeless bench gpu`: the GPU data plane's expert FFN, MoE layer and cold starts, against the
//! device's own dense bf16 GEMM peak and pinned host-to-device bandwidth measured in the same
//! run. `scripts/gpu/torch_expert_bench.py` measures PyTorch on the same shapes and the same
//! deterministic weights (and checks our outputs against its own); `scripts/gpu/check.sh`
//! runs both.
//!
//! Weights and inputs follow one formula both sides can compute without sharing files:
//! value `i` of tensor `t` is `(((i + 7919 t) * 2654435761) mod 2001) / 1000 - 1`, times a
//! per-tensor scale, rounded to bf16.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct GpuBenchArgs {
    /// Model width (Mixtral 8x7B: 4096).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    /// Expert FFN width (Mixtral 8x7B: 14336).
    #[arg(long, default_value_t = 14336)]
    pub ffn: usize,
    /// Tokens per expert for the single-expert measurement (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048,4096")]
    pub tokens: Vec<usize>,
    /// Experts of the layer measurement.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Tokens of the layer measurement (routed with a skewed, Zipf-like distribution).
    #[arg(long, default_value_t = 4096)]
    pub layer_tokens: usize,
    /// Timed repetitions per measurement (after warm-up); medians are reported.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The shared deterministic value formula (see the module docs).
pub fn formula(i: u64, tensor: u64) -> f32 {
    (((i + 7919 * tensor) * 2_654_435_761) % 2001) as f32 / 1000.0 - 1.0
}

#[cfg(not(feature = "cuda"))]
pub fn run(_a: GpuBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("this binary was built without the `cuda` feature")
}

#[cfg(feature = "cuda")]
pub fn run(a: GpuBenchArgs) -> anyhow::Result<()> {
    imp::run(a)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::Context;
    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::CudaStream;
    use data_plane::cuda::coldstart::{pinned_h2d_gbps, PinnedExpert};
    use data_plane::cuda::experts::{DeviceExpert, DeviceExpertLayer};
    use data_plane::cuda::{dptr, median_event_ms, GemmTypes, Gpu};
    use serde_json::json;

    use super::{formula, GpuBenchArgs};
    use crate::commands::bench::median;

    fn bf16_tensor(n: usize, tensor: u64, scale: f32) -> Vec<u16> {
        (0..n as u64)
            .map(|i| half::bf16::from_f32(formula(i, tensor) * scale).to_bits())
            .collect()
    }

    /// Median milliseconds of `f` over `reps` runs after two warm-ups, timed with events.
    fn time_ms(s: &Arc<CudaStream>, reps: usize, f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
        median_event_ms(s, 2, reps, f)
    }

    pub fn run(a: GpuBenchArgs) -> anyhow::Result<()> {
        let gpu = Gpu::open(a.device).context("opening the GPU (the CUDA data plane needs an NVIDIA driver)")?;
        let s = gpu.stream.clone();
        eprintln!(
            "device: {} (sm_{}{}, {} SMs, {} GiB)",
            gpu.info.name,
            gpu.info.compute_capability.0,
            gpu.info.compute_capability.1,
            gpu.info.multiprocessors,
            gpu.info.memory_bytes >> 30
        );
        let (h, i) = (a.hidden, a.ffn);

        // 1. The ceiling: cuBLAS bf16 GEMM 8192^3 on this device, now.
        eprintln!("[1/4] dense bf16 GEMM peak (8192^3) ...");
        let m = 8192usize;
        let ga = s.alloc_zeros::<u16>(m * m)?;
        let gb = s.clone_htod(&bf16_tensor(m * m, 90, 0.01))?;
        let ga2 = s.clone_htod(&bf16_tensor(m * m, 91, 0.01))?;
        drop(ga);
        let gc = s.alloc_zeros::<u16>(m * m)?;
        let peak_ms = time_ms(&s, a.repeats, || {
            // SAFETY: three live m x m bf16 buffers.
            unsafe {
                gpu.gemm_xwt(
                    m,
                    m,
                    m,
                    dptr(&gb, &s),
                    dptr(&ga2, &s),
                    dptr(&gc, &s),
                    GemmTypes::BF16,
                    0.0,
                )?;
            }
            Ok(())
        })?;
        let peak_tflops = 2.0 * (m as f64).powi(3) / (peak_ms / 1e3) / 1e12;
        eprintln!("      {peak_tflops:.0} TFLOP/s");
        drop((gb, ga2, gc));

        // 2. One expert's FFN at n tokens: gate_up GEMM, fused SwiGLU, down GEMM.
        eprintln!("[2/4] expert FFN (hidden {h}, ffn {i}) ...");
        let w1 = bf16_tensor(i * h, 1, 1.0 / (h as f32).sqrt());
        let w3 = bf16_tensor(i * h, 2, 1.0 / (h as f32).sqrt());
        let w2 = bf16_tensor(h * i, 3, 1.0 / (i as f32).sqrt());
        let mut layer = DeviceExpertLayer::new(gpu.clone(), h, i, a.experts);
        for e in 0..a.experts {
            layer.install(e, DeviceExpert::upload(&gpu, h, i, &w1, &w3, &w2)?)?;
        }
        let nmax = a
            .tokens
            .iter()
            .copied()
            .max()
            .unwrap_or(512)
            .max(a.layer_tokens * a.top_k);
        let x_host = bf16_tensor(nmax * h, 4, 1.0);
        let x = s.clone_htod(&x_host)?;
        let gate_up = s.alloc_zeros::<u16>(nmax * 2 * i)?;
        let act = s.alloc_zeros::<u16>(nmax * i)?;
        let y = s.alloc_zeros::<u16>(nmax * h)?;
        let mut ffn_rows = Vec::new();
        println!("| tokens/expert | ms | TFLOP/s | % of measured peak |");
        println!("|---|---|---|---|");
        for &n in &a.tokens {
            let ms = time_ms(&s, a.repeats, || {
                // SAFETY: every buffer holds at least nmax >= n rows.
                unsafe {
                    layer.expert_ffn_raw(0, n, dptr(&x, &s), dptr(&gate_up, &s), dptr(&act, &s), dptr(&y, &s))?;
                }
                Ok(())
            })?;
            let flops = 6.0 * n as f64 * h as f64 * i as f64;
            let tf = flops / (ms / 1e3) / 1e12;
            println!("| {n} | {ms:.3} | {tf:.0} | {:.0}% |", 100.0 * tf / peak_tflops);
            ffn_rows.push(json!({"tokens": n, "ms": ms, "tflops": tf, "fraction_of_peak": tf / peak_tflops}));
        }
        // Output check values for the PyTorch script: the first 512 (or fewer) tokens.
        let n_check = a
            .tokens
            .iter()
            .copied()
            .filter(|&n| n <= 512)
            .max()
            .unwrap_or(a.tokens[0]);
        // SAFETY: as above.
        unsafe {
            layer.expert_ffn_raw(
                0,
                n_check,
                dptr(&x, &s),
                dptr(&gate_up, &s),
                dptr(&act, &s),
                dptr(&y, &s),
            )?;
        }
        let yh: Vec<f32> = s.clone_dtoh(&y)?[..n_check * h]
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        let check = json!({"tokens": n_check, "sum": yh.iter().map(|&v| v as f64).sum::<f64>(),
            "abs_sum": yh.iter().map(|&v| v.abs() as f64).sum::<f64>(), "first": &yh[..8]});

        // 3. A whole layer: permute, grouped expert GEMMs, combine, with skewed routing.
        eprintln!(
            "[3/4] MoE layer: {} tokens, top-{} of {} experts ...",
            a.layer_tokens, a.top_k, a.experts
        );
        let t = a.layer_tokens;
        let zipf: Vec<f64> = (1..=a.experts).map(|r| 1.0 / r as f64).collect();
        let total: f64 = zipf.iter().sum();
        let mut ids = Vec::with_capacity(t * a.top_k);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..t {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < a.top_k {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 * total;
                let mut acc = 0.0;
                let e = zipf.iter().position(|z| {
                    acc += z;
                    u < acc
                });
                let e = e.unwrap_or(a.experts - 1) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            ids.extend(chosen);
        }
        let weights = vec![1.0 / a.top_k as f32; t * a.top_k];
        let layer_ms = time_ms(&s, a.repeats, || {
            layer.forward(&x, t, &ids, &weights, a.top_k)?;
            Ok(())
        })?;
        let layer_tf = 6.0 * (t * a.top_k) as f64 * h as f64 * i as f64 / (layer_ms / 1e3) / 1e12;
        let mut loads = vec![0usize; a.experts];
        ids.iter().for_each(|&e| loads[e as usize] += 1);
        println!(
            "| layer {t} tokens x top-{} | {layer_ms:.3} | {layer_tf:.0} | {:.0}% |",
            a.top_k,
            100.0 * layer_tf / peak_tflops
        );

        // 4. Cold start of one expert from pinned memory, alone and under compute.
        eprintln!("[4/4] cold start from pinned host memory ...");
        let h2d_ref = pinned_h2d_gbps(&gpu, 1 << 30, a.repeats.min(10))?;
        let pinned = PinnedExpert::stage(&gpu, h, i, &w1, &w3, &w2)?;
        let copy = gpu.ctx.new_stream()?;
        let mut alone = Vec::new();
        for _ in 0..a.repeats.min(10) + 1 {
            let t0 = copy.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let (inst, done) = pinned.start(&copy)?;
            let t1 = copy.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            done.synchronize()?;
            t1.synchronize()?;
            alone.push(t0.elapsed_ms(&t1)? as f64);
            drop(inst);
        }
        alone.remove(0);
        let cold_ms = median(alone);
        let cold_gbps = pinned.bytes() as f64 / (cold_ms / 1e3) / 1e9;
        // Overlap: 10 expert FFNs at 2048 tokens on the compute stream while the copy runs.
        let n_ov = 2048.min(nmax);
        let compute = |reps: usize| -> anyhow::Result<()> {
            for _ in 0..reps {
                // SAFETY: as above.
                unsafe {
                    layer.expert_ffn_raw(0, n_ov, dptr(&x, &s), dptr(&gate_up, &s), dptr(&act, &s), dptr(&y, &s))?;
                }
            }
            Ok(())
        };
        s.synchronize()?;
        let wall = Instant::now();
        compute(10)?;
        s.synchronize()?;
        let compute_alone = wall.elapsed().as_secs_f64() * 1e3;
        let wall = Instant::now();
        let (inst, done) = pinned.start(&copy)?;
        compute(10)?;
        done.synchronize()?;
        s.synchronize()?;
        let both = wall.elapsed().as_secs_f64() * 1e3;
        drop(inst);
        let overlap = (compute_alone + cold_ms - both) / cold_ms.min(compute_alone);
        println!(
            "cold start: {:.0} MB in {cold_ms:.2} ms = {cold_gbps:.1} GB/s ({:.0}% of the {h2d_ref:.1} GB/s pinned copy); \
             under compute: {both:.1} ms vs {compute_alone:.1} + {cold_ms:.1} ms ({:.0}% hidden)",
            pinned.bytes() as f64 / 1e6,
            100.0 * cold_gbps / h2d_ref,
            100.0 * overlap.clamp(0.0, 1.0)
        );

        if let Some(out) = &a.out {
            let doc = json!({
                "device": gpu.info,
                "hidden": h, "ffn": i, "experts": a.experts, "top_k": a.top_k, "repeats": a.repeats,
                "dense_bf16_peak_tflops": peak_tflops,
                "expert_ffn": ffn_rows,
                "check": check,
                "layer": {"tokens": t, "ms": layer_ms, "tflops": layer_tf, "expert_loads": loads},
                "cold_start": {"bytes": pinned.bytes(), "ms": cold_ms, "gbps": cold_gbps,
                    "pinned_h2d_reference_gbps": h2d_ref, "fraction": cold_gbps / h2d_ref,
                    "compute_alone_ms": compute_alone, "compute_with_copy_ms": both, "overlap_fraction": overlap},
            });
            std::fs::write(out, serde_json::to_vec_pretty(&doc)?)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Ok(())
    }
}
