//! The engine reproduces Hugging Face transformers on every golden architecture: logits,
//! router logits, expert ids and weights, expert counts, RoPE frequencies and greedy tokens.

use std::sync::Arc;

use data_plane::engine::{argmax, Engine};
use data_plane::expert::UnevenSplit;
use data_plane::model::LogitsWanted;
use data_plane::reference::*;

fn check_arch(arch: &str, split: Option<u32>) {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden").join(arch);
    let mut engine = Engine::load_local(&dir).unwrap_or_else(|e| panic!("{arch}: loading: {e}"));
    if let Some(k) = split {
        engine = engine.with_shares(Arc::new(UnevenSplit { k }));
    }
    let golden = Golden::read(&dir.join("golden.safetensors"));
    let prompts = read_prompts(&dir);

    // RoPE frequencies and the attention scaling factor.
    let rope = engine.model().rope();
    assert_close(
        &format!("{arch} rope_inv_freq"),
        &rope.inv_freq,
        &golden.f("rope_inv_freq").1,
        0.0,
        1e-5,
    );
    if let Some(s) = golden.metadata.get("rope_attention_scaling") {
        let s: f32 = s.parse().expect("rope_attention_scaling is a number");
        assert!(
            (rope.attention_scaling - s).abs() < 1e-6,
            "{arch}: attention scaling {} vs {s}",
            rope.attention_scaling
        );
    }

    let out = engine
        .forward_prompts(&prompts, true)
        .unwrap_or_else(|e| panic!("{arch}: forward: {e}"));
    let layers = engine.config().num_layers;
    let moe_layers = engine.config().moe_layers();
    let e = engine.config().moe.num_experts;
    for (p, f) in out.iter().enumerate() {
        assert_close(
            &format!("{arch} p{p}.logits"),
            f.logits.data(),
            &golden.f(&format!("p{p}.logits")).1,
            1e-4,
            1e-4,
        );
        // hidden_states.{0} embeddings, .{j} layer j-1 output, .{L} final-normed; layer_output.{i} raw.
        assert_eq!(f.hidden.len(), layers + 2);
        for j in 0..=layers {
            let mine = if j == layers {
                &f.hidden[layers + 1]
            } else {
                &f.hidden[j]
            };
            let want = &golden.f(&format!("p{p}.hidden_states.{j}")).1;
            assert_close(&format!("{arch} p{p}.hidden_states.{j}"), mine.data(), want, 1e-4, 1e-4);
        }
        for i in 0..layers {
            let want = &golden.f(&format!("p{p}.layer_output.{i}")).1;
            assert_close(
                &format!("{arch} p{p}.layer_output.{i}"),
                f.hidden[i + 1].data(),
                want,
                1e-4,
                1e-4,
            );
        }
        let counts = &golden.i(&format!("p{p}.expert_counts")).1;
        assert_eq!(f.routing.len(), moe_layers.len());
        for (mi, r) in f.routing.iter().enumerate() {
            let i = r.layer;
            assert_eq!(i, moe_layers[mi]);
            let ids: Vec<i64> = r.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(
                ids,
                golden.i(&format!("p{p}.expert_ids.{i}")).1,
                "{arch} p{p} expert_ids.{i}"
            );
            assert_close(
                &format!("{arch} p{p}.expert_weights.{i}"),
                &r.weights,
                &golden.f(&format!("p{p}.expert_weights.{i}")).1,
                1e-5,
                1e-5,
            );
            assert_close(
                &format!("{arch} p{p}.router_logits.{i}"),
                r.router_logits.data(),
                &golden.f(&format!("p{p}.router_logits.{i}")).1,
                1e-5,
                1e-5,
            );
            let mut mine = vec![0i64; e];
            r.ids.iter().for_each(|&x| mine[x as usize] += 1);
            assert_eq!(mine, counts[mi * e..(mi + 1) * e], "{arch} p{p} expert_counts row {mi}");
        }
    }

    // KV-cache decoding reproduces transformers' logits of every cached greedy step.
    for (p, prompt) in prompts.iter().enumerate() {
        let (shape, want) = golden.f(&format!("p{p}.gen_logits"));
        let v = shape[1];
        let mut cache = vec![engine.new_cache()];
        let (mut l, _) = engine.step(&mut cache, &[prompt], LogitsWanted::Last).expect("prefill");
        for s in 0..shape[0] {
            assert_close(
                &format!("{arch} p{p} gen_logits step {s}"),
                l[0].data(),
                &want[s * v..(s + 1) * v],
                1e-4,
                1e-4,
            );
            let next = argmax(l[0].row(0));
            l = engine
                .step(&mut cache, &[&[next]], LogitsWanted::Last)
                .expect("decode")
                .0;
        }
    }

    let gen = engine
        .generate_greedy(&prompts, 12)
        .unwrap_or_else(|e| panic!("{arch}: generate: {e}"));
    for (p, g) in gen.iter().enumerate() {
        let want: Vec<u32> = golden.i(&format!("p{p}.gen_ids")).1.iter().map(|&x| x as u32).collect();
        assert_eq!(g, &want, "{arch} p{p} greedy ids");
    }
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
