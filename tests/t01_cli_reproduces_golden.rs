//! The `moeless forward` / `moeless generate` command-line contract reproduces the golden
//! transformers outputs for every architecture, run as a user would (a separate process).

use std::path::Path;
use std::process::Command;

use data_plane::reference::{assert_close, shared_dir, Golden, ARCHS};

fn moeless(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args(args)
        .output()
        .expect("running moeless");
    assert!(
        out.status.success(),
        "moeless {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(arch: &str, split: &str) {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden").join(arch);
    let tmp = tempfile::tempdir().expect("tempdir");
    let fwd = tmp.path().join("out.safetensors");
    let gen = tmp.path().join("gen.json");
    let d = dir.to_str().expect("utf-8 path");
    let prompts = dir.join("prompts.json");
    let p = prompts.to_str().expect("utf-8 path");
    moeless(&[
        "forward",
        "--model",
        d,
        "--prompts",
        p,
        "--out",
        fwd.to_str().unwrap(),
        "--experts-split",
        split,
    ]);
    moeless(&[
        "generate",
        "--model",
        d,
        "--prompts",
        p,
        "--max-new-tokens",
        "12",
        "--out",
        gen.to_str().unwrap(),
        "--experts-split",
        split,
    ]);

    let golden = Golden::read(&dir.join("golden.safetensors"));
    let mine = Golden::read(&fwd);
    let moe_layers: Vec<&str> = golden.metadata["moe_layers"].split(',').collect();
    for p in 0..3 {
        let key = format!("p{p}.logits");
        assert_eq!(mine.f(&key).0, golden.f(&key).0, "{arch} {key} shape");
        assert_close(&format!("{arch} {key}"), &mine.f(&key).1, &golden.f(&key).1, 1e-4, 1e-4);
        for i in &moe_layers {
            let ids = format!("p{p}.expert_ids.{i}");
            assert_eq!(mine.i(&ids), golden.i(&ids), "{arch} {ids}");
            let w = format!("p{p}.expert_weights.{i}");
            assert_eq!(mine.f(&w).0, golden.f(&w).0, "{arch} {w} shape");
            assert_close(&format!("{arch} {w}"), &mine.f(&w).1, &golden.f(&w).1, 1e-5, 1e-5);
        }
    }

    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&gen).expect("gen.json")).expect("JSON");
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("generate.json")).expect("generate.json")).expect("JSON");
    for p in 0..3 {
        assert_eq!(
            got["prompts"][p]["prompt_ids"], want["prompts"][p]["prompt_ids"],
            "{arch} p{p}"
        );
        assert_eq!(
            got["prompts"][p]["new_ids"], want["prompts"][p]["new_ids"],
            "{arch} p{p} new_ids"
        );
    }
}

#[test]
fn forward_and_generate_reproduce_golden_for_every_architecture() {
    for arch in ARCHS {
        check(arch, "1");
    }
}

#[test]
fn experts_split_does_not_change_the_cli_outputs() {
    for arch in ARCHS {
        check(arch, "5");
    }
}

#[test]
fn bad_inputs_fail_with_a_message_not_a_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"prompts": [[1, -3]]}"#).unwrap();
    let missing = Path::new("/nonexistent/model");
    let out = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args([
            "forward",
            "--model",
            missing.to_str().unwrap(),
            "--prompts",
            bad.to_str().unwrap(),
            "--out",
        ])
        .arg(tmp.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prompts[0]"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
