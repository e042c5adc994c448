//! Test support for the reference data beside the checkout (`../shared`): locating it and
//! reading the golden transformers outputs. Used by the integration tests of every crate;
//! these helpers panic with a clear message instead of returning errors, as tests want.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::engine::{argmax, Engine};
use crate::model::LogitsWanted;

/// The reference-data folder: `MOELESS_SHARED_DIR`, else `../shared` beside the checkout.
/// Returns `None` only when the caller explicitly opted out with `MOELESS_SKIP_REFERENCE=1`;
/// otherwise a missing folder fails the test loudly.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MOELESS_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    if dir.join("golden").is_dir() {
        return Some(dir);
    }
    if std::env::var("MOELESS_SKIP_REFERENCE").as_deref() == Ok("1") {
        eprintln!(
            "reference data not found at {}; skipped by MOELESS_SKIP_REFERENCE=1",
            dir.display()
        );
        return None;
    }
    panic!(
        "reference data not found at {} (set MOELESS_SHARED_DIR, or MOELESS_SKIP_REFERENCE=1 to skip explicitly)",
        dir.display()
    );
}

pub const ARCHS: [&str; 7] = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "phimoe",
    "gpt_oss",
];

/// A golden.safetensors file: float tensors as f32, id tensors as i64.
pub struct Golden {
    pub floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub ints: HashMap<String, (Vec<usize>, Vec<i64>)>,
    pub metadata: HashMap<String, String>,
}

impl Golden {
    pub fn read(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("golden header");
        let st = SafeTensors::deserialize(&bytes).expect("golden file");
        let mut floats = HashMap::new();
        let mut ints = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let d = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    let v = d
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    floats.insert(name, (shape, v));
                }
                Dtype::I64 => {
                    let v = d
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                        .collect();
                    ints.insert(name, (shape, v));
                }
                other => panic!("unexpected dtype {other:?} for {name}"),
            }
        }
        Golden {
            floats,
            ints,
            metadata: meta.metadata().clone().unwrap_or_default(),
        }
    }

    pub fn f(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.floats
            .get(name)
            .unwrap_or_else(|| panic!("golden has no float tensor {name}"))
    }

    pub fn i(&self, name: &str) -> &(Vec<usize>, Vec<i64>) {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("golden has no int tensor {name}"))
    }
}

/// Asserts `|a - b| <= atol + rtol * |b|` element-wise; returns the max abs difference.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: length {} vs {}", a.len(), b.len());
    let mut worst = 0.0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        assert!(d <= atol + rtol * y.abs(), "{what}[{i}]: got {x}, want {y} (diff {d})");
        worst = worst.max(d);
    }
    worst
}

pub fn read_prompts(dir: &Path) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(dir.join("prompts.json")).expect("prompts.json");
    crate::prompts::parse_prompts(&text).expect("golden prompts.json parses")
}

