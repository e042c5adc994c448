//! The OpenAI endpoint over HTTPS (`--ssl-certfile`/`--ssl-keyfile`): a client that trusts the
//! CA completes requests, streamed ones included; plain HTTP to the TLS port, a client that
//! does not trust the CA, and a certificate that does not name the host all fail; a stalled
//! handshake does not hold up other clients.

mod common;

use std::time::Duration;

use common::{config, sse_data, MODEL};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// A server with a certificate from a fresh CA (`moeless certs generate`'s layout), the files,
/// and the directory that holds them.
async fn https_server() -> (endpoint::Server, pki::TlsFiles, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    pki::generate(dir.path(), &["endpoint"], &[]).unwrap();
    let files = pki::TlsFiles::in_dir(dir.path(), "endpoint");
    let mut cfg = config();
    cfg.tls = Some(pki::https::server_config_from_pem(&files.cert, &files.key).unwrap());
    let (server, _) = common::start(cfg).await;
    (server, files, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_over_https_and_plaintext_is_refused() {
    let (server, files, _dir) = https_server().await;
    let addr = server.local_addr();

    // A client that stalls mid-handshake (a TCP connection that never speaks TLS) is open while
    // the others are served.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    silent.write_all(b"\x16\x03").await.unwrap();

    let https = pki::https::http_client_builder_with_ca(&files.ca)
        .unwrap()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // The certificate names localhost and 127.0.0.1: both verify.
    for host in [
        format!("127.0.0.1:{}", addr.port()),
        format!("localhost:{}", addr.port()),
    ] {
        let health = https.get(format!("https://{host}/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "{host}");
    }
    let base = format!("https://127.0.0.1:{}", addr.port());
    let r = https
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "The capital of", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");

    let r = https
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = common::client();
    let err = plain
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(err.is_err() || !err.unwrap().status().is_success());

    // A client that trusts another CA refuses the server.
    let other = tempfile::tempdir().unwrap();
    pki::generate(other.path(), &["x"], &[]).unwrap();
    let stranger = pki::https::http_client_builder_with_ca(&other.path().join("ca.pem"))
        .unwrap()
        .build()
        .unwrap();
    let err = stranger
        .get(format!("{base}/health"))
        .send()
        .await
        .expect_err("a server outside the trusted CA is refused");
    assert!(err.is_connect(), "{err:?}");

    drop(silent);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_certificate_that_does_not_name_the_host_is_refused() {
    let (server, files, _dir) = https_server().await;
    let https = pki::https::http_client_builder_with_ca(&files.ca)
        .unwrap()
        // Resolve a name the certificate does not carry to the server's address.
        .resolve("api.example.com", server.local_addr())
        .build()
        .unwrap();
    let err = https
        .get(format!("https://api.example.com:{}/health", server.local_addr().port()))
        .send()
        .await
        .expect_err("a certificate for other names is refused");
    assert!(err.is_connect(), "{err:?}");
    server.shutdown().await.unwrap();
}
