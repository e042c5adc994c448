//! The CUDA data plane against the CPU engine: every golden architecture through the CUDA
//! backend (expert ids and greedy tokens exact, f32 weights), each kernel against its CPU
//! counterpart, the device-resident bf16 expert layer against an f32 host computation, cold
//! starts from pinned memory, and NCCL all-to-all.
//!
//! Needs an NVIDIA GPU and driver. Without one every test prints why and returns, unless
//! MOELESS_REQUIRE_CUDA=1 (set by `scripts/gpu/check.sh` on GPU machines), which makes a
//! missing GPU a failure.

#![cfg(feature = "cuda")]
#![allow(clippy::needless_range_loop)] // rank x peer matrices read clearer indexed

use std::sync::{Arc, OnceLock};

use cudarc::driver::{LaunchConfig, PushKernelArg};
use data_plane::backend::{AttentionShape, Backend, CpuBackend};
use data_plane::config::RouterKind;
use data_plane::cuda::backend::CudaBackend;
use data_plane::cuda::coldstart::PinnedExpert;
use data_plane::cuda::experts::{DeviceExpert, DeviceExpertLayer};
use data_plane::cuda::nccl::{nccl_available, LocalComms};
use data_plane::cuda::Gpu;
use data_plane::engine::Engine;
use data_plane::kv_cache::KvView;
use data_plane::model::route;
use data_plane::reference::{check_engine_against_golden, shared_dir, ARCHS};
use data_plane::tensor::Tensor;
use data_plane::weight::{bf16_to_f32, Weight};
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Arc<Gpu>> {
    static G: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    match G.get_or_init(|| Gpu::open(0).map_err(|e| e.to_string())) {
        Ok(g) => Some(g.clone()),
        Err(e) => {
            assert!(
                std::env::var("MOELESS_REQUIRE_CUDA").as_deref() != Ok("1"),
                "MOELESS_REQUIRE_CUDA=1 but no GPU: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn backend() -> Option<Arc<CudaBackend>> {
    static B: OnceLock<Arc<CudaBackend>> = OnceLock::new();
    let g = gpu()?;
    Some(
        B.get_or_init(|| Arc::new(CudaBackend::new(g).expect("backend")))
            .clone(),
    )
}

fn f2bf(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn randn(r: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.gen::<f32>() * 2.0 - 1.0) * scale).collect()
}

#[test]
fn every_golden_architecture_matches_transformers_through_the_cuda_backend() {
    let Some(be) = backend() else { return };
    let Some(shared) = shared_dir() else { return };
    for arch in ARCHS {
        let dir = shared.join("golden").join(arch);
        let engine = Engine::load_local_with(&dir, be.clone()).unwrap_or_else(|e| panic!("{arch}: loading: {e}"));
        // cuBLAS sums in another order than the CPU: allow 10x the CPU engine's tolerance;
        // ids and greedy tokens are still compared exactly.
        check_engine_against_golden(arch, &dir, &engine, 10.0);
        eprintln!("{arch}: CUDA backend matches transformers");
    }
    assert!(be.resident_weight_bytes() > 0);
}

/// The golden checkpoint with every tensor rounded to bf16 (config.json copied).
fn bf16_copy(src: &std::path::Path, dst: &std::path::Path) {
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map = std::collections::BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        map.insert(name, Tensor::new(view.shape().to_vec(), data).unwrap());
    }
    data_plane::testing::write_safetensors(
        &dst.join("model.safetensors"),
        &map,
        data_plane::testing::SaveDtype::Bf16,
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
}

#[test]
fn bf16_checkpoints_of_every_golden_architecture_match_the_cpu_engine() {
    let Some(be) = backend() else { return };
    let Some(shared) = shared_dir() else { return };
    for arch in ARCHS {
        let golden = shared.join("golden").join(arch);
        let dir = tempfile::tempdir().unwrap();
        bf16_copy(&golden, dir.path());
        let prompts = data_plane::reference::read_prompts(&golden);
        let cpu = Engine::load_local(dir.path()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let gpu = Engine::load_local_with(dir.path(), be.clone()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let a = cpu.forward_prompts(&prompts, false).unwrap();
        let b = gpu.forward_prompts(&prompts, false).unwrap();
        let (mut same, mut total, mut compared) = (0usize, 0usize, 0usize);
        for (p, (x, y)) in a.iter().zip(&b).enumerate() {
            let k = x.routing.first().map(|r| r.ids.len() / prompts[p].len()).unwrap_or(1);
            let v = x.logits.cols();
            let scale = x.logits.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let n = prompts[p].len();
            let routes_alike = |t: usize| {
                x.routing
                    .iter()
                    .zip(&y.routing)
                    .all(|(rx, ry)| rx.ids[t * k..(t + 1) * k] == ry.ids[t * k..(t + 1) * k])
            };
            // A near-tie between two experts may flip under bf16 rounding: from that token on
            // (later tokens attend to it) the two runs went through different weights.
            let first_flip = (0..n).find(|&t| !routes_alike(t)).unwrap_or(n);
            total += n;
            same += (0..n).filter(|&t| routes_alike(t)).count();
            for t in 0..first_flip {
                compared += 1;
                // bf16 weights on both sides; the GPU also rounds each product's input to bf16
                // (cuBLAS bf16 x bf16 -> f32) where the CPU keeps f32 activations.
                data_plane::reference::assert_close(
                    &format!("{arch} bf16 p{p} token {t} logits"),
                    &y.logits.data()[t * v..(t + 1) * v],
                    &x.logits.data()[t * v..(t + 1) * v],
                    0.05 * scale,
                    0.05,
                );
            }
        }
        assert!(compared > 0);
        // Near-ties may flip a token's experts; nearly all tokens must route identically.
        assert!(
            same * 10 >= total * 9,
            "{arch}: {same} of {total} tokens route identically"
        );
        eprintln!(
            "{arch}: bf16 on CUDA matches the CPU engine ({same}/{total} tokens route identically, \
             {compared} compared before any flip)"
        );
    }
}

#[test]
fn a_small_weight_budget_evicts_and_still_matches_transformers() {
    let Some(g) = gpu() else { return };
    let Some(shared) = shared_dir() else { return };
    // 256 KiB: the largest single tensor of the golden Mixtral (embeddings, 131 KB) fits, the
    // model (about 1 MB) does not, so every forward pass evicts and re-uploads.
    let budget = 256 << 10;
    let be = Arc::new(CudaBackend::with_budget(g, budget).unwrap());
    let dir = shared.join("golden").join("mixtral");
    let engine = Engine::load_local_with(&dir, be.clone()).unwrap();
    check_engine_against_golden("mixtral", &dir, &engine, 10.0);
    let resident = be.resident_weight_bytes();
    assert!(
        resident > 0 && resident <= budget,
        "{resident} bytes resident, budget {budget}"
    );
}

#[test]
fn backend_operations_match_the_cpu_backend() {
    let Some(be) = backend() else { return };
    let mut r = rng(1);
    let x = Tensor::matrix(37, 96, randn(&mut r, 37 * 96, 1.0));
    let w = Tensor::matrix(80, 96, randn(&mut r, 80 * 96, 0.2));
    let b = Tensor::new(vec![80], randn(&mut r, 80, 0.1)).unwrap();
    let cpu = CpuBackend.linear(&x, &Weight::F32(w.clone()), Some(&b));
    let gpu = be.linear(&x, &Weight::F32(w.clone()), Some(&b));
    data_plane::reference::assert_close("linear f32", gpu.data(), cpu.data(), 1e-4, 1e-4);

    // bf16 weights: the GPU rounds the activations to bf16 too (the production GEMM).
    let wb = Weight::Bf16 {
        rows: 80,
        cols: 96,
        data: w.data().iter().map(|&v| f2bf(v)).collect(),
    };
    let xr = Tensor::matrix(37, 96, x.data().iter().map(|&v| bf16_to_f32(f2bf(v))).collect());
    let cpu = CpuBackend.linear(&xr, &wb, None);
    let gpu = be.linear(&x, &wb, None);
    data_plane::reference::assert_close("linear bf16", gpu.data(), cpu.data(), 1e-3, 1e-3);

    // The fused SwiGLU FFN, f32 and bf16 weights (gate/up [80, 96], down [96, 80]).
    let up_w = Tensor::matrix(80, 96, randn(&mut r, 80 * 96, 0.2));
    let down_w = Tensor::matrix(96, 80, randn(&mut r, 96 * 80, 0.2));
    let (gw, uw, dw) = (
        Weight::F32(w.clone()),
        Weight::F32(up_w.clone()),
        Weight::F32(down_w.clone()),
    );
    let cpu = CpuBackend.swiglu_ffn(&x, &gw, &uw, &dw);
    data_plane::reference::assert_close(
        "swiglu_ffn f32",
        be.swiglu_ffn(&x, &gw, &uw, &dw).data(),
        cpu.data(),
        1e-4,
        1e-4,
    );
    let bf = |t: &Tensor| Weight::Bf16 {
        rows: t.rows(),
        cols: t.cols(),
        data: t.data().iter().map(|&v| f2bf(v)).collect(),
    };
    let (gb, ub, db) = (bf(&w), bf(&up_w), bf(&down_w));
    let cpu = CpuBackend.swiglu_ffn(&x, &gb, &ub, &db);
    let scale = cpu.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // The GPU rounds the input and the activation to bf16 before each bf16 product.
    data_plane::reference::assert_close(
        "swiglu_ffn bf16",
        be.swiglu_ffn(&x, &gb, &ub, &db).data(),
        cpu.data(),
        0.02 * scale,
        0.02,
    );

    let g = Tensor::new(vec![96], randn(&mut r, 96, 1.0)).unwrap();
    let cpu = CpuBackend.rms_norm(&x, &g, 1e-6);
    data_plane::reference::assert_close("rms_norm", be.rms_norm(&x, &g, 1e-6).data(), cpu.data(), 1e-5, 1e-5);
    let cpu = CpuBackend.layer_norm(&x, &g, &g, 1e-5);
    data_plane::reference::assert_close(
        "layer_norm",
        be.layer_norm(&x, &g, &g, 1e-5).data(),
        cpu.data(),
        1e-5,
        1e-4,
    );
    let up = Tensor::matrix(37, 96, randn(&mut r, 37 * 96, 9.0));
    let cpu = CpuBackend.silu_mul(&x, &up);
    data_plane::reference::assert_close("silu_mul", be.silu_mul(&x, &up).data(), cpu.data(), 1e-5, 1e-5);
    let big = Tensor::matrix(37, 96, randn(&mut r, 37 * 96, 9.0));
    let cpu = CpuBackend.clamped_swiglu(&big, &up, 7.0, 1.702);
    data_plane::reference::assert_close(
        "clamped_swiglu",
        be.clamped_swiglu(&big, &up, 7.0, 1.702).data(),
        cpu.data(),
        1e-4,
        1e-5,
    );

    // Attention: GQA, a sliding window and sinks, a prefill chunk of 5 after 40 cached, and a
    // context long enough to need more than 48 KiB of shared memory.
    for (p, t, window, sinks) in [(45, 5, None, false), (45, 5, Some(8), true), (20_000, 1, None, false)] {
        let s = AttentionShape {
            heads: 8,
            kv_heads: 2,
            qk_dim: 32,
            v_dim: 32,
            scale: 1.0 / 32f32.sqrt(),
            window,
        };
        let q = randn(&mut r, t * 8 * 32, 1.0);
        let k = randn(&mut r, p * 2 * 32, 1.0);
        let v = randn(&mut r, p * 2 * 32, 1.0);
        let sk = randn(&mut r, 8, 1.0);
        let sinks = sinks.then_some(sk.as_slice());
        let kv = KvView::contiguous(&k, &v, 2 * 32, 2 * 32);
        let cpu = CpuBackend.attention(&q, &kv, p - t, sinks, &s);
        let gpu = be.attention(&q, &kv, p - t, sinks, &s);
        data_plane::reference::assert_close(&format!("attention P={p}"), gpu.data(), cpu.data(), 1e-5, 1e-4);
    }
}

#[test]
fn router_kernels_match_the_engine_router() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut r = rng(2);
    let (tokens, experts, k) = (300usize, 64usize, 6usize);
    let mut logits = randn(&mut r, tokens * experts, 3.0);
    // Exact ties must go to the lower id, as on the CPU.
    logits[5] = logits[9];
    let bias = randn(&mut r, experts, 0.05);
    let ld = s.clone_htod(&logits).unwrap();
    let bd = s.clone_htod(&bias).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (t_i, e_i, k_i) = (tokens as i32, experts as i32, k as i32);
    for renorm in [0i32, 1] {
        let mut ids = s.alloc_zeros::<i32>(tokens * k).unwrap();
        let mut w = s.alloc_zeros::<f32>(tokens * k).unwrap();
        unsafe {
            s.launch_builder(g.func("topk_softmax_f32"))
                .arg(&ld)
                .arg(&t_i)
                .arg(&e_i)
                .arg(&k_i)
                .arg(&renorm)
                .arg(&mut ids)
                .arg(&mut w)
                .launch(cfg)
                .unwrap();
        }
        let (ids, w) = (s.clone_dtoh(&ids).unwrap(), s.clone_dtoh(&w).unwrap());
        let kind = RouterKind::SoftmaxTopK {
            renormalize: renorm == 1,
        };
        for t in 0..tokens {
            let (ci, cw) = route(&kind, k, &logits[t * experts..(t + 1) * experts], None);
            let gi: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&x| x as usize).collect();
            assert_eq!(gi, ci, "softmax top-k token {t}");
            data_plane::reference::assert_close("softmax weights", &w[t * k..(t + 1) * k], &cw, 1e-6, 1e-5);
        }
    }
    let (n_group, topk_group) = (8i32, 3i32);
    let scaling = 2.5f32;
    let renorm = 1i32;
    let mut ids = s.alloc_zeros::<i32>(tokens * k).unwrap();
    let mut w = s.alloc_zeros::<f32>(tokens * k).unwrap();
    unsafe {
        s.launch_builder(g.func("topk_sigmoid_group_f32"))
            .arg(&ld)
            .arg(&bd)
            .arg(&t_i)
            .arg(&e_i)
            .arg(&k_i)
            .arg(&n_group)
            .arg(&topk_group)
            .arg(&renorm)
            .arg(&scaling)
            .arg(&mut ids)
            .arg(&mut w)
            .launch(cfg)
            .unwrap();
    }
    let (ids, w) = (s.clone_dtoh(&ids).unwrap(), s.clone_dtoh(&w).unwrap());
    let kind = RouterKind::SigmoidGrouped {
        n_group: n_group as usize,
        topk_group: topk_group as usize,
        renormalize: true,
        scaling,
    };
    for t in 0..tokens {
        let (ci, cw) = route(&kind, k, &logits[t * experts..(t + 1) * experts], Some(&bias));
        let gi: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&x| x as usize).collect();
        assert_eq!(gi, ci, "grouped sigmoid top-k token {t}");
        data_plane::reference::assert_close("sigmoid weights", &w[t * k..(t + 1) * k], &cw, 1e-6, 1e-5);
    }
}

#[test]
fn rope_and_bf16_norm_kernels_match_the_host() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut r = rng(3);
    let (tokens, heads, dim) = (7usize, 4usize, 64usize);
    for interleave in [false, true] {
        let cfg = data_plane::config::RopeConfig {
            theta: 10000.0,
            dim,
            interleave,
            yarn: None,
        };
        let rope = data_plane::rope::Rope::new(&cfg);
        let x = randn(&mut r, tokens * heads * dim, 1.0);
        let positions: Vec<i32> = (0..tokens as i32).map(|p| p * 3 + 1).collect();
        let mut want = x.clone();
        for t in 0..tokens {
            let (c, sn) = rope.cos_sin(positions[t] as usize);
            for h in 0..heads {
                rope.rotate(&mut want[(t * heads + h) * dim..(t * heads + h + 1) * dim], &c, &sn);
            }
        }
        let mut xd = s.clone_htod(&x).unwrap();
        let pd = s.clone_htod(&positions).unwrap();
        let fd = s.clone_htod(&rope.inv_freq).unwrap();
        let (h_i, d_i, rd, il, sc) = (
            heads as i32,
            dim as i32,
            dim as i32,
            interleave as i32,
            rope.attention_scaling,
        );
        unsafe {
            s.launch_builder(g.func("rope_f32"))
                .arg(&mut xd)
                .arg(&pd)
                .arg(&fd)
                .arg(&h_i)
                .arg(&d_i)
                .arg(&rd)
                .arg(&il)
                .arg(&sc)
                .launch(LaunchConfig {
                    grid_dim: (tokens as u32, heads as u32, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                })
                .unwrap();
        }
        let got = s.clone_dtoh(&xd).unwrap();
        data_plane::reference::assert_close(&format!("rope interleave={interleave}"), &got, &want, 1e-5, 1e-5);
    }

    let (rows, cols) = (9usize, 200usize);
    let x: Vec<u16> = randn(&mut r, rows * cols, 2.0).into_iter().map(f2bf).collect();
    let w: Vec<u16> = randn(&mut r, cols, 1.0).into_iter().map(f2bf).collect();
    let (xd, wd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
    let mut yd = s.alloc_zeros::<u16>(rows * cols).unwrap();
    let (c_i, eps) = (cols as i32, 1e-6f32);
    unsafe {
        s.launch_builder(g.func("rms_norm_bf16"))
            .arg(&xd)
            .arg(&wd)
            .arg(&mut yd)
            .arg(&c_i)
            .arg(&eps)
            .launch(LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (224, 1, 1),
                shared_mem_bytes: 0,
            })
            .unwrap();
    }
    let got: Vec<f32> = s.clone_dtoh(&yd).unwrap().into_iter().map(bf16_to_f32).collect();
    let xf = Tensor::matrix(rows, cols, x.iter().map(|&b| bf16_to_f32(b)).collect());
    let wf = Tensor::new(vec![cols], w.iter().map(|&b| bf16_to_f32(b)).collect()).unwrap();
    let want = CpuBackend.rms_norm(&xf, &wf, eps);
    // One bf16 rounding of the output: relative 2^-8.
    data_plane::reference::assert_close("rms_norm bf16", &got, want.data(), 1e-3, 8e-3);
}

/// Random HF-layout bf16 expert weights.
fn expert_weights(r: &mut impl Rng, h: usize, i: usize) -> (Vec<u16>, Vec<u16>, Vec<u16>) {
    let s1 = 1.0 / (h as f32).sqrt();
    let s2 = 1.0 / (i as f32).sqrt();
    let mk = |r: &mut dyn rand::RngCore, n: usize, s: f32| -> Vec<u16> {
        (0..n).map(|_| f2bf((r.gen::<f32>() * 2.0 - 1.0) * s * 1.7)).collect()
    };
    (mk(r, i * h, s1), mk(r, i * h, s1), mk(r, h * i, s2))
}

#[test]
fn the_device_expert_layer_matches_an_f32_host_computation() {
    let Some(g) = gpu() else { return };
    let mut r = rng(4);
    let (h, i, e, tokens, k) = (256usize, 512usize, 8usize, 67usize, 2usize);
    let weights: Vec<_> = (0..e).map(|_| expert_weights(&mut r, h, i)).collect();
    let mut layer = DeviceExpertLayer::new(g.clone(), h, i, e);
    for (ex, (w1, w3, w2)) in weights.iter().enumerate() {
        layer
            .install(ex, DeviceExpert::upload(&g, h, i, w1, w3, w2).unwrap())
            .unwrap();
    }
    let x: Vec<u16> = randn(&mut r, tokens * h, 1.0).into_iter().map(f2bf).collect();
    // Skewed routing with expert 5 never chosen (an expert without work is skipped).
    let table = [0u32, 0, 0, 1, 2, 3, 4, 6, 7, 7];
    let ids: Vec<u32> = (0..tokens)
        .flat_map(|t| {
            let first = table[(t * 7 + t / 3) % 10];
            let mut second = (first + 1 + (t % 3) as u32) % 8;
            if second == 5 {
                second = 6;
            }
            if second == first {
                second = (first + 1) % 8;
            }
            [first, second]
        })
        .collect();
    assert!(!ids.contains(&5));
    let wts: Vec<f32> = (0..tokens * k).map(|s| 0.3 + 0.4 * ((s % 3) as f32 / 2.0)).collect();
    let xd = g.stream.clone_htod(&x).unwrap();
    let out = layer.forward(&xd, tokens, &ids, &wts, k).unwrap();
    let got: Vec<f32> = g
        .stream
        .clone_dtoh(&out)
        .unwrap()
        .into_iter()
        .map(bf16_to_f32)
        .collect();

    let f = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| bf16_to_f32(b)).collect() };
    let mut want = vec![0.0f32; tokens * h];
    for t in 0..tokens {
        let xt = f(&x[t * h..(t + 1) * h]);
        for j in 0..k {
            let (w1, w3, w2) = &weights[ids[t * k + j] as usize];
            let (w1, w3, w2) = (f(w1), f(w3), f(w2));
            let act: Vec<f32> = (0..i)
                .map(|n| {
                    let gt: f32 = (0..h).map(|c| xt[c] * w1[n * h + c]).sum();
                    let up: f32 = (0..h).map(|c| xt[c] * w3[n * h + c]).sum();
                    gt / (1.0 + (-gt).exp()) * up
                })
                .collect();
            for c in 0..h {
                let y: f32 = (0..i).map(|n| act[n] * w2[c * i + n]).sum();
                want[t * h + c] += wts[t * k + j] * y;
            }
        }
    }
    let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    // bf16 intermediates (gate_up, activation, expert outputs, the combined output).
    data_plane::reference::assert_close("expert layer", &got, &want, 0.02 * scale, 0.02);

    // A cold start from pinned memory gives the same instance, bit for bit.
    let copy = g.ctx.new_stream().unwrap();
    let (w1, w3, w2) = &weights[3];
    let pinned = PinnedExpert::stage(&g, h, i, w1, w3, w2).unwrap();
    let (inst, done) = pinned.start(&copy).unwrap();
    g.stream.wait(&done).unwrap();
    layer.install(3, inst).unwrap();
    let again = layer.forward(&xd, tokens, &ids, &wts, k).unwrap();
    assert_eq!(g.stream.clone_dtoh(&again).unwrap(), g.stream.clone_dtoh(&out).unwrap());

    // Scale to zero: a routed expert that is not resident is an error, not a crash.
    layer.evict(3);
    assert!(layer.forward(&xd, tokens, &ids, &wts, k).is_err());
}

