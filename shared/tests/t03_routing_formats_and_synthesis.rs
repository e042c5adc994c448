//! The other routing data sets parse into the shapes their READMEs describe, and a synthetic
//! trace calibrated from Qwen3's per-layer fractions replays under every policy.
//!
//! Reads `$MOELESS_SHARED_DIR` (default `../shared`); a missing directory fails unless
//! `MOELESS_SKIP_REFERENCE=1`.

mod common;
use common::routing_dir;

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use shared::replay::{replay, PolicyKind, ReplayConfig};
use shared::synth::{generate, SynthConfig};
use shared::trace::Phase;
use shared::trace_formats::{CoActivation, ExpertCounts, LayerFractions, ScoredTrace};

fn open(p: PathBuf) -> BufReader<File> {
    BufReader::new(File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

#[test]
fn olmoe_mixtral_counts_and_coactivation() {
    let Some(d) = routing_dir() else { return };
    let c = ExpertCounts::parse_long_csv(open(d.join("olmoe-mixtral-counts/derived_expert_counts_long.csv"))).unwrap();
    let (layers, loads) = c.loads("olmoe", "arxiv", "topk(k=8)").unwrap();
    assert_eq!(layers, vec![0, 7, 15]);
    assert_eq!(loads[0].len(), 64);
    let (_, mix) = c.loads("mistral", "arxiv", "topk(k=2)").unwrap();
    assert_eq!(mix[0].len(), 8);
    let co = CoActivation::parse_long_csv(open(
        d.join("olmoe-mixtral-counts/derived_crosslayer_cooccurrence_long.csv"),
    ))
    .unwrap();
    let a = co.affinity("olmoe", "arxiv", "topk", 0, 7).unwrap();
    assert_eq!(a.len(), 64);
    assert!(a.iter().all(|r| (r.iter().sum::<f64>() - 1.0).abs() < 1e-9));
}

#[test]
fn qwen3_fractions_calibrate_a_synthetic_trace() {
    let Some(d) = routing_dir() else { return };
    let f = LayerFractions::parse_csv(open(
        d.join("qwen3-30b-a3b-load/moe_all_layers_analysis_arc_en_he_500_20250921_090254_avg_dist.csv"),
    ))
    .unwrap();
    assert_eq!(f.num_experts, 128);
    let pop = f.loads("English").unwrap();
    assert_eq!(pop.len(), 48);
    // Qwen3-30B-A3B routes top-8 of 128; 4 groups of 16 queries, 12 decode steps each.
    let steps = generate(&pop, None, &SynthConfig::new(8, 16, 4, 12, 42)).unwrap();
    assert_eq!(steps.len(), 48);
    let cfg = ReplayConfig::new(8, 18);
    let stat = replay(&steps, 128, 8, PolicyKind::Static, &cfg).unwrap();
    let moe = replay(&steps, 128, 8, PolicyKind::Moeless, &cfg).unwrap();
    assert!(
        moe.balancedness_mean > stat.balancedness_mean,
        "{} vs {}",
        moe.balancedness_mean,
        stat.balancedness_mean
    );
    assert!(moe.peak_gpu_slots <= 18);
}

#[test]
fn flame_top6_with_scores() {
    let Some(d) = routing_dir() else { return };
    let t = ScoredTrace::parse_flame_topk_csv(open(d.join("flame-moe-290m/derived_top6_per_token.csv")), 64).unwrap();
    assert_eq!(t.trace.top_k, 6);
    assert_eq!(t.trace.layer_ids, (2..=9).collect::<Vec<u32>>());
    // 2048 prefill tokens + 64 sequences x 10 decode positions.
    assert_eq!(t.trace.tokens.len(), 2048 + 640);
    assert!(t.scores.iter().all(|s| s.len() == 48));
    let steps = t.trace.batch_steps(Phase::Decode, 64).unwrap();
    assert_eq!(steps.len(), 10);
    assert_eq!(steps[0].routes[0].len(), 64 * 6);
    let r = replay(&steps, 64, 6, PolicyKind::Moeless, &ReplayConfig::new(8, 10)).unwrap();
    assert_eq!(r.steps, 10);
}
