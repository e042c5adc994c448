//! Starts a real server on 127.0.0.1:0 over the built-in model and talks HTTP to it.
#![allow(dead_code)]

use std::time::Duration;

use data_plane::engine::Engine;
use endpoint::{ServeConfig, Server, TextTokenizer};
use serde_json::Value;

pub const MODEL: &str = "moeless-builtin";

pub async fn start(cfg: ServeConfig) -> (Server, String) {
    let engine = Engine::builtin().expect("built-in model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server::start(engine, Some(TextTokenizer::bytes()), cfg, listener)
        .await
        .expect("server starts");
    let base = format!("http://{}", server.local_addr());
    (server, base)
}

pub fn config() -> ServeConfig {
    ServeConfig {
        model_name: MODEL.into(),
        shutdown_timeout: Duration::from_secs(5),
        kv_cache_bytes: 256 << 20,
        ..Default::default()
    }
}

pub fn client() -> reqwest::Client {
    pki::https::http_client_builder().build().expect("HTTP client")
}

pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

/// The body of a GET as text.
pub async fn get_text(base: &str, path: &str) -> String {
    client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request sent")
        .text()
        .await
        .expect("body read")
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

pub fn token_ids(choice: &Value) -> Vec<u32> {
    choice["token_ids"]
        .as_array()
        .expect("token_ids returned")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// Asserts the OpenAI error shape and returns the message.
pub fn error_message(v: &Value) -> String {
    let e = &v["error"];
    assert!(e.is_object(), "not an OpenAI error: {v}");
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks `{k}`: {v}");
    }
    e["message"].as_str().expect("message is a string").to_string()
}
