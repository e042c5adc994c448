//! Engine faults as a client sees them. The built-in model's experts run behind a switch that
//! makes them fail (as an unreachable worker does) or panic (a bug that kills the engine):
//! a failed step ends its requests with an OpenAI error (500, or an error event followed by
//! `[DONE]` when streaming) and the server goes on serving; a dead engine fails what it held the
//! same way, refuses new requests with 503, and `shutdown` reports it (the CLI then exits
//! non-zero).

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use data_plane::engine::Engine;
use data_plane::expert::{ExpertError, ExpertFunction, ExpertTask, SingleInstance};
use data_plane::tensor::Tensor;
use endpoint::{ServeError, Server, TextTokenizer};
use serde_json::{json, Value};

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const PANICKING: u8 = 2;

/// The built-in model's own experts, behind the switch.
struct Switched {
    inner: Arc<dyn ExpertFunction>,
    mode: Arc<AtomicU8>,
}

impl ExpertFunction for Switched {
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        match self.mode.load(Ordering::SeqCst) {
            FAILING => Err(ExpertError::Transport("injected: the worker is unreachable".into())),
            PANICKING => panic!("injected: an expert function panicked"),
            _ => self.inner.execute(layer, tasks),
        }
    }

    fn execute_into(&self, layer: usize, tasks: Vec<ExpertTask>, out: &mut Tensor) -> Result<(), ExpertError> {
        match self.mode.load(Ordering::SeqCst) {
            FAILING => Err(ExpertError::Transport("injected: the worker is unreachable".into())),
            PANICKING => panic!("injected: an expert function panicked"),
            _ => self.inner.execute_into(layer, tasks, out),
        }
    }
}

async fn start_switched() -> (Server, String, Arc<AtomicU8>) {
    let builtin = Engine::builtin().expect("built-in model");
    let mode = Arc::new(AtomicU8::new(HEALTHY));
    let experts = Arc::new(Switched {
        inner: builtin.experts().clone(),
        mode: mode.clone(),
    });
    let engine = Engine::new(builtin.model().clone(), experts, Arc::new(SingleInstance));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server::start(engine, Some(TextTokenizer::bytes()), config(), listener)
        .await
        .expect("server starts");
    let base = format!("http://{}", server.local_addr());
    (server, base, mode)
}

/// A streamed completion's `data:` payloads.
async fn stream(base: &str) -> (u16, Vec<String>) {
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "fault probe", "max_tokens": 8, "stream": true}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    (status, sse_data(&r.text().await.expect("body")))
}

/// Asserts a stream that ended in an engine error: an OpenAI error event naming `cause`, the
/// choice finished with `error`, and `[DONE]` last.
fn assert_error_stream(data: &[String], cause: &str) {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("every event but [DONE] is JSON"))
        .collect();
    let error = events
        .iter()
        .find(|e| e.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event in {data:?}"));
    assert!(error_message(error).contains(cause), "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    assert!(
        events.iter().any(|e| e["choices"][0]["finish_reason"] == "error"),
        "no choice finished with `error`: {data:?}"
    );
}

async fn completion(base: &str) -> (u16, Value) {
    post(
        base,
        "/v1/completions",
        &json!({"prompt": "fault probe", "max_tokens": 8}),
    )
    .await
}

#[tokio::test]
async fn a_failed_step_fails_its_requests_and_the_server_goes_on() {
    let (server, base, mode) = start_switched().await;
    let (status, v) = completion(&base).await;
    assert_eq!(status, 200, "{v}");

    mode.store(FAILING, Ordering::SeqCst);
    let (status, data) = stream(&base).await;
    assert_eq!(status, 200, "the stream starts before the step fails");
    assert_error_stream(&data, "the worker is unreachable");
    let (status, v) = completion(&base).await;
    assert_eq!(status, 500, "{v}");
    assert!(error_message(&v).contains("the worker is unreachable"), "{v}");

    mode.store(HEALTHY, Ordering::SeqCst);
    let (status, v) = completion(&base).await;
    assert_eq!(status, 200, "the server serves again once the experts answer: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    let (status, data) = stream(&base).await;
    assert_eq!(status, 200);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.iter().all(|d| !d.contains("\"error\"")), "{data:?}");
    assert!(!server.stats().dead.load(Ordering::Relaxed));
    // The scheduler publishes its counters after the step that sent the last token, so the
    // client can see [DONE] first: give the blocks a moment to show as freed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.stats().kv_blocks_used.load(Ordering::Relaxed) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "KV blocks still held: {:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await.expect("a clean stop after recovered failures");
}

#[tokio::test]
async fn a_dead_engine_fails_what_it_held_refuses_new_work_and_shutdown_reports_it() {
    let (server, base, mode) = start_switched().await;
    mode.store(PANICKING, Ordering::SeqCst);
    let (status, data) = stream(&base).await;
    assert_eq!(status, 200);
    assert_error_stream(&data, "panicked");
    assert!(server.stats().dead.load(Ordering::Relaxed));

    let (status, v) = completion(&base).await;
    assert_eq!(status, 503, "{v}");
    assert!(error_message(&v).contains("engine has stopped"), "{v}");
    let r = client().get(format!("{base}/health")).send().await.expect("health");
    assert_eq!(r.status().as_u16(), 503, "health must say the engine is gone");

    match server.shutdown().await {
        Err(ServeError::EngineDied(message)) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("shutdown after an engine death returned {other:?}"),
    }
}
