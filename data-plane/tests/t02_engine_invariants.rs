//! Invariants of the engine on generated checkpoints (no reference data needed):
//! KV-cache decoding equals full recomputation, the paged cache equals per-sequence buffers,
//! prefix-cached prompts equal full prefills, and splitting experts into instances does not
//! change outputs, for every architecture.

use std::sync::Arc;

use data_plane::config::Arch;
use data_plane::engine::{argmax, Engine};
use data_plane::expert::UnevenSplit;
use data_plane::model::LogitsWanted;
use data_plane::reference::assert_close;
use data_plane::testing::{write_random_checkpoint, ModelShape, SaveDtype};

fn tiny(arch: Arch) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_random_checkpoint(dir.path(), arch, &ModelShape::tiny(), 42, SaveDtype::F32).expect("writing checkpoint");
    let engine = Engine::load_local(dir.path()).expect("loading generated checkpoint");
    (dir, engine)
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 3, 80, 11, 2, 9],
        vec![44],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    ]
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for arch in Arch::ALL {
        let (_dir, engine) = tiny(arch);
        for prompt in prompts() {
            // Decode 6 tokens with the cache, one token per step.
            let mut cache = vec![engine.new_cache()];
            let (l, _) = engine
                .step(&mut cache, &[&prompt], LogitsWanted::Last)
                .expect("prefill");
            let mut seq = prompt.clone();
            let mut step_logits = vec![l[0].clone()];
            for _ in 0..6 {
                let next = argmax(step_logits.last().unwrap().row(0));
                seq.push(next);
                let (l, _) = engine.step(&mut cache, &[&[next]], LogitsWanted::Last).expect("decode");
                step_logits.push(l[0].clone());
            }
            // Recompute every position from scratch.
            let full = engine.forward_prompts(&[seq.clone()], false).expect("recompute");
            for (s, l) in step_logits.iter().enumerate() {
                let row = prompt.len() - 1 + s;
                assert_close(
                    &format!("{arch:?} step {s}"),
                    l.data(),
                    full[0].logits.row(row),
                    1e-4,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    for arch in Arch::ALL {
        let (_dir, engine) = tiny(arch);
        let all = engine.generate_greedy(&prompts(), 8).expect("batched");
        for (p, want) in prompts().iter().zip(&all) {
            let one = engine.generate_greedy(std::slice::from_ref(p), 8).expect("single");
            assert_eq!(&one[0], want, "{arch:?}");
            assert_eq!(want.len(), 8);
        }
    }
}

#[test]
fn outputs_do_not_depend_on_how_experts_are_split() {
    for arch in Arch::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        write_random_checkpoint(dir.path(), arch, &ModelShape::tiny(), 7, SaveDtype::F32).expect("checkpoint");
        let base = Engine::load_local(dir.path()).expect("load");
        let want = base.forward_prompts(&prompts(), false).expect("forward");
        let want_gen = base.generate_greedy(&prompts(), 6).expect("generate");
        for k in [2, 3, 5] {
            let split = Engine::load_local(dir.path())
                .expect("load")
                .with_shares(Arc::new(UnevenSplit { k }));
            let got = split.forward_prompts(&prompts(), false).expect("forward");
            for (g, w) in got.iter().zip(&want) {
                assert_close(&format!("{arch:?} k={k}"), g.logits.data(), w.logits.data(), 1e-5, 1e-5);
                for (a, b) in g.routing.iter().zip(&w.routing) {
                    assert_eq!(a.ids, b.ids, "{arch:?} k={k} layer {}", a.layer);
                    assert_close("weights", &a.weights, &b.weights, 1e-6, 1e-6);
                }
            }
            assert_eq!(
                split.generate_greedy(&prompts(), 6).expect("generate"),
                want_gen,
                "{arch:?} k={k}"
            );
        }
    }
}

#[test]
fn bf16_and_f16_checkpoints_load_and_track_f32() {
    for dtype in [SaveDtype::Bf16, SaveDtype::F16] {
        let (d32, d16) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_random_checkpoint(d32.path(), Arch::Mixtral, &ModelShape::tiny(), 3, SaveDtype::F32).unwrap();
        write_random_checkpoint(d16.path(), Arch::Mixtral, &ModelShape::tiny(), 3, dtype).unwrap();
        let a = Engine::load_local(d32.path())
            .unwrap()
            .forward_prompts(&prompts(), false)
            .unwrap();
        let b = Engine::load_local(d16.path())
            .unwrap()
            .forward_prompts(&prompts(), false)
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            let diff = x.logits.max_abs_diff(&y.logits);
            // Rounded weights move logits a little, not wholesale.
            assert!(diff > 0.0 && diff < 0.5, "{dtype:?}: max logit diff {diff}");
        }
    }
}

#[test]
fn out_of_range_tokens_and_empty_prompts_are_errors() {
    let (_dir, engine) = tiny(Arch::Qwen3Moe);
    let v = engine.config().vocab_size as u32;
    let e = engine.forward_prompts(&[vec![1, v]], false).unwrap_err();
    assert!(e.to_string().contains(&v.to_string()), "{e}");
    assert!(engine.forward_prompts(&[vec![]], false).is_err());
    let too_long = vec![1u32; engine.config().max_position_embeddings + 1];
    assert!(engine.generate_greedy(&[too_long], 1).is_err());
}

#[test]
fn bf16_weights_compute_exactly_like_their_f32_widening() {
    use data_plane::checkpoint::{save_safetensors, Checkpoint, RawTensor, TensorSource};
    let d16 = tempfile::tempdir().unwrap();
    write_random_checkpoint(d16.path(), Arch::Qwen2Moe, &ModelShape::tiny(), 9, SaveDtype::Bf16).unwrap();
    // The same values stored as f32.
    let d32 = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(d16.path()).unwrap();
    let raw: Vec<RawTensor> = ckpt
        .names()
        .map(|n| {
            let shape = ckpt.shape(n).unwrap().to_vec();
            RawTensor::f32(n, shape.clone(), ckpt.tensor(n, &shape).unwrap().data())
        })
        .collect();
    save_safetensors(&d32.path().join("model.safetensors"), &raw).unwrap();
    std::fs::copy(d16.path().join("config.json"), d32.path().join("config.json")).unwrap();
    let a = Engine::load_local(d16.path()).unwrap();
    let b = Engine::load_local(d32.path()).unwrap();
    // Prompts long enough for the gemm path and single tokens for the matrix-vector path.
    let ps = vec![(0..40).map(|i| (i * 7 % 96) as u32).collect::<Vec<u32>>(), vec![3]];
    let (x, y) = (
        a.forward_prompts(&ps, false).unwrap(),
        b.forward_prompts(&ps, false).unwrap(),
    );
    for (p, q) in x.iter().zip(&y) {
        assert_close("bf16 vs widened f32", p.logits.data(), q.logits.data(), 1e-5, 1e-5);
    }
    assert_eq!(a.generate_greedy(&ps, 5).unwrap(), b.generate_greedy(&ps, 5).unwrap());
}

/// The server's paged KV cache (blocks of a shared pool, named by block tables that interleave
/// between sequences) gives bit-identical logits to per-sequence buffers, for every
/// architecture (MLA, sliding windows and sinks included).
#[test]
fn paged_kv_cache_equals_owned_buffers() {
    for arch in Arch::ALL {
        let (_dir, engine) = tiny(arch);
        let pool = engine.new_kv_pool(3, 64, false);
        let prompts = prompts();
        let mut owned: Vec<_> = prompts.iter().map(|_| engine.new_cache()).collect();
        let mut paged: Vec<_> = prompts.iter().map(|_| pool.new_cache()).collect();
        let mut feed: Vec<Vec<u32>> = prompts.clone();
        for step in 0..7 {
            let toks: Vec<&[u32]> = feed.iter().map(|t| t.as_slice()).collect();
            let (a, _) = engine.step(&mut owned, &toks, LogitsWanted::Last).expect("owned step");
            let (b, _) = engine.step(&mut paged, &toks, LogitsWanted::Last).expect("paged step");
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x.data(), y.data(), "{arch:?} step {step} sequence {i}");
            }
            feed = a.iter().map(|l| vec![argmax(l.row(0))]).collect();
        }
        let table = paged[2].block_table().expect("paged");
        assert!(
            table.windows(2).any(|w| w[1] != w[0] + 1),
            "{arch:?}: blocks should interleave between sequences: {table:?}"
        );
        drop(paged);
        assert_eq!(pool.blocks_in_use(), 0, "{arch:?}: dropped caches return their blocks");
    }
}

