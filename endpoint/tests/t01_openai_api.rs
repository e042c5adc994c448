//! The OpenAI-compatible surface on a real server: greedy generation equals the engine's own,
//! streaming ends with [DONE] and carries usage, sampling options behave, errors are shaped.

mod common;

use common::*;
use data_plane::engine::Engine;
use serde_json::{json, Value};

#[tokio::test]
async fn greedy_completions_equal_engine_generate_greedy() {
    let (server, base) = start(config()).await;
    let prompts: Vec<Vec<u32>> = vec![
        "Hello, MoEless!".bytes().map(u32::from).collect(),
        vec![1, 2, 3, 250, 7],
        (0..40).map(|i| (i * 37 % 256) as u32).collect(),
    ];
    let engine = Engine::builtin().unwrap();
    // One at a time: the same batch shapes as the engine alone.
    for p in &prompts {
        let expected = engine.generate_greedy(std::slice::from_ref(p), 20).unwrap().remove(0);
        let (status, v) = post(
            &base,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": p, "max_tokens": 20, "temperature": 0, "return_token_ids": true}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(token_ids(&v["choices"][0]), expected);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], p.len());
        assert_eq!(v["usage"]["completion_tokens"], 20);
        assert_eq!(v["usage"]["total_tokens"], p.len() + 20);
    }
    // Concurrently: batched with each other, still the same tokens.
    let futs = prompts.iter().map(|p| {
        let base = base.clone();
        let body = json!({"prompt": p, "max_tokens": 20, "temperature": 0, "return_token_ids": true});
        async move { post(&base, "/v1/completions", &body).await }
    });
    let results = futures_util::future::join_all(futs).await;
    for (p, (status, v)) in prompts.iter().zip(results) {
        assert_eq!(status, 200);
        let expected = engine.generate_greedy(std::slice::from_ref(p), 20).unwrap().remove(0);
        assert_eq!(token_ids(&v["choices"][0]), expected);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn streaming_ends_with_done_and_carries_usage() {
    let (server, base) = start(config()).await;
    let body = json!({"prompt": "stream me", "max_tokens": 12, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}});
    let text = client()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["prompt_tokens"], 9);
    let streamed: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let finish: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    for c in chunks.iter().flat_map(|c| c["choices"].as_array().unwrap().iter()) {
        assert!(c["text"] != "" || !c["finish_reason"].is_null(), "empty chunk: {c}");
    }
    // Token ids streamed (held-back text included) add up to the whole completion.
    let text = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "stream me", "max_tokens": 12, "temperature": 0, "stream": true, "return_token_ids": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed_ids: Vec<u32> = sse_data(&text)
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .flat_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(token_ids)
                .collect::<Vec<_>>()
        })
        .collect();
    let engine = Engine::builtin().unwrap();
    let prompt: Vec<u32> = "stream me".bytes().map(u32::from).collect();
    assert_eq!(streamed_ids, engine.generate_greedy(&[prompt], 12).unwrap()[0]);
    let (_, whole) = post(
        &base,
        "/v1/completions",
        &json!({"prompt": "stream me", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(whole["choices"][0]["text"].as_str().unwrap(), streamed);

    // Chat: the role comes first, then content, then [DONE]; without include_usage no usage.
    let text = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(data.iter().all(|d| !d.contains("\"usage\"")));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn chat_n_seed_and_stop_behave() {
    let (server, base) = start(config()).await;
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_tokens": 8, "n": 3, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 42}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // Same seed, same tokens.
    let body = json!({"prompt": "seeded", "max_tokens": 16, "temperature": 1.0, "seed": 7, "return_token_ids": true});
    let (_, a) = post(&base, "/v1/completions", &body).await;
    let (_, b) = post(&base, "/v1/completions", &body).await;
    assert_eq!(token_ids(&a["choices"][0]), token_ids(&b["choices"][0]));
    // A stop string taken from the greedy output cuts the text before it.
    let greedy = json!({"prompt": "stop here", "max_tokens": 32, "temperature": 0});
    let (_, g) = post(&base, "/v1/completions", &greedy).await;
    let full = g["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    let at = chars.len() / 2;
    let stop: String = chars[at..(at + 2).min(chars.len())].iter().collect();
    let mut with_stop = greedy.clone();
    with_stop["stop"] = json!([stop]);
    let (_, s) = post(&base, "/v1/completions", &with_stop).await;
    let cut = s["choices"][0]["text"].as_str().unwrap();
    assert_eq!(s["choices"][0]["finish_reason"], "stop", "stop {stop:?} in {full:?}");
    assert!(full.starts_with(cut) && !cut.contains(&stop) && cut.len() < full.len());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let mut cfg = config();
    cfg.api_key = Some("sekret".into());
    cfg.max_model_len = Some(64);
    cfg.max_body_bytes = 4096;
    cfg.max_queued = 2;
    let (server, base) = start(cfg).await;
    let c = client();
    let authed = |path: &str| c.post(format!("{base}{path}")).header("Authorization", "Bearer sekret");
    // 401 without or with a wrong key, on every route but /health.
    for (path, get) in [
        ("/v1/models", true),
        ("/metrics", true),
        ("/version", true),
        ("/v1/completions", false),
    ] {
        let req = if get {
            c.get(format!("{base}{path}"))
        } else {
            c.post(format!("{base}{path}")).json(&json!({"prompt": "x"}))
        };
        let r = req.header("Authorization", "Bearer wrong").send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
        error_message(&r.json().await.unwrap());
    }
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        c.get(format!("{base}/health")).send().await.unwrap().status().as_u16(),
        200
    );
    let r = c
        .get(format!("{base}/v1/models"))
        .header("Authorization", "Bearer sekret")
        .send()
        .await
        .unwrap();
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 64);
    // 404 unknown model.
    let r = authed("/v1/completions")
        .json(&json!({"model": "gpt-4", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(error_message(&r.json().await.unwrap()).contains("gpt-4"));
    // 400 prompt too long, with the numbers.
    let long = "a".repeat(100);
    let r = authed("/v1/completions")
        .json(&json!({"prompt": long}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let m = error_message(&r.json().await.unwrap());
    assert!(m.contains("64") && m.contains("100"), "{m}");
    let r = authed("/v1/completions")
        .json(&json!({"prompt": "abc", "max_tokens": 62}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let m = error_message(&r.json().await.unwrap());
    assert!(m.contains("65") && m.contains("62"), "{m}");
    // 400 for bad fields and bad JSON.
    for body in [
        json!({"prompt": "x", "temperature": 5}),
        json!({"prompt": "x", "n": 0}),
        json!({"prompt": [999]}),
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"nope": 1}),
    ] {
        let r = authed("/v1/completions").json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        error_message(&r.json().await.unwrap());
    }
    let r = authed("/v1/completions")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // 413 over the body limit.
    let big = json!({"prompt": "b".repeat(5000)});
    let r = authed("/v1/completions").json(&big).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    error_message(&r.json().await.unwrap());
    // 429 with Retry-After when the queue cannot take the request.
    let r = authed("/v1/completions")
        .json(&json!({"prompt": "x", "n": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    error_message(&r.json().await.unwrap());
    // Unknown route: 404, same shape.
    let r = c
        .get(format!("{base}/v2/nothing"))
        .header("Authorization", "Bearer sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    error_message(&r.json().await.unwrap());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_and_version_are_served() {
    let (server, base) = start(config()).await;
    let (status, _) = post(&base, "/v1/completions", &json!({"prompt": "m", "max_tokens": 3})).await;
    assert_eq!(status, 200);
    let text = get_text(&base, "/metrics").await;
    for name in [
        "moeless:time_to_first_token_seconds",
        "moeless:inter_token_latency_seconds",
        "moeless:e2e_request_latency_seconds",
        "moeless:request_queue_time_seconds",
        "moeless:num_requests_running",
        "moeless:num_requests_waiting",
        "moeless:kv_cache_usage_perc",
        "moeless:prompt_tokens_total",
        "moeless:generation_tokens_total",
        "moeless:request_success_total",
        "moeless:expert_tokens_total",
        "moeless:expert_balancedness",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(text.contains("finished_reason=\"length\""));
    let v: Value = client()
        .get(format!("{base}/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["version"].is_string());
    server.shutdown().await.unwrap();
}

/// Presence, frequency and repetition penalties through HTTP give what greedy decoding with
/// the same penalties gives on the engine alone (step by step, `SamplingParams::penalize` then
/// argmax); out-of-range values are 400s naming the parameter.
#[tokio::test]
async fn penalties_shape_greedy_output_and_are_range_checked() {
    use data_plane::engine::argmax;
    use data_plane::model::LogitsWanted;
    use endpoint::sampling::SamplingParams;

    let (server, base) = start(config()).await;
    let prompt: Vec<u32> = "penalty probe, penalty probe".bytes().map(u32::from).collect();
    let params = SamplingParams {
        temperature: 0.0,
        presence_penalty: 0.5,
        frequency_penalty: 0.75,
        repetition_penalty: 1.5,
        ..Default::default()
    };
    let engine = Engine::builtin().unwrap();
    let mut cache = engine.new_cache();
    let (mut tokens, mut next, mut expected) = (prompt.clone(), prompt.clone(), Vec::new());
    for _ in 0..24 {
        let (logits, _) = engine
            .step(std::slice::from_mut(&mut cache), &[&next], LogitsWanted::Last)
            .unwrap();
        let row = logits[0].row(logits[0].rows() - 1);
        let t = argmax(&params.penalize(row, &tokens, expected.len()));
        expected.push(t);
        tokens.push(t);
        next = vec![t];
    }
    let plain = engine
        .generate_greedy(std::slice::from_ref(&prompt), 24)
        .unwrap()
        .remove(0);
    assert_ne!(
        expected, plain,
        "the penalties must change this output for the test to see them"
    );

    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
        "presence_penalty": 0.5, "frequency_penalty": 0.75, "repetition_penalty": 1.5, "return_token_ids": true});
    let (status, v) = post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(token_ids(&v["choices"][0]), expected);

    for (param, value) in [
        ("frequency_penalty", json!(2.5)),
        ("presence_penalty", json!(-3)),
        ("repetition_penalty", json!(0)),
    ] {
        let mut body = json!({"prompt": "x", "max_tokens": 1});
        body[param] = value;
        let (status, v) = post(&base, "/v1/completions", &body).await;
        assert_eq!(status, 400, "{param}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    server.shutdown().await.unwrap();
}

/// `echo`: each choice's text starts with its prompt, text or token ids; streamed, the prompt
/// comes as the first chunk of each choice.
#[tokio::test]
async fn echo_prepends_the_prompt() {
    let (server, base) = start(config()).await;
    let plain = json!({"prompt": "echo me", "max_tokens": 5, "temperature": 0});
    let (status, v) = post(&base, "/v1/completions", &plain).await;
    assert_eq!(status, 200, "{v}");
    let generated = v["choices"][0]["text"].as_str().unwrap().to_string();

    let mut echoed = plain.clone();
    echoed["echo"] = json!(true);
    let (status, v) = post(&base, "/v1/completions", &echoed).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], format!("echo me{generated}"));
    assert_eq!(v["usage"]["completion_tokens"], 5, "the echo is not generated text");

    let ids: Vec<u32> = "ids too".bytes().map(u32::from).collect();
    let (status, v) = post(
        &base,
        "/v1/completions",
        &json!({"prompt": [ids.clone(), ids], "max_tokens": 2, "echo": true, "n": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    assert!(
        choices
            .iter()
            .all(|c| c["text"].as_str().unwrap().starts_with("ids too")),
        "{v}"
    );

    echoed["stream"] = json!(true);
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&echoed)
        .send()
        .await
        .unwrap();
    let data = sse_data(&r.text().await.unwrap());
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], "echo me", "{data:?}");
    let all: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(all, format!("echo me{generated}"));
    server.shutdown().await.unwrap();
}

/// Every route the OpenAPI document describes (`endpoint::openapi::ROUTES`) is served with that
/// method: neither 404 nor 405 (a POST with an empty object is a 400).
#[tokio::test]
async fn every_documented_route_is_served() {
    let (server, base) = start(config()).await;
    for &(method, path) in endpoint::openapi::ROUTES {
        let url = format!("{base}{path}");
        let r = match method {
            "get" => client().get(&url).send().await,
            "post" => client().post(&url).json(&json!({})).send().await,
            other => panic!("no client call for method {other}"),
        }
        .expect("request sent");
        let status = r.status().as_u16();
        assert!(status != 404 && status != 405, "{method} {path}: {status}");
    }
    let (status, doc) = {
        let r = client().get(format!("{base}/openapi.json")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(
        doc["components"]["schemas"]["CompletionRequest"]["properties"]["n"]["maximum"],
        config().max_n,
        "the server's own max_n"
    );
    server.shutdown().await.unwrap();
}

/// `logprobs`: the reported values are the engine's own next-token log-softmax, in the legacy
/// completions format and chat's per-token list (streamed or not); bad values are 400s.
#[tokio::test]
async fn logprobs_are_the_models_in_both_formats() {
    use data_plane::engine::argmax;
    use data_plane::model::LogitsWanted;
    use endpoint::sampling::token_logprobs;

    let (server, base) = start(config()).await;
    let prompt: Vec<u32> = "logprob probe".bytes().map(u32::from).collect();
    let engine = Engine::builtin().unwrap();
    let mut cache = engine.new_cache();
    let (logits, _) = engine
        .step(std::slice::from_mut(&mut cache), &[&prompt], LogitsWanted::Last)
        .unwrap();
    let row = logits[0].row(0);
    let expected = token_logprobs(row, argmax(row), 5);
    let close = |a: &Value, b: f32| (a.as_f64().unwrap() as f32 - b).abs() < 1e-4;

    let (status, v) = post(
        &base,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 5}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[field].as_array().map(Vec::len), Some(6), "{field}: {v}");
    }
    assert!(close(&lp["token_logprobs"][0], expected.logprob), "{lp}");
    for (id, l) in expected.top.iter().filter(|(id, _)| *id < 128) {
        let key = char::from(*id as u8).to_string();
        assert!(close(&lp["top_logprobs"][0][&key], *l), "{key}: {lp}");
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    for i in 0..6 {
        let best = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-6,
            "greedy picks the most likely: {lp}"
        );
    }
    let (_, plain) = post(&base, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");

    // Chat: per-token entries with `top_logprobs` alternatives; the bytes spell the content.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
        "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (status, v) = post(&base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len(), 5, "{v}");
    let mut bytes = Vec::new();
    for c in &content {
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2, "{c}");
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
        bytes.extend(c["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
    }
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let mut from_chunks = Vec::new();
    for d in sse_data(&r.text().await.unwrap()) {
        if d == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&d).unwrap();
        if let Some(c) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            from_chunks.extend(c.iter().cloned());
        }
    }
    // The same tokens; values equal up to rounding (the repeat prefilled only what the prefix
    // cache did not hold, a differently shaped computation).
    assert_eq!(from_chunks.len(), content.len());
    for (a, b) in from_chunks.iter().zip(&content) {
        assert_eq!(a["bytes"], b["bytes"], "{a} vs {b}");
        assert!(
            close(&a["logprob"], b["logprob"].as_f64().unwrap() as f32),
            "{a} vs {b}"
        );
    }

    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"prompt": "x", "logprobs": true}), "logprobs"),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 1, "echo": true, "stream": true}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
    ] {
        let (status, v) = post(&base, path, &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    server.shutdown().await.unwrap();
}

/// `echo` with `logprobs` (how evaluation harnesses score text): the prompt's tokens come
/// first, each with its log-probability given the tokens before it (the first `null`), equal
/// to the engine's full-prompt forward pass, with prefill in one step or in chunks, and on a
/// repeat (the prefix cache is not used for it).
#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    use endpoint::sampling::token_logprobs;

    let prompt: Vec<u32> = "score this prompt".bytes().map(u32::from).collect();
    let engine = Engine::builtin().unwrap();
    let full = engine.forward_prompts(std::slice::from_ref(&prompt), false).unwrap();
    let expected: Vec<f32> = (1..prompt.len())
        .map(|p| token_logprobs(full[0].logits.row(p - 1), prompt[p], 0).logprob)
        .collect();
    for budget in [2048, 5] {
        let mut cfg = config();
        cfg.max_num_batched_tokens = budget;
        let (server, base) = start(cfg).await;
        for attempt in 0..2 {
            let body = json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true,
                "echo": true, "logprobs": 1});
            let (status, v) = post(&base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            let lp = &v["choices"][0]["logprobs"];
            let n = prompt.len() + 3;
            for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                assert_eq!(lp[field].as_array().map(Vec::len), Some(n), "{field}: {v}");
            }
            assert!(
                lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(),
                "{lp}"
            );
            assert_eq!(lp["tokens"][1], "c");
            for (i, want) in expected.iter().enumerate() {
                let got = lp["token_logprobs"][i + 1].as_f64().unwrap() as f32;
                assert!(
                    (got - want).abs() < 1e-4,
                    "budget {budget} attempt {attempt} token {}: {got} vs {want}",
                    i + 1
                );
            }
            assert!(lp["token_logprobs"][n - 1].as_f64().unwrap() <= 0.0);
            assert!(v["choices"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("score this prompt"));
        }
        server.shutdown().await.unwrap();
    }
}
