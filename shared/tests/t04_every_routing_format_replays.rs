//! Every routing file of the reference data is recognised by its name, turns into replay steps
//! (per-token traces as they are, aggregate data through the seeded generator), and replays
//! with MoEless at least as balanced as static expert parallelism; a truncated copy of each is
//! a typed trace error, never a panic.
//!
//! Reads `$MOELESS_SHARED_DIR` (default `../shared`); a missing directory fails unless
//! `MOELESS_SKIP_REFERENCE=1`.

mod common;
use common::routing_dir;

use std::path::{Path, PathBuf};

use shared::replay::{replay, PolicyKind, ReplayConfig};
use shared::source::{load_steps, RoutingFormat, SourceError, SourceOptions};
use shared::trace::Phase;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// What the file does not say: expert counts of the per-token CSVs and of Qwen1.5-MoE's log,
/// top-k of normalised fractions and of co-activation counts of `topk` selections.
fn options(format: RoutingFormat, path: &Path) -> SourceOptions {
    let mut o = SourceOptions::new(Phase::Decode, 32);
    o.synth_groups = 2;
    o.synth_steps = 10;
    o.seed = 7;
    match format {
        RoutingFormat::Llama4Top1 => o.num_experts = Some(128),
        RoutingFormat::FlameTopK => o.num_experts = Some(64),
        RoutingFormat::VllmJsonl if path.to_string_lossy().contains("qwen15") => o.num_experts = Some(60),
        RoutingFormat::LayerFractions => o.top_k = Some(8),
        _ => {}
    }
    o
}

#[test]
fn every_reference_routing_file_replays() {
    let Some(dir) = routing_dir() else { return };
    let mut all = Vec::new();
    files(&dir, &mut all);
    let mut seen = Vec::new();
    for path in &all {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(format) = RoutingFormat::detect(&name) else {
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let r = load_steps(format, text.as_bytes(), &options(format, path))
            .unwrap_or_else(|e| panic!("{} as {}: {e}", path.display(), format.label()));
        assert!(!r.steps.is_empty(), "{}", path.display());
        assert_eq!(r.steps[0].counts.len(), r.layer_ids.len());
        // 4 GPUs divide every expert count here (128, 64, 60, 8); 4 spare slots per GPU.
        let cfg = ReplayConfig::new(4, r.num_experts / 4 + 4);
        let steps = &r.steps[..r.steps.len().min(40)];
        let stat = replay(steps, r.num_experts, r.top_k, PolicyKind::Static, &cfg).unwrap();
        let moe = replay(steps, r.num_experts, r.top_k, PolicyKind::Moeless, &cfg).unwrap();
        eprintln!(
            "{name} ({}): static {:.3} moeless {:.3}; {}",
            format.label(),
            stat.balancedness_mean,
            moe.balancedness_mean,
            r.description
        );
        assert!(
            moe.balancedness_mean >= stat.balancedness_mean,
            "{name}: moeless {} static {}",
            moe.balancedness_mean,
            stat.balancedness_mean
        );
        if !seen.contains(&format) {
            seen.push(format);
        }
    }
    for f in RoutingFormat::ALL {
        assert!(seen.contains(&f), "no reference file of format {}", f.label());
    }
}

#[test]
fn truncated_files_are_typed_errors() {
    let Some(dir) = routing_dir() else { return };
    let mut all = Vec::new();
    files(&dir, &mut all);
    for path in &all {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(format) = RoutingFormat::detect(&name) else {
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Five whole lines and half of the sixth, as a copy cut off mid-write would be.
        let cut: usize = text.split_inclusive('\n').take(5).map(str::len).sum();
        let sixth = text[cut..].split_inclusive('\n').next().unwrap_or("");
        let truncated = &text[..cut + sixth.len() / 2];
        match load_steps(format, truncated.as_bytes(), &options(format, path)) {
            Err(SourceError::Trace(_)) => {}
            other => panic!("{name}: expected a trace error, got {other:?}"),
        }
    }
}
