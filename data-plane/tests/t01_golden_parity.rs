//! The engine reproduces Hugging Face transformers on every golden architecture: logits,
//! router logits, expert ids and weights, expert counts, RoPE frequencies and greedy tokens.

use std::sync::Arc;

use data_plane::engine::Engine;
use data_plane::expert::UnevenSplit;
use data_plane::reference::*;

fn check_arch(arch: &str, split: Option<u32>) {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden").join(arch);
    let mut engine = Engine::load_local(&dir).unwrap_or_else(|e| panic!("{arch}: loading: {e}"));
    if let Some(k) = split {
        engine = engine.with_shares(Arc::new(UnevenSplit { k }));
    }
    check_engine_against_golden(arch, &dir, &engine, 1.0);
}

macro_rules! arch_tests {
    ($($name:ident => $arch:literal),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn matches_transformers() { super::check_arch($arch, None) }
                #[test]
                fn matches_transformers_with_experts_split_over_3_instances() { super::check_arch($arch, Some(3)) }
            }
        )*
    };
}

arch_tests! {
    mixtral => "mixtral",
    qwen2_moe => "qwen2_moe",
    qwen3_moe => "qwen3_moe",
    olmoe => "olmoe",
    deepseek_v3 => "deepseek_v3",
    phimoe => "phimoe",
    gpt_oss => "gpt_oss",
}
