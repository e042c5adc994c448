//! candle-transformers' Mixtral and our engine agree on greedy tokens for a checkpoint written
//! by our generator.

use candle_mixtral_peer::{greedy_mixtral, run_mixtral, PeerDtype};
use data_plane::config::Arch;
use data_plane::engine::Engine;
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};

/// candle derives head_dim = hidden / heads, so the shape keeps 64 = 4 x 16.
fn shape() -> ModelShape {
    ModelShape {
        vocab: 96,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        experts: 8,
        top_k: 2,
        expert_intermediate: 48,
        dense_intermediate: 64,
        max_positions: 128,
    }
}

#[test]
fn greedy_tokens_match_our_engine() -> anyhow::Result<()> {
    let prompts: [Vec<u32>; 3] = [
        vec![1, 17, 42, 5, 88, 23, 9],
        vec![3],
        (0..40).map(|i| (i * 37 + 11) % 96).collect(),
    ];
    let n = 16;
    let mut seen = std::collections::BTreeSet::new();
    for seed in [7u64, 2024] {
        let dir = tempfile::tempdir()?;
        write_random_checkpoint(dir.path(), Arch::Mixtral, &shape(), seed, SaveDtype::F32)?;
        let engine = Engine::load_local(dir.path())?;
        for prompt in &prompts {
            let ours = engine.generate_greedy(std::slice::from_ref(prompt), n)?;
            let candle = greedy_mixtral(dir.path(), prompt, n)?;
            assert_eq!(candle.len(), n);
            seen.extend(candle.iter().copied());
            assert_eq!(
                ours[0], candle,
                "seed {seed}, prompt {prompt:?}: engine vs candle greedy tokens"
            );
        }
    }
    // Guards against a degenerate model that emits one token whatever the input.
    assert!(seen.len() >= 8, "only {} distinct tokens generated", seen.len());
    Ok(())
}

#[test]
fn run_mixtral_reports_throughput() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_random_checkpoint(dir.path(), Arch::Mixtral, &shape(), 3, SaveDtype::F32)?;
    for batch in [1, 4] {
        let t = run_mixtral(dir.path(), PeerDtype::F32, batch, 8, 4, 3)?;
        assert!(t.prefill_tokens_per_s.is_finite() && t.prefill_tokens_per_s > 0.0);
        assert!(t.decode_tokens_per_s.is_finite() && t.decode_tokens_per_s > 0.0);
    }
    Ok(())
}
