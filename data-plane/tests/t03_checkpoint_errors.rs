//! Broken checkpoints give an error that names what is wrong, never a panic: corrupted and
//! truncated files, missing tensors, wrong shapes and dtypes, bad configs. Sharded
//! checkpoints load the same weights as single files.

use std::collections::BTreeMap;
use std::path::Path;

use data_plane::checkpoint::{save_safetensors, Checkpoint, RawTensor, TensorSource};
use data_plane::config::Arch;
use data_plane::engine::Engine;
use data_plane::error::LoadError;
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};

fn fresh(arch: Arch) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), arch, &ModelShape::tiny(), 1, SaveDtype::F32).unwrap();
    dir
}

fn load_err(dir: &Path) -> LoadError {
    match Engine::load_local(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Re-writes model.safetensors after editing its tensors.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, RawTensor>)) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut all: BTreeMap<String, RawTensor> = ckpt
        .names()
        .map(|n| {
            let shape = ckpt.shape(n).unwrap().to_vec();
            let t = ckpt.tensor(n, &shape).unwrap();
            (n.to_string(), RawTensor::f32(n, shape, t.data()))
        })
        .collect();
    drop(ckpt);
    edit(&mut all);
    let list: Vec<RawTensor> = all.into_values().collect();
    save_safetensors(&dir.join("model.safetensors"), &list).unwrap();
}

#[test]
fn truncated_file_is_an_error() {
    let dir = fresh(Arch::Mixtral);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, LoadError::Checkpoint { .. }), "{e}");
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Checkpoint { .. }));
}

#[test]
fn corrupted_header_is_an_error() {
    let dir = fresh(Arch::Olmoe);
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("header"), "{e}");
    // A header length larger than the file.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Checkpoint { .. }));
}

#[test]
fn missing_tensor_is_named_with_its_expected_shape() {
    let dir = fresh(Arch::Qwen2Moe);
    rewrite(dir.path(), |t| {
        t.remove("model.layers.1.mlp.experts.3.up_proj.weight");
    });
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.1.mlp.experts.3.up_proj.weight") && msg.contains("[48, 32]"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = fresh(Arch::DeepseekV3);
    rewrite(dir.path(), |t| {
        t.insert(
            "model.layers.1.mlp.gate.weight".into(),
            RawTensor::f32("model.layers.1.mlp.gate.weight", vec![7, 32], &[0.0; 7 * 32]),
        );
    });
    let e = load_err(dir.path());
    assert!(
        matches!(&e, LoadError::ShapeMismatch { name, .. } if name == "model.layers.1.mlp.gate.weight"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = fresh(Arch::GptOss);
    rewrite(dir.path(), |t| {
        t.insert(
            "model.layers.0.self_attn.sinks".into(),
            RawTensor::i64("model.layers.0.self_attn.sinks", vec![4], &[1, 2, 3, 4]),
        );
    });
    let e = load_err(dir.path());
    assert!(
        matches!(&e, LoadError::UnsupportedDtype { name, .. } if name == "model.layers.0.self_attn.sinks"),
        "{e}"
    );
}

#[test]
fn bad_configs_are_errors() {
    let dir = fresh(Arch::Phimoe);
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type": "llama", "hidden_size": 32}"#).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::UnknownArchitecture { .. }));
    std::fs::write(&cfg, "not json").unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Config { .. }));
    std::fs::remove_file(&cfg).unwrap();
    assert!(matches!(load_err(dir.path()), LoadError::Io { .. }));
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), "{}").unwrap();
    assert!(matches!(load_err(empty.path()), LoadError::Config { .. }));
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let dir = fresh(Arch::Qwen3Moe);
    let single = Engine::load_local(dir.path()).unwrap();
    let want = single.forward_prompts(&[vec![3, 1, 4, 1, 5]], false).unwrap();

    // Split the tensors over two shard files plus an index.
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let mut names: Vec<String> = ckpt.names().map(String::from).collect();
    names.sort();
    let mut shards: [Vec<RawTensor>; 2] = [vec![], vec![]];
    let mut map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let shape = ckpt.shape(n).unwrap().to_vec();
        let t = ckpt.tensor(n, &shape).unwrap();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(n.clone(), serde_json::Value::String(file));
        shards[i % 2].push(RawTensor::f32(n.clone(), shape, t.data()));
    }
    drop(ckpt);
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("config.json"), sharded.path().join("config.json")).unwrap();
    for (i, s) in shards.iter().enumerate() {
        save_safetensors(
            &sharded.path().join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            s,
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let got = Engine::load_local(sharded.path())
        .unwrap()
        .forward_prompts(&[vec![3, 1, 4, 1, 5]], false)
        .unwrap();
    assert_eq!(got[0].logits, want[0].logits);

    // An index pointing outside the directory is refused.
    let index = serde_json::json!({"weight_map": {"lm_head.weight": "../x.safetensors"}});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(matches!(load_err(sharded.path()), LoadError::Checkpoint { .. }));
}
