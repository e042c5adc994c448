//! Continuous batching under pressure: disconnects free KV blocks, running out of blocks
//! preempts and recomputes without changing greedy outputs, prefix caching reuses blocks
//! without changing them either, and a bounded load test of many concurrent requests finishes
//! with no failures.

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

/// Sequential one-token requests through HTTP against the same step on the engine alone; the
/// difference is what the server adds (parsing, tokenizing, scheduling, channels, JSON).
#[tokio::test]
async fn server_overhead_per_request_is_small() {
    let (server, base) = start(config()).await;
    let engine = Engine::builtin().unwrap();
    let prompt: Vec<u32> = "overhead probe 16".bytes().map(u32::from).collect();
    let c = client();
    let body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
    let mut http = Vec::new();
    let mut alone = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        let r = c
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.unwrap();
        let h = t.elapsed();
        let t = Instant::now();
        engine.generate_greedy(std::slice::from_ref(&prompt), 1).unwrap();
        let e = t.elapsed();
        if i >= 10 {
            http.push(h.as_secs_f64());
            alone.push(e.as_secs_f64());
        }
    }
    http.sort_by(f64::total_cmp);
    alone.sort_by(f64::total_cmp);
    let (h, e) = (http[http.len() / 2], alone[alone.len() / 2]);
    eprintln!(
        "one-token request p50: through HTTP {:.3} ms, engine alone {:.3} ms, server overhead {:.3} ms",
        h * 1e3,
        e * 1e3,
        (h - e) * 1e3
    );
    assert!(h - e < 0.02, "server overhead p50 {:.3} ms", (h - e) * 1e3);
    server.shutdown().await.unwrap();
}

/// Prefix caching: a prompt that starts like an earlier one reuses that one's full KV blocks
/// (counted in the metrics), and greedy outputs stay those of the engine alone; with it off
/// nothing is reused.
#[tokio::test]
async fn prefix_caching_reuses_blocks_without_changing_outputs() {
    let system = "You are a careful assistant; answer in one short sentence. ";
    let prompts: Vec<String> = ["What is MoE?", "What is EPLB?", "What is MoE?"]
        .iter()
        .map(|q| format!("{system}{q}"))
        .collect();
    let engine = Engine::builtin().unwrap();
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for caching in [true, false] {
        let mut cfg = config();
        cfg.block_size = 4;
        cfg.prefix_caching = caching;
        let (server, base) = start(cfg).await;
        let stats = server.stats().clone();
        let mut hits = Vec::new();
        for p in &prompts {
            let before = stats.prefix_hits.load(Ordering::Relaxed);
            let body =
                json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
            let (status, v) = post(&base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            let ids: Vec<u32> = p.bytes().map(u32::from).collect();
            let expected = engine
                .generate_greedy(std::slice::from_ref(&ids), 12)
                .unwrap()
                .remove(0);
            assert_eq!(token_ids(&v["choices"][0]), expected, "caching {caching}: {p}");
            hits.push(stats.prefix_hits.load(Ordering::Relaxed) - before);
        }
        if caching {
            // "...What is " is common to the first two; the third repeats the first.
            let common = system.len() + "What is ".len();
            assert_eq!(
                hits,
                [0, (common / 4 * 4) as u64, ((prompts[2].len() - 1) / 4 * 4) as u64]
            );
            let text = get_text(&base, "/metrics").await;
            // The recorder is process-wide: other tests' servers add to the same series.
            assert!(
                metric(&text, "moeless:prefix_cache_hits_total") >= hits.iter().sum::<u64>(),
                "{text}"
            );
            assert!(metric(&text, "moeless:prefix_cache_queries_total") > 0);
        } else {
            assert_eq!(hits, [0, 0, 0]);
            assert_eq!(stats.prefix_queries.load(Ordering::Relaxed), 0);
        }
        // The scheduler publishes the freed blocks just after the last token goes out.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.kv_blocks_used.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "blocks still held: {stats:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.shutdown().await.unwrap();
    }
}
