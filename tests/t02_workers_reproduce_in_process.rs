//! `forward` and `generate` with every routed expert on 1-4 worker processes over QUIC
//! reproduce the in-process outputs for the golden models: under static and replicated plans,
//! plans that change between decode steps, and a worker SIGKILLed during generation.

use std::path::Path;
use std::process::Command;

use data_plane::reference::{assert_close, shared_dir, Golden, ARCHS};

/// Runs moeless; returns stderr.
fn moeless(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args(args)
        .output()
        .expect("running moeless");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "moeless {args:?} failed: {err}");
    err
}

/// The dispatcher's counters printed by the CLI (`dispatch: {...}`).
fn dispatch_stats(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("dispatch: ").map(|x| x.1))
        .unwrap_or_else(|| panic!("no dispatch line in {stderr}"));
    serde_json::from_str(line).expect("dispatch stats JSON")
}

fn forward(dir: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--prompts",
        dir.join("prompts.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    moeless(&refs)
}

fn generate(dir: &Path, out: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let prompts = dir.join("prompts.json");
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let err = moeless(&args);
    let json = serde_json::from_slice(&std::fs::read(out).expect("generate output")).expect("JSON");
    (json, err)
}

fn compare_forward(arch: &str, a: &Path, b: &Path) {
    let (a, b) = (Golden::read(a), Golden::read(b));
    assert!(!a.floats.is_empty() && !a.ints.is_empty());
    assert_eq!(a.floats.len(), b.floats.len(), "{arch}: tensor count");
    for (name, (shape, values)) in &a.floats {
        assert_eq!(shape, &b.f(name).0, "{arch} {name} shape");
        assert_close(&format!("{arch} {name}"), values, &b.f(name).1, 1e-5, 1e-5);
    }
    for (name, ids) in &a.ints {
        assert_eq!(ids, b.i(name), "{arch} {name}");
    }
}

/// Every value bit for bit (f32 activations on the wire, the same order of additions).
fn compare_forward_exactly(arch: &str, a: &Path, b: &Path) {
    let (a, b) = (Golden::read(a), Golden::read(b));
    for (name, (_, values)) in &a.floats {
        let other = &b.f(name).1;
        let same = values
            .iter()
            .zip(other)
            .all(|(x, y)| x.to_bits() == y.to_bits() || x == y);
        assert!(same && values.len() == other.len(), "{arch} {name}: not bit-identical");
    }
}

#[test]
fn forward_over_workers_matches_in_process_for_every_architecture() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (i, arch) in ARCHS.iter().enumerate() {
        let dir = shared.join("golden").join(arch);
        let local = tmp.path().join(format!("{arch}-local.safetensors"));
        forward(&dir, &local, &[]);
        // 1 to 4 workers, static and replicated (two uneven instances per expert) plans.
        let workers = (1 + i % 4).to_string();
        let plan = if i % 2 == 0 { "rotate" } else { "static" };
        let remote = tmp.path().join(format!("{arch}-remote.safetensors"));
        let err = forward(&dir, &remote, &["--workers", &workers, "--plan", plan]);
        let stats = dispatch_stats(&err);
        assert!(
            stats["messages"].as_u64().unwrap() > 0,
            "{arch}: no message reached a worker: {stats}"
        );
        assert_eq!(stats["failed_messages"], 0, "{arch}: {stats}");
        // Answers hold one summed row per (token, worker), no more than the requests carried.
        let (sent, received) = (stats["bytes_sent"].as_u64(), stats["bytes_received"].as_u64());
        assert!(received < sent, "{arch}: {stats}");
        // Every golden model routes each token to 2 or more experts: on one worker, a token
        // travels once for all of them, and with one instance per expert (the same matrix
        // shapes as in process) its outputs are summed in the in-process order.
        if workers == "1" {
            assert!(stats["rows_shared"].as_u64().unwrap() > 0, "{arch}: {stats}");
            assert!(stats["rows_summed"].as_u64().unwrap() > 0, "{arch}: {stats}");
            let one = tmp.path().join(format!("{arch}-one.safetensors"));
            forward(&dir, &one, &["--workers", "1", "--plan", "static"]);
            compare_forward_exactly(arch, &local, &one);
        }
        compare_forward(arch, &local, &remote);
    }
}

#[test]
fn generation_is_unchanged_when_the_plan_changes_every_step() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["mixtral", "deepseek_v3"] {
        let dir = shared.join("golden").join(arch);
        let (want, _) = generate(&dir, &tmp.path().join("local.json"), &[]);
        let (got, err) = generate(
            &dir,
            &tmp.path().join("remote.json"),
            &["--workers", "3", "--plan", "rotate", "--replan-every", "1"],
        );
        assert_eq!(got, want, "{arch}");
        let stats = dispatch_stats(&err);
        // The first plan plus one per decode step (7 of them with 8 new tokens).
        assert!(stats["activations"].as_u64().unwrap() >= 8, "{arch}: {stats}");
    }
}

#[test]
fn a_worker_killed_during_generation_does_not_change_the_tokens() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = shared.join("golden").join("qwen3_moe");
    let (want, _) = generate(&dir, &tmp.path().join("local.json"), &[]);
    let (got, err) = generate(
        &dir,
        &tmp.path().join("remote.json"),
        &["--workers", "3", "--plan", "static", "--kill-worker-at-step", "3"],
    );
    assert_eq!(got, want);
    let stats = dispatch_stats(&err);
    assert!(
        stats["redispatched_tasks"].as_u64().unwrap() > 0,
        "the killed worker's work was never re-dispatched: {stats}"
    );
}

#[test]
fn workers_need_a_model_directory_and_say_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args(["forward", "--workers", "2", "--out", "/tmp/never-written.safetensors"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--model"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `moeless up --workers 2` serves the OpenAI API with its experts on worker processes, and
/// its workers exit with it.
#[test]
fn up_with_workers_serves_completions_and_takes_its_workers_down() {
    use std::io::{BufRead, BufReader, Read, Write};
    // Killed on drop, so a failed assertion does not leave it holding the test's output open.
    struct Up(std::process::Child);
    impl Drop for Up {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut up = Up(Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args(["up", "--workers", "2", "--port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap());
    let child = &mut up.0;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split_once("at http://").map(|x| x.1) {
                let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("server address");
    let body = r#"{"model":"moeless-builtin","prompt":[1,2,3],"max_tokens":4}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"completion_tokens\":4"), "{resp}");
    // The dispatcher's counters are on /metrics: the completion's layers went to the workers.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut metrics = String::new();
    s.read_to_string(&mut metrics).unwrap();
    for name in [
        "moeless_dispatch_bytes_sent_total",
        "moeless_dispatch_bytes_received_total",
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        assert!(value > 0.0, "{name} = {value}");
    }
    let pid = child.id();
    // The endpoint's own children are the workers.
    let children = || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let workers = children();
    assert_eq!(workers.len(), 2, "expected two worker processes, found {workers:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while workers.iter().any(|w| Path::new(&format!("/proc/{w}")).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "workers outlived their parent: {workers:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
