//! `moeless serve --control` against a cluster of separate processes (a `moeless control-plane`
//! node, three `moeless worker`s, the endpoint): the model registers itself, the control plane
//! places it, completions match the in-process engine token for token, and a worker that gets
//! SIGTERM drains gracefully: its experts move elsewhere, no request fails, and it exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_moeless");

/// A child process killed when dropped (a failing test leaves nothing behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    Proc(
        Command::new(EXE)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting moeless"),
    )
}

use chaos_tests::ports::free_loopback_port as free_port;

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Greedy completion token ids from the endpoint.
fn complete(addr: &str, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>, String> {
    let req = serde_json::json!({
        "model": "model", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "return_token_ids": true,
    });
    let (status, body) = http(addr, "POST", "/v1/completions", Some(&req)).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    serde_json::from_value(v["choices"][0]["token_ids"].clone()).map_err(|e| format!("{e}: {body}"))
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_against_an_external_cluster_matches_in_process_and_survives_a_graceful_drain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    data_plane::engine::Engine::write_builtin(&model).unwrap();
    let tls = d.join("tls");
    let certs = Command::new(EXE)
        .args(["certs", "generate", "--out", tls.to_str().unwrap()])
        .args(["--names", "cp-1,worker-1,worker-2,worker-3,engine"])
        .output()
        .unwrap();
    assert!(certs.status.success(), "{}", String::from_utf8_lossy(&certs.stderr));

    let raft = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let _cp = spawn(
        &[
            "control-plane",
            "--id",
            "1",
            "--raft-addr",
            &raft,
            "--admin-addr",
            &admin,
            "--data-dir",
            d.join("cp").to_str().unwrap(),
            "--worker-timeout-ms",
            "1000",
            "--tls-dir",
            tls.to_str().unwrap(),
        ],
        &d.join("cp.log"),
    );
    let mut workers: Vec<Proc> = (1..=3)
        .map(|i| {
            spawn(
                &[
                    "worker",
                    "--id",
                    &i.to_string(),
                    "--control",
                    &raft,
                    "--listen",
                    "127.0.0.1:0",
                    "--tls-dir",
                    tls.to_str().unwrap(),
                    "--tls-name",
                    &format!("worker-{i}"),
                    "--heartbeat-ms",
                    "50",
                    "--threads",
                    "1",
                    "--memory-gb",
                    "1",
                ],
                &d.join(format!("worker-{i}.log")),
            )
        })
        .collect();

    // The endpoint: prints its address once the model is placed and the plan is active.
    let mut serve = Command::new(EXE)
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(["--control", &raft, "--tls-dir", tls.to_str().unwrap()])
        .args(["--cluster-wait-s", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let _serve = Proc(serve);
    let (tx, rx) = std::sync::mpsc::channel();
    let serve_log = d.join("serve.log");
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(serve_log).unwrap();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Some(rest) = line.split_once("at http://").map(|x| x.1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(90)).unwrap_or_else(|_| {
        panic!(
            "the endpoint did not come up; serve log:\n{}",
            std::fs::read_to_string(d.join("serve.log")).unwrap_or_default()
        )
    });

    // Token for token what the engine computes in this process.
    let prompt = [1u32, 5, 9, 2, 7];
    let engine = data_plane::engine::Engine::load_local(&model).unwrap();
    let expected = engine.generate_greedy(&[prompt.to_vec()], 8).unwrap().remove(0);
    assert_eq!(complete(&addr, &prompt, 8).unwrap(), expected);

    // The control plane placed the model on all three workers.
    let plan = || -> Value {
        let (status, body) = http(&admin, "GET", "/v1/placement", None).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let holders = |p: &Value| -> std::collections::BTreeSet<u64> {
        p["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["worker"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(holders(&plan()), [1, 2, 3].into(), "{}", plan());

    // Load runs while worker 1 drains on SIGTERM.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr, expected) = (stop.clone(), addr.clone(), expected.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match complete(&addr, &prompt, 8) {
                    Ok(t) if t == expected => ok += 1,
                    Ok(t) => failed.push(format!("wrong tokens {t:?}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid = workers[0].0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut exit = None;
    wait_until("the drained worker to exit", Duration::from_secs(30), || {
        exit = workers[0].0.try_wait().unwrap();
        exit.is_some()
    });
    // Traffic goes on after the worker is gone.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    let log = std::fs::read_to_string(d.join("worker-1.log")).unwrap_or_default();
    assert!(
        exit.unwrap().success(),
        "drained worker exited with {exit:?}; log:\n{log}"
    );
    assert!(
        log.contains("drained: exiting"),
        "the worker did not drain cleanly; log:\n{log}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0, "no request completed during the drain");

    // The newest plan leaves worker 1 out and the control plane lists it as draining.
    let latest = plan();
    assert_eq!(holders(&latest), [2, 3].into(), "{latest}");
    assert!(latest["reason"].as_str().unwrap().contains("draining"), "{latest}");
    let (_, body) = http(&admin, "GET", "/v1/workers", None).unwrap();
    let ws: Value = serde_json::from_str(&body).unwrap();
    let w1 = ws
        .as_array()
        .or_else(|| ws["workers"].as_array())
        .unwrap()
        .iter()
        .find(|w| w["id"].as_u64() == Some(1) || w["worker"]["id"].as_u64() == Some(1))
        .cloned()
        .unwrap_or_default();
    assert_eq!(w1["health"], "draining", "{ws}");
    assert_eq!(complete(&addr, &prompt, 8).unwrap(), expected);
    drop(workers.remove(0));
}
