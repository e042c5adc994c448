//! Request size limits on the control plane's listeners: a gRPC message over the service limit
//! is refused with OUT_OF_RANGE from its length prefix, an admin body over the limit with a JSON
//! 413; neither hangs nor takes the node down, which keeps answering normal requests.

mod common;

use std::time::Duration;

use control_plane::admin::MAX_BODY_BYTES;
use control_plane::client::ClientError;
use proto::worker::worker_service_client::WorkerServiceClient;
use serde_json::json;

const CALL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn oversized_grpc_messages_and_admin_bodies_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::start_single(common::config(dir.path())).await;

    let mut client = WorkerServiceClient::connect(format!("http://{}", node.raft_addr))
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let huge = proto::worker::RegisterRequest {
        worker_id: 7,
        address: "x".repeat(proto::MAX_SERVICE_MESSAGE_BYTES + 1),
        devices: vec![],
        memory_bytes: 1 << 30,
    };
    let status = tokio::time::timeout(CALL, client.register(huge))
        .await
        .expect("an oversized message is answered, not left hanging")
        .expect_err("an oversized message is refused");
    assert!(
        matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");

    // The same service still takes normal messages, on the same connection and on a new one.
    common::register_worker(node.raft_addr, 7).await;

    // Admin: one byte over the limit is a JSON 413; within it, a normal (here malformed) body is read.
    let admin = common::admin(&node);
    let big = json!({"name": "x".repeat(MAX_BODY_BYTES)});
    match admin.post("/v1/models", Some(&big)).await {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(status, 413, "{body}");
            assert_eq!(body["error"]["type"], "payload_too_large", "{body}");
        }
        other => panic!("expected 413, got {other:?}"),
    }
    match admin.post("/v1/models", Some(&json!({"name": 1}))).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 400),
        other => panic!("expected 400, got {other:?}"),
    }
    let workers = admin.get("/v1/workers").await.expect("the admin API still answers");
    assert_eq!(workers.as_array().map(Vec::len), Some(1), "{workers}");
    node.shutdown().await;
}
