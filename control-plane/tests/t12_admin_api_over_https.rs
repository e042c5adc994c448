//! The admin REST API over HTTPS (`--admin-https`, the node's certificate from `--tls-dir`):
//! a client trusting the cluster CA reads and writes with its token; plain HTTP, a client
//! trusting another CA, and a request without the token all fail.

mod common;

use common::*;
use control_plane::client::{AdminClient, ClientError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    pki::generate(&tls, &["cp-1"], &[]).unwrap();
    let identity = pki::Identity::load(&pki::TlsFiles::in_dir(&tls, "cp-1")).unwrap();
    let mut cfg = config(&dir.path().join("data"));
    cfg.admin_tls = Some(pki::https::server_config(&identity).unwrap());
    let node = start_single(cfg).await;
    let addr = node.admin_addr.to_string();
    let ca = tls.join("ca.pem");

    let api = AdminClient::with_ca(&addr, Some(TOKEN.into()), Some(&ca)).unwrap();
    api.post("/v1/models", Some(&model()))
        .await
        .expect("a write over HTTPS");
    let cluster = api.get("/v1/cluster").await.expect("a read over HTTPS");
    assert_eq!(cluster["leader"], 1, "{cluster}");
    assert_eq!(api.get("/v1/models").await.unwrap()[0]["name"], "mixtral-tiny");

    // The token is still required under TLS.
    let anonymous = AdminClient::with_ca(&addr, None, Some(&ca)).unwrap();
    match anonymous.get("/v1/cluster").await {
        Err(ClientError::Api { status: 401, .. }) => {}
        other => panic!("no token: {other:?}"),
    }
    // Plain HTTP to the HTTPS port gets no answer.
    let plain = AdminClient::new(&addr, Some(TOKEN.into())).unwrap();
    assert!(plain.get("/health").await.is_err(), "plain HTTP is not served");
    // A client that trusts another CA refuses the node.
    let other = dir.path().join("other");
    pki::generate(&other, &["x"], &[]).unwrap();
    let stranger = AdminClient::with_ca(&addr, Some(TOKEN.into()), Some(&other.join("ca.pem"))).unwrap();
    match stranger.get("/health").await {
        Err(ClientError::Transport { .. }) => {}
        other => panic!("a node outside the trusted CA: {other:?}"),
    }
    // A CA file that does not exist is a typed error naming it.
    match AdminClient::with_ca(&addr, None, Some(&dir.path().join("missing.pem"))) {
        Err(e) => assert!(e.to_string().contains("missing.pem"), "{e}"),
        Ok(_) => panic!("a missing CA file is an error"),
    }
    node.shutdown().await;
}
