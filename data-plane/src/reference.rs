//! Test support for the reference data beside the checkout (`../shared`): locating it and
//! reading the golden transformers outputs. Used by the integration tests of every crate;
//! these helpers panic with a clear message instead of returning errors, as tests want.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

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