/// A prompt that starts with blocks another sequence already computed reuses them (prefix
/// caching) and gets the logits a full prefill gives.
#[test]
fn prefix_cached_prompt_matches_full_prefill() {
    for arch in Arch::ALL {
        let (_dir, engine) = tiny(arch);
        let pool = engine.new_kv_pool(4, 32, true);
        let first: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 90).collect();
        let mut second = first[..11].to_vec();
        second.extend([90, 91, 92]);
        let mut a = vec![pool.new_cache()];
        engine
            .step(&mut a, &[&first], LogitsWanted::Last)
            .expect("first prompt");

        let mut b = vec![pool.new_cache()];
        let hit = pool.attach_prefix(&mut b[0], &second);
        assert_eq!(hit, 8, "{arch:?}: two full blocks in common");
        let (cached, _) = engine
            .step(&mut b, &[&second[hit..]], LogitsWanted::All)
            .expect("suffix prefill");
        let full = engine.forward_prompts(&[second.clone()], false).expect("full prefill");
        for (r, pos) in (hit..second.len()).enumerate() {
            assert_close(
                &format!("{arch:?} position {pos}"),
                cached[0].row(r),
                full[0].logits.row(pos),
                1e-4,
                1e-4,
            );
        }
        // Decoding on from the shared blocks still matches.
        let next = argmax(cached[0].row(cached[0].rows() - 1));
        let (d, _) = engine.step(&mut b, &[&[next]], LogitsWanted::Last).expect("decode");
        let mut longer = second.clone();
        longer.push(next);
        let full = engine.forward_prompts(&[longer.clone()], false).expect("recompute");
        assert_close(
            &format!("{arch:?} decode"),
            d[0].data(),
            full[0].logits.row(longer.len() - 1),
            1e-4,
            1e-4,
        );
    }
}
