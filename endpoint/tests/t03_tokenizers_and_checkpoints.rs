//! Real tokenizers and chat templates (Qwen3, DeepSeek-V3 from ../shared/data/tokenizers), and
//! a real checkpoint served with token-id prompts giving the engine's own greedy tokens.

mod common;

use std::time::Duration;

use data_plane::engine::Engine;
use data_plane::reference::{read_prompts, shared_dir};
use endpoint::tokenizer::IncrementalDecoder;
use endpoint::{ServeConfig, Server, TextTokenizer};
use serde_json::json;

#[test]
fn qwen3_tokenizer_and_chat_template() {
    let Some(shared) = shared_dir() else { return };
    let tok = TextTokenizer::from_dir(&shared.join("data/tokenizers/qwen3")).unwrap();
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![9707, 1879]);
    let text = "Serverless experts scale to zero — 零 🚀";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Streaming detokenization reassembles the same text.
    let mut d = IncrementalDecoder::default();
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&d.push(&tok, id).unwrap());
    }
    streamed.push_str(&d.finish(&tok).unwrap());
    assert_eq!(streamed, text);
    assert_eq!(tok.eos_token_ids(), &[151645]);
    let msgs = vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "hi"}),
    ];
    let rendered = tok.template().render(&msgs, None, true, None).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("enable_thinking".into(), json!(false));
    let rendered = tok.template().render(&msgs, None, true, Some(&kwargs)).unwrap();
    assert!(rendered.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    // Special tokens in the rendered prompt are single ids.
    let ids = tok.encode(&rendered, false).unwrap();
    assert_eq!(ids[0], 151644);
}

#[test]
fn deepseek_v3_tokenizer_and_chat_template() {
    let Some(shared) = shared_dir() else { return };
    let tok = TextTokenizer::from_dir(&shared.join("data/tokenizers/deepseek_v3")).unwrap();
    let msgs = vec![
        json!({"role": "system", "content": "S"}),
        json!({"role": "user", "content": "hi"}),
        json!({"role": "assistant", "content": "yo"}),
        json!({"role": "user", "content": "again"}),
    ];
    let rendered = tok.template().render(&msgs, None, true, None).unwrap();
    assert_eq!(
        rendered,
        "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜><｜User｜>again<｜Assistant｜>"
    );
    let ids = tok.encode(&rendered, false).unwrap();
    assert_eq!(tok.encode("<｜begin▁of▁sentence｜>", false).unwrap(), vec![ids[0]]);
    assert_eq!(tok.eos_token_ids().len(), 1);
    let text = "def f(x):\n    return x * 2  # ünïcödé";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
}

#[tokio::test]
async fn golden_checkpoint_served_with_token_ids_matches_generate_greedy() {
    let Some(shared) = shared_dir() else { return };
    for arch in ["qwen3_moe", "deepseek_v3"] {
        let dir = shared.join("golden").join(arch);
        let prompts = read_prompts(&dir);
        let engine = Engine::load_local(&dir).unwrap();
        let expected = engine.generate_greedy(&prompts, 10).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = ServeConfig {
            model_name: arch.into(),
            shutdown_timeout: Duration::from_secs(5),
            kv_cache_bytes: 64 << 20,
            ..Default::default()
        };
        let server = Server::start(Engine::load_local(&dir).unwrap(), None, cfg, listener)
            .await
            .unwrap();
        let base = format!("http://{}", server.local_addr());
        for (p, want) in prompts.iter().zip(&expected) {
            let (status, v) = common::post(
                &base,
                "/v1/completions",
                &json!({"model": arch, "prompt": p, "max_tokens": 10, "temperature": 0, "return_token_ids": true}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(&common::token_ids(&v["choices"][0]), want, "{arch}");
        }
        // Text needs a tokenizer: a clear 400, not a crash.
        let (status, v) = common::post(&base, "/v1/completions", &json!({"prompt": "text"})).await;
        assert_eq!(status, 400);
        common::error_message(&v);
        server.shutdown().await.unwrap();
    }
}
