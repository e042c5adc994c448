//! Continuous batching under pressure: disconnects free KV blocks, running out of blocks
//! preempts and recomputes without changing greedy outputs, and a bounded load test of many
//! concurrent requests finishes with no failures.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use data_plane::engine::Engine;
use futures_util::StreamExt;
use serde_json::json;

#[tokio::test]
async fn client_disconnect_cancels_and_frees_kv_blocks() {
    let (server, base) = start(config()).await;
    let stats = server.stats().clone();
    let c = client();
    let mut streams = Vec::new();
    for i in 0..8 {
        let r = c
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": format!("long {i}"), "max_tokens": 2000, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut body = r.bytes_stream();
        body.next().await.expect("a first chunk").unwrap();
        streams.push(body);
    }
    assert!(stats.kv_blocks_used.load(Ordering::Relaxed) > 0);
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.running.load(Ordering::Relaxed) + stats.waiting.load(Ordering::Relaxed) > 0
        || stats.kv_blocks_used.load(Ordering::Relaxed) > 0
    {
        assert!(
            Instant::now() < deadline,
            "blocks still held after disconnect: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 8, "{stats:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn preemption_when_blocks_run_out_keeps_greedy_outputs() {
    let mut cfg = config();
    cfg.num_kv_blocks = Some(24); // 384 positions for 8 sequences of up to 100.
    cfg.block_size = 16;
    cfg.max_model_len = Some(128);
    let (server, base) = start(cfg).await;
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..20).map(|j| (i * 31 + j * 7) % 256).collect())
        .collect();
    let futs = prompts.iter().map(|p| {
        let base = base.clone();
        let body = json!({"prompt": p, "max_tokens": 80, "temperature": 0, "return_token_ids": true});
        async move { post(&base, "/v1/completions", &body).await }
    });
    let results = futures_util::future::join_all(futs).await;
    let engine = Engine::builtin().unwrap();
    for (p, (status, v)) in prompts.iter().zip(results) {
        assert_eq!(status, 200, "{v}");
        let expected = engine.generate_greedy(std::slice::from_ref(p), 80).unwrap().remove(0);
        assert_eq!(token_ids(&v["choices"][0]), expected);
    }
    assert!(
        server.stats().preemptions.load(Ordering::Relaxed) > 0,
        "no preemption happened"
    );
    assert_eq!(server.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn load_200_requests_at_concurrency_32_has_no_failures() {
    let mut cfg = config();
    cfg.max_num_seqs = 32;
    let (server, base) = start(cfg).await;
    let c = client();
    let started = Instant::now();
    let results: Vec<(u16, usize)> = futures_util::stream::iter(0..200)
        .map(|i| {
            let c = c.clone();
            let base = base.clone();
            async move {
                let stream = i % 2 == 0;
                let body = json!({"prompt": format!("request {i}: {}", "x".repeat(i % 50)), "max_tokens": 16,
                    "stream": stream, "stream_options": if stream { json!({"include_usage": true}) } else { json!(null) }});
                let body = if stream { body } else {
                    let mut b = body; b.as_object_mut().unwrap().remove("stream_options"); b
                };
                let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                let tokens = if stream {
                    let data = sse_data(&text);
                    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
                    let usage: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
                    usage["usage"]["completion_tokens"].as_u64().unwrap() as usize
                } else {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    v["usage"]["completion_tokens"].as_u64().unwrap() as usize
                };
                (status, tokens)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|&(s, t)| s == 200 && t == 16), "{results:?}");
    eprintln!(
        "200 requests x 16 tokens at concurrency 32: {:.2}s, {:.0} tokens/s",
        elapsed.as_secs_f64(),
        3200.0 / elapsed.as_secs_f64()
    );
    assert_eq!(server.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
    server.shutdown().await.unwrap();
}
