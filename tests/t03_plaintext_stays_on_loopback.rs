//! The CLI refuses plaintext control-plane gRPC off loopback: `moeless control-plane` without
//! `--tls-dir` on a non-loopback address, and `moeless worker --control-plaintext` to a
//! non-loopback control plane, exit with an error that says what to do; with certificates
//! (or `--insecure`) the same control plane starts. With `--admin-https` the admin API is
//! HTTPS too, and `moeless admin --ca-file` talks to it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

fn moeless() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeless"));
    for var in [
        "MOELESS_TLS_DIR",
        "MOELESS_TLS_NAME",
        "MOELESS_INSECURE",
        "MOELESS_CONTROL_PLAINTEXT",
        "MOELESS_ADMIN_HTTPS",
        "MOELESS_ADMIN_CA",
        "MOELESS_ADMIN_TOKEN",
    ] {
        c.env_remove(var);
    }
    c
}

fn refused(out: Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} started: {stderr}");
    assert!(stderr.contains("refusing plaintext"), "{what}: {stderr}");
    assert!(stderr.contains("--tls-dir"), "{what}: {stderr}");
}

/// Starts a control plane and reads its "listening" line (empty if it exited first).
fn spawn_listening(args: &[&str]) -> (std::process::Child, String) {
    let mut child = moeless()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Starts a control plane, waits for its "listening" line, then kills it.
fn starts(args: &[&str]) {
    let (mut child, line) = spawn_listening(args);
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("\"listening\""), "{args:?}: {line:?}");
}

#[test]
fn plaintext_grpc_is_refused_off_loopback_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let base = [
        "control-plane",
        "--id",
        "1",
        "--admin-addr",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ];

    let out = moeless()
        .args(base)
        .args(["--raft-addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    refused(out, "control plane on 0.0.0.0 without --tls-dir");
    let out = moeless()
        .args(base)
        .args(["--raft-addr", "127.0.0.1:0", "--peers", "1=127.0.0.1:1,2=10.0.0.7:7100"])
        .output()
        .unwrap();
    refused(out, "control plane with a remote peer without --tls-dir");

    let certs = dir.path().join("certs");
    let certs = certs.to_str().unwrap();
    let out = moeless()
        .args(["certs", "generate", "--out", certs, "--names", "cp-1,worker-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    starts(&[&base[..], &["--raft-addr", "0.0.0.0:0", "--tls-dir", certs]].concat());
    starts(&[&base[..], &["--raft-addr", "0.0.0.0:0", "--insecure"]].concat());

    let out = moeless()
        .args([
            "worker",
            "--id",
            "1",
            "--control",
            "10.0.0.7:7100",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--tls-dir", certs, "--tls-name", "worker-1", "--control-plaintext"])
        .output()
        .unwrap();
    refused(out, "worker --control-plaintext to a remote control plane");
}

#[test]
fn admin_api_over_https_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs = certs.to_str().unwrap();
    let out = moeless()
        .args(["certs", "generate", "--out", certs, "--names", "cp-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = dir.path().join("data");
    let (mut child, line) = spawn_listening(&[
        "control-plane",
        "--id",
        "1",
        "--raft-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tls-dir",
        certs,
        "--admin-https",
    ]);
    let listening: serde_json::Value = serde_json::from_str(&line).expect("the listening line");
    let admin = listening["admin_addr"].as_str().expect("admin_addr").to_string();
    let ca = format!("{certs}/ca.pem");
    let admin_cli = |extra: &[&str]| {
        moeless()
            .args(["admin", "--addr", &admin])
            .args(extra)
            .arg("health")
            .output()
            .unwrap()
    };
    // The node answers over HTTPS (its /health needs no token) ...
    let mut ok = admin_cli(&["--ca-file", &ca]);
    for _ in 0..50 {
        if ok.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        ok = admin_cli(&["--ca-file", &ca]);
    }
    let stdout = String::from_utf8_lossy(&ok.stdout);
    // ... and not over plain HTTP.
    let plain = admin_cli(&[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok.status.success(), "{stdout} {}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        !plain.status.success(),
        "plain HTTP answered: {}",
        String::from_utf8_lossy(&plain.stdout)
    );

    // --admin-https without --tls-dir is a usage error.
    let out = moeless()
        .args(["control-plane", "--admin-https", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-dir"));
}