#[test]
fn nccl_all_to_all_moves_rows_between_local_gpus() {
    let Some(g) = gpu() else { return };
    if !nccl_available() {
        assert!(
            std::env::var("MOELESS_REQUIRE_CUDA").as_deref() != Ok("1"),
            "MOELESS_REQUIRE_CUDA=1 but libnccl is missing"
        );
        eprintln!("skipped: libnccl not found");
        return;
    }
    let n = data_plane::cuda::device_count().unwrap();
    let streams: Vec<_> = (0..n)
        .map(|o| {
            if o == 0 {
                g.ctx.new_stream().unwrap()
            } else {
                cudarc::driver::CudaContext::new(o).unwrap().new_stream().unwrap()
            }
        })
        .collect();
    let comms = LocalComms::new(streams.clone()).unwrap();
    let cols = 16usize;
    // rank r sends (r + p + 1) rows to peer p; row values encode (source rank, dest, index).
    let send_rows: Vec<Vec<usize>> = (0..n).map(|r| (0..n).map(|p| r + p + 1).collect()).collect();
    let mut sends = Vec::new();
    let mut recvs = Vec::new();
    for r in 0..n {
        let mut v = Vec::new();
        for p in 0..n {
            for i in 0..send_rows[r][p] {
                v.extend((0..cols).map(|c| f2bf((r * 1000 + p * 100 + i * 10 + c) as f32 / 8.0)));
            }
        }
        sends.push(streams[r].clone_htod(&v).unwrap());
        let inn: usize = (0..n).map(|p| send_rows[p][r]).sum::<usize>() * cols;
        recvs.push(streams[r].alloc_zeros::<u16>(inn).unwrap());
    }
    comms.all_to_all_v(&sends, &send_rows, &mut recvs, cols).unwrap();
    for r in 0..n {
        let got = streams[r].clone_dtoh(&recvs[r]).unwrap();
        let mut want = Vec::new();
        for p in 0..n {
            for i in 0..send_rows[p][r] {
                want.extend((0..cols).map(|c| f2bf((p * 1000 + r * 100 + i * 10 + c) as f32 / 8.0)));
            }
        }
        assert_eq!(got, want, "rank {r} of {n}");
    }
    eprintln!("NCCL all-to-all over {n} GPU(s) verified");
}
