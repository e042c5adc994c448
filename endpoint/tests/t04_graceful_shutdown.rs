//! Graceful shutdown: in-flight requests finish when they can within the timeout; past it they
//! end with `finish_reason: "abort"` and `[DONE]`, and shutdown itself succeeds.

mod common;

use std::time::Duration;

use axum::body::Bytes;
use common::*;
use futures_util::StreamExt;
use serde_json::json;

async fn stream_body(base: &str, max_tokens: usize) -> impl futures_util::Stream<Item = reqwest::Result<Bytes>> {
    client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "shutdown", "max_tokens": max_tokens, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap()
        .bytes_stream()
}

async fn read_rest(
    mut s: impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin,
    mut text: String,
) -> String {
    while let Some(chunk) = s.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text
}

#[tokio::test]
async fn shutdown_finishes_short_requests_and_aborts_long_ones() {
    let mut cfg = config();
    cfg.shutdown_timeout = Duration::from_millis(400);
    let (server, base) = start(cfg).await;
    let mut short = Box::pin(stream_body(&base, 8).await);
    let mut long = Box::pin(stream_body(&base, 2000).await);
    let first_short = String::from_utf8_lossy(&short.next().await.unwrap().unwrap()).into_owned();
    let first_long = String::from_utf8_lossy(&long.next().await.unwrap().unwrap()).into_owned();
    let stopping = tokio::spawn(server.shutdown());
    let short_text = read_rest(short, first_short).await;
    let long_text = read_rest(long, first_long).await;
    stopping.await.unwrap().expect("clean shutdown");
    assert!(short_text.contains("\"finish_reason\":\"length\""), "{short_text}");
    assert!(long_text.contains("\"finish_reason\":\"abort\""), "{long_text}");
    assert!(long_text.trim_end().ends_with("data: [DONE]"));
    // Nothing listens any more.
    assert!(client().get(format!("{base}/health")).send().await.is_err());
}
