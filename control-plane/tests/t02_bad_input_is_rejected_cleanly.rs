//! Bad input gets a typed error, never a panic or a half-applied write: REST bodies that are not
//! JSON or have the wrong shape get 400 with a JSON error, a missing or wrong token 401, an
//! invalid plan 409; malformed Raft payloads and worker registrations get INVALID_ARGUMENT.

mod common;

use common::*;
use control_plane::admin::ErrorBody;
use serde_json::json;

async fn raw(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<&'static str>,
) -> (u16, String) {
    let mut req = http.request(method, url).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

fn error_of(status: u16, text: &str) -> ErrorBody {
    let e: ErrorBody = serde_json::from_str(text).unwrap_or_else(|err| panic!("not a JSON error ({err}): {text}"));
    assert_eq!(e.error.code, status, "code mirrors the status");
    assert!(!e.error.message.is_empty());
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_single(config(dir.path())).await;
    let base = format!("http://{}", node.admin_addr);
    let http = pki::https::http_client_builder().build().unwrap();
    use reqwest::Method as M;

    // Health needs no token; everything else does.
    let (s, _) = raw(&http, M::GET, format!("{base}/health"), None, None).await;
    assert_eq!(s, 200);
    for path in ["/v1/cluster", "/v1/policy", "/metrics", "/openapi.json"] {
        let (s, t) = raw(&http, M::GET, format!("{base}{path}"), None, None).await;
        assert_eq!(s, 401, "{path}");
        assert_eq!(error_of(s, &t).error.kind, "unauthorized");
        let (s, _) = raw(&http, M::GET, format!("{base}{path}"), Some("wrong-token"), None).await;
        assert_eq!(s, 401, "{path} with a wrong token");
    }

    let tok = Some(TOKEN);
    let cases: [(M, &str, Option<&'static str>, u16); 11] = [
        (M::PUT, "/v1/policy", Some("{not json"), 400),
        (M::PUT, "/v1/policy", None, 400),
        (M::PUT, "/v1/policy", Some(r#"{"placement": 3}"#), 400),
        (M::POST, "/v1/models", Some(r#"[1, 2, 3]"#), 400),
        (
            M::POST,
            "/v1/models",
            Some(r#"{"name":"m","architecture":"x","num_layers":1,"num_experts":2,"top_k":9,"weights":""}"#),
            409,
        ),
        (
            M::POST,
            "/v1/placement",
            Some(r#"{"model": "none", "instances": []}"#),
            409,
        ),
        (M::GET, "/v1/placement/not-a-number", None, 400),
        (M::GET, "/v1/placement/99", None, 404),
        (M::GET, "/v1/placement?colour=red", None, 400),
        (M::GET, "/v1/placement?model=", None, 400),
        (
            M::POST,
            "/v1/members",
            Some(r#"{"id": 2, "raft_addr": "nowhere"}"#),
            400,
        ),
    ];
    for (method, path, body, want) in cases {
        let (s, t) = raw(&http, method.clone(), format!("{base}{path}"), tok, body).await;
        assert_eq!(s, want, "{method} {path} {body:?}: {t}");
        error_of(s, &t);
    }
    // Nothing above changed the state: no model, no plan.
    let api = admin(&node);
    assert_eq!(api.get("/v1/models").await.expect("models"), json!([]));
    assert_eq!(node.node.state_machine().state().await.current_epoch(), 0);

    // OpenAPI and metrics are served.
    let doc = api.get("/openapi.json").await.expect("openapi");
    assert!(doc["paths"]["/v1/placement/{epoch}"].is_object());
    let metrics = api.get("/metrics").await.expect("metrics");
    assert!(
        metrics.as_str().is_some_and(|m| m.contains("moeless_raft_term")),
        "{metrics}"
    );

    // Malformed payload inside a well-formed protobuf message.
    let mut raft = proto::raft::raft_service_client::RaftServiceClient::connect(format!("http://{}", node.raft_addr))
        .await
        .expect("connect");
    for garbage in [b"{]".to_vec(), vec![0xff, 0x00, 0x13], Vec::new()] {
        let st = raft
            .append_entries(proto::raft::RaftMessage {
                payload: garbage.clone(),
                data: vec![],
            })
            .await
            .expect_err("garbage append");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        let st = raft
            .vote(proto::raft::RaftMessage {
                payload: garbage,
                data: vec![],
            })
            .await
            .expect_err("garbage vote");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
    }
    // Worker registrations are validated when converted from protobuf.
    let mut workers =
        proto::worker::worker_service_client::WorkerServiceClient::connect(format!("http://{}", node.raft_addr))
            .await
            .expect("connect");
    let st = workers
        .register(proto::worker::RegisterRequest {
            worker_id: 0,
            address: String::new(),
            devices: vec![],
            memory_bytes: 0,
        })
        .await
        .expect_err("invalid registration");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    let st = workers
        .heartbeat(proto::worker::HeartbeatRequest {
            worker_id: 42,
            applied_epoch: 0,
            ..Default::default()
        })
        .await
        .expect_err("unknown worker");
    assert_eq!(st.code(), tonic::Code::NotFound);
    // A registered worker reporting an instance in an unknown state is refused whole.
    register_worker(node.raft_addr, 42).await;
    let st = workers
        .heartbeat(proto::worker::HeartbeatRequest {
            worker_id: 42,
            instances: vec![proto::worker::InstanceStatus {
                state: "hot".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect_err("unknown instance state");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(node.node.is_leader(), "the node survived all of it");
    node.shutdown().await;
}