/// Checks an engine loaded from `golden/<arch>` against transformers' outputs: RoPE, logits,
/// every hidden state, router logits, expert ids/weights/counts, cached decoding and greedy
/// ids. `tol` scales the float tolerances (1 for the CPU engine; the CUDA backend sums in
/// another order). Expert ids and greedy tokens must match exactly either way.
pub fn check_engine_against_golden(arch: &str, dir: &Path, engine: &Engine, tol: f32) {
    let golden = Golden::read(&dir.join("golden.safetensors"));
    let prompts = read_prompts(dir);

    // RoPE frequencies and the attention scaling factor.
    let rope = engine.model().rope();
    assert_close(
        &format!("{arch} rope_inv_freq"),
        &rope.inv_freq,
        &golden.f("rope_inv_freq").1,
        0.0,
        1e-5,
    );
    if let Some(s) = golden.metadata.get("rope_attention_scaling") {
        let s: f32 = s.parse().expect("rope_attention_scaling is a number");
        assert!(
            (rope.attention_scaling - s).abs() < 1e-6,
            "{arch}: attention scaling {} vs {s}",
            rope.attention_scaling
        );
    }

    let out = engine
        .forward_prompts(&prompts, true)
        .unwrap_or_else(|e| panic!("{arch}: forward: {e}"));
    let layers = engine.config().num_layers;
    let moe_layers = engine.config().moe_layers();
    let e = engine.config().moe.num_experts;
    for (p, f) in out.iter().enumerate() {
        assert_close(
            &format!("{arch} p{p}.logits"),
            f.logits.data(),
            &golden.f(&format!("p{p}.logits")).1,
            1e-4 * tol,
            1e-4 * tol,
        );
        // hidden_states.{0} embeddings, .{j} layer j-1 output, .{L} final-normed; layer_output.{i} raw.
        assert_eq!(f.hidden.len(), layers + 2);
        for j in 0..=layers {
            let mine = if j == layers {
                &f.hidden[layers + 1]
            } else {
                &f.hidden[j]
            };
            let want = &golden.f(&format!("p{p}.hidden_states.{j}")).1;
            assert_close(
                &format!("{arch} p{p}.hidden_states.{j}"),
                mine.data(),
                want,
                1e-4 * tol,
                1e-4 * tol,
            );
        }
        for i in 0..layers {
            let want = &golden.f(&format!("p{p}.layer_output.{i}")).1;
            assert_close(
                &format!("{arch} p{p}.layer_output.{i}"),
                f.hidden[i + 1].data(),
                want,
                1e-4 * tol,
                1e-4 * tol,
            );
        }
        let counts = &golden.i(&format!("p{p}.expert_counts")).1;
        assert_eq!(f.routing.len(), moe_layers.len());
        for (mi, r) in f.routing.iter().enumerate() {
            let i = r.layer;
            assert_eq!(i, moe_layers[mi]);
            let ids: Vec<i64> = r.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(
                ids,
                golden.i(&format!("p{p}.expert_ids.{i}")).1,
                "{arch} p{p} expert_ids.{i}"
            );
            assert_close(
                &format!("{arch} p{p}.expert_weights.{i}"),
                &r.weights,
                &golden.f(&format!("p{p}.expert_weights.{i}")).1,
                1e-5 * tol,
                1e-5 * tol,
            );
            assert_close(
                &format!("{arch} p{p}.router_logits.{i}"),
                r.router_logits.data(),
                &golden.f(&format!("p{p}.router_logits.{i}")).1,
                1e-5 * tol,
                1e-5 * tol,
            );
            let mut mine = vec![0i64; e];
            r.ids.iter().for_each(|&x| mine[x as usize] += 1);
            assert_eq!(mine, counts[mi * e..(mi + 1) * e], "{arch} p{p} expert_counts row {mi}");
        }
    }

    // KV-cache decoding reproduces transformers' logits of every cached greedy step.
    for (p, prompt) in prompts.iter().enumerate() {
        let (shape, want) = golden.f(&format!("p{p}.gen_logits"));
        let v = shape[1];
        let mut cache = vec![engine.new_cache()];
        let (mut l, _) = engine.step(&mut cache, &[prompt], LogitsWanted::Last).expect("prefill");
        for s in 0..shape[0] {
            assert_close(
                &format!("{arch} p{p} gen_logits step {s}"),
                l[0].data(),
                &want[s * v..(s + 1) * v],
                1e-4 * tol,
                1e-4 * tol,
            );
            let next = argmax(l[0].row(0));
            l = engine
                .step(&mut cache, &[&[next]], LogitsWanted::Last)
                .expect("decode")
                .0;
        }
    }

    let gen = engine
        .generate_greedy(&prompts, 12)
        .unwrap_or_else(|e| panic!("{arch}: generate: {e}"));
    for (p, g) in gen.iter().enumerate() {
        let want: Vec<u32> = golden.i(&format!("p{p}.gen_ids")).1.iter().map(|&x| x as u32).collect();
        assert_eq!(g, &want, "{arch} p{p} greedy ids");
    }
}
