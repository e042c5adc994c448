//! One routing input, whatever its format, turned into replay steps.
//!
//! Per-token traces (Llama-4 top-1 CSV, FLAME-MoE top-k CSV, vLLM route logs) are batched as
//! they are; aggregate data (per-expert counts, cross-layer co-activation counts, per-layer
//! activation fractions) calibrate the seeded generator of [`crate::synth`]. Like the readers,
//! this takes text, never a path: the caller opens the file and may pass its name for
//! [`RoutingFormat::detect`].

use std::io::BufRead;
use std::str::FromStr;

use thiserror::Error;

use crate::synth::{generate, SynthConfig, SynthError};
use crate::trace::{Phase, Step, TraceError};
use crate::trace_formats::{CoActivation, ExpertCounts, LayerFractions, ScoredTrace, VllmRoutes};

/// The routing formats of the reference data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingFormat {
    /// `subject,query_id,phase,token_idx,L<n>..`: per-token top-1 (Llama-4-Maverick MMLU).
    Llama4Top1,
    /// `phase,position_folder,layer,row,seq_idx,tok_in_seq,e1..ek,s1..sk` (FLAME-MoE).
    FlameTopK,
    /// vLLM FusedMoE route log, JSON lines (`meta` then `route` records).
    VllmJsonl,
    /// `model,hf_model_id,domain,selection,layer,expert,count` (OLMoE / Mixtral): synthesised.
    ExpertCounts,
    /// `model,domain,selection,layer_a,layer_b,expert_a,expert_b,count`: synthesised with
    /// popularity from the marginals and cross-layer affinity.
    CoActivation,
    /// `Layer,Language,Expert_0..` (Qwen3-30B-A3B per-layer fractions): synthesised.
    LayerFractions,
}

impl RoutingFormat {
    /// Every format, in the order of the labels.
    pub const ALL: [RoutingFormat; 6] = [
        RoutingFormat::Llama4Top1,
        RoutingFormat::FlameTopK,
        RoutingFormat::VllmJsonl,
        RoutingFormat::ExpertCounts,
        RoutingFormat::CoActivation,
        RoutingFormat::LayerFractions,
    ];

    /// The name `--format` takes.
    pub fn label(self) -> &'static str {
        match self {
            RoutingFormat::Llama4Top1 => "llama4-top1",
            RoutingFormat::FlameTopK => "flame-topk",
            RoutingFormat::VllmJsonl => "vllm-jsonl",
            RoutingFormat::ExpertCounts => "expert-counts",
            RoutingFormat::CoActivation => "coactivation",
            RoutingFormat::LayerFractions => "layer-fractions",
        }
    }

    /// Whether steps are synthesised from aggregate data rather than read token by token.
    pub fn is_aggregate(self) -> bool {
        matches!(
            self,
            RoutingFormat::ExpertCounts | RoutingFormat::CoActivation | RoutingFormat::LayerFractions
        )
    }

    /// The format of the reference files by their file name, where the name says it
    /// unambiguously; `None` otherwise (pass the format explicitly).
    pub fn detect(file_name: &str) -> Option<RoutingFormat> {
        let n = file_name.to_ascii_lowercase();
        if n.ends_with(".jsonl") && n.contains("route") {
            Some(RoutingFormat::VllmJsonl)
        } else if !n.ends_with(".csv") {
            None
        } else if n.contains("top1_per_token") {
            Some(RoutingFormat::Llama4Top1)
        } else if n.contains("top6_per_token") || n.contains("topk_per_token") {
            Some(RoutingFormat::FlameTopK)
        } else if n.contains("expert_counts") {
            Some(RoutingFormat::ExpertCounts)
        } else if n.contains("cooccurrence") || n.contains("coactivation") {
            Some(RoutingFormat::CoActivation)
        } else if n.contains("avg_dist") || n.contains("avg_activation") {
            Some(RoutingFormat::LayerFractions)
        } else {
            None
        }
    }
}

impl FromStr for RoutingFormat {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoutingFormat::ALL
            .into_iter()
            .find(|f| f.label() == s)
            .ok_or_else(|| SourceError::UnknownFormat(s.to_string()))
    }
}

/// Why a routing input could not be turned into steps.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error(
        "unknown routing format `{0}` (llama4-top1, flame-topk, vllm-jsonl, expert-counts, coactivation, layer-fractions)"
    )]
    UnknownFormat(String),
    #[error("cannot tell the routing format of `{0}` from its name: pass the format explicitly")]
    Undetected(String),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Synth(#[from] SynthError),
    #[error("no series `{wanted}` in the file (available: {available})")]
    NoSeries { wanted: String, available: String },
    #[error("`{0}` needs the number of experts (the file does not say it)")]
    ExpertsUnknown(&'static str),
    #[error("the routing top-k of this data cannot be inferred from the file: {0}")]
    TopKUnknown(String),
    #[error("unknown split `{0}` (all, first-half, second-half)")]
    UnknownSplit(String),
    #[error("split {split:?} of {groups} batches holds no steps")]
    EmptySplit { split: Split, groups: usize },
    #[error("{format} has no {phase} tokens: its steps are {what}")]
    PhaseUnsupported {
        format: &'static str,
        phase: Phase,
        what: &'static str,
    },
}

/// What to take from the input besides its text.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    pub phase: Phase,
    pub batch: usize,
    /// Routed experts; `None`: from the file where it says it (required for the per-token CSVs).
    pub num_experts: Option<usize>,
    /// Which series of an aggregate file: `model,domain,selection` for counts and co-activation,
    /// the language for layer fractions. `None`: the first in sorted order.
    pub series: Option<String>,
    /// Routing top-k for synthesis; `None`: inferred where the file allows it.
    pub top_k: Option<usize>,
    /// Synthesis: groups of `batch` queries, decode steps per group, seed.
    pub synth_groups: usize,
    pub synth_steps: usize,
    pub seed: u64,
}

impl SourceOptions {
    /// Defaults: 4 synthetic groups of 100 steps, seed 0, everything else from the file.
    pub fn new(phase: Phase, batch: usize) -> Self {
        Self {
            phase,
            batch,
            num_experts: None,
            series: None,
            top_k: None,
            synth_groups: 4,
            synth_steps: 100,
            seed: 0,
        }
    }
}

/// Which batches of a trace to use: all, or one half of them in trace order, to tune knobs on
/// one half and check them on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    All,
    FirstHalf,
    SecondHalf,
}

impl FromStr for Split {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Split::All),
            "first-half" => Ok(Split::FirstHalf),
            "second-half" => Ok(Split::SecondHalf),
            other => Err(SourceError::UnknownSplit(other.into())),
        }
    }
}

impl Split {
    /// Keep the steps of this split's batches (groups `0..ceil(n/2)` are the first half of `n`).
    pub fn apply(self, steps: &mut Vec<Step>) -> Result<(), SourceError> {
        let groups = steps.iter().map(|s| s.group + 1).max().unwrap_or(0);
        let half = groups.div_ceil(2);
        match self {
            Split::All => {}
            Split::FirstHalf => steps.retain(|s| s.group < half),
            Split::SecondHalf => steps.retain(|s| s.group >= half),
        }
        if steps.is_empty() {
            return Err(SourceError::EmptySplit { split: self, groups });
        }
        Ok(())
    }
}

/// Replay steps and the model shape they come with.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSteps {
    pub steps: Vec<Step>,
    pub num_experts: usize,
    pub top_k: usize,
    /// Decoder-layer index of each MoE layer of the steps.
    pub layer_ids: Vec<u32>,
    /// Which series was used and how the steps were made, for reports.
    pub description: String,
}

/// Read `input` in `format` and cut it into replay steps (see the module documentation).
pub fn load_steps(
    format: RoutingFormat,
    input: impl BufRead,
    opts: &SourceOptions,
) -> Result<RoutingSteps, SourceError> {
    let need_experts = |what| opts.num_experts.ok_or(SourceError::ExpertsUnknown(what));
    match format {
        RoutingFormat::Llama4Top1 => {
            let e = need_experts("llama4-top1")?;
            let t = crate::trace::TokenTrace::parse_top1_csv(input, e)?;
            Ok(RoutingSteps {
                steps: t.batch_steps(opts.phase, opts.batch)?,
                num_experts: e,
                top_k: t.top_k,
                description: format!("per-token top-1, {} tokens, {} phase", t.tokens.len(), opts.phase),
                layer_ids: t.layer_ids,
            })
        }
        RoutingFormat::FlameTopK => {
            let e = need_experts("flame-topk")?;
            let t = ScoredTrace::parse_flame_topk_csv(input, e)?.trace;
            Ok(RoutingSteps {
                steps: t.batch_steps(opts.phase, opts.batch)?,
                num_experts: e,
                top_k: t.top_k,
                description: format!(
                    "per-token top-{}, {} tokens, {} phase",
                    t.top_k,
                    t.tokens.len(),
                    opts.phase
                ),
                layer_ids: t.layer_ids,
            })
        }
        RoutingFormat::VllmJsonl => {
            if opts.phase != Phase::Decode {
                return Err(SourceError::PhaseUnsupported {
                    format: "vllm-jsonl",
                    phase: opts.phase,
                    what: "consecutive logged tokens (the log keeps no phase)",
                });
            }
            let v = VllmRoutes::parse_jsonl(input, opts.num_experts)?;
            let steps = v.consecutive_steps(opts.batch)?;
            Ok(RoutingSteps {
                steps,
                num_experts: v.num_experts,
                top_k: v.top_k,
                description: format!(
                    "vLLM route log of {}: {} tokens after dropping {} warm-up records, batched in log order",
                    v.model, v.tokens, v.dropped_warmup
                ),
                layer_ids: v.layer_ids,
            })
        }
        RoutingFormat::ExpertCounts => {
            synth_only(format, opts)?;
            let c = ExpertCounts::parse_long_csv(input)?;
            let key = pick(c.series.keys().cloned(), opts.series.as_deref(), |k| {
                format!("{},{},{}", k.0, k.1, k.2)
            })?;
            let (layer_ids, loads) = c.loads(&key.0, &key.1, &key.2).unwrap_or_default();
            let top_k = opts
                .top_k
                .or_else(|| top_k_of_selection(&key.2))
                .ok_or_else(|| SourceError::TopKUnknown(format!("selection `{}`: pass the top-k", key.2)))?;
            let loads = pad_experts(loads, opts.num_experts);
            let label = format!("{},{},{}", key.0, key.1, key.2);
            synthesise(layer_ids, loads, None, top_k, opts, &label)
        }
        RoutingFormat::CoActivation => {
            synth_only(format, opts)?;
            let c = CoActivation::parse_long_csv(input)?;
            let series = c.pairs.keys().map(|k| (k.0.clone(), k.1.clone(), k.2.clone()));
            let key = pick(series, opts.series.as_deref(), |k| format!("{},{},{}", k.0, k.1, k.2))?;
            let top_k = opts.top_k.or_else(|| top_k_of_selection(&key.2)).ok_or_else(|| {
                SourceError::TopKUnknown(format!(
                    "co-activation counts of selection `{}` mix tokens and k: pass the top-k",
                    key.2
                ))
            })?;
            let (layer_ids, loads, affinity) = coactivation_shape(&c, &key, opts.num_experts);
            let label = format!("{},{},{}", key.0, key.1, key.2);
            synthesise(layer_ids, loads, Some(affinity), top_k, opts, &label)
        }
        RoutingFormat::LayerFractions => {
            synth_only(format, opts)?;
            let f = LayerFractions::parse_csv(input)?;
            let lang = pick(f.rows.keys().cloned(), opts.series.as_deref(), Clone::clone)?;
            let layer_ids: Vec<u32> = f
                .rows
                .get(&lang)
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default();
            let loads = f.loads(&lang).unwrap_or_default();
            // Activation files sum to k per layer; distribution files to 1.
            let per_layer = loads.first().map(|r| r.iter().sum::<f64>()).unwrap_or(0.0);
            let top_k = match opts.top_k {
                Some(k) => k,
                None if per_layer >= 1.5 => per_layer.round() as usize,
                None => {
                    return Err(SourceError::TopKUnknown(
                        "fractions sum to 1 per layer: pass the top-k (Qwen3-30B-A3B routes 8)".into(),
                    ))
                }
            };
            let loads = pad_experts(loads, opts.num_experts);
            synthesise(layer_ids, loads, None, top_k, opts, &lang)
        }
    }
}

fn synth_only(format: RoutingFormat, opts: &SourceOptions) -> Result<(), SourceError> {
    if opts.phase == Phase::Decode {
        return Ok(());
    }
    Err(SourceError::PhaseUnsupported {
        format: format.label(),
        phase: opts.phase,
        what: "synthesised decode steps",
    })
}

/// The wanted series, or the first one when none is named.
fn pick<K: Ord + Clone>(
    keys: impl Iterator<Item = K>,
    wanted: Option<&str>,
    name: impl Fn(&K) -> String,
) -> Result<K, SourceError> {
    let mut keys: Vec<K> = keys.collect();
    keys.sort();
    keys.dedup();
    let found = match wanted {
        None => keys.first().cloned(),
        Some(w) => keys.iter().find(|k| name(k) == w).cloned(),
    };
    found.ok_or_else(|| SourceError::NoSeries {
        wanted: wanted.unwrap_or("(any)").to_string(),
        available: keys.iter().map(&name).collect::<Vec<_>>().join("; "),
    })
}

/// `top1` -> 1, `topk(k=8)` -> 8.
fn top_k_of_selection(sel: &str) -> Option<usize> {
    if sel == "top1" {
        return Some(1);
    }
    sel.split("k=").nth(1)?.trim_end_matches(')').parse().ok()
}

/// Widen every row to `experts` (zero load for experts the data never saw).
fn pad_experts(mut loads: Vec<Vec<f64>>, experts: Option<usize>) -> Vec<Vec<f64>> {
    if let Some(n) = experts {
        for r in &mut loads {
            if r.len() < n {
                r.resize(n, 0.0);
            }
        }
    }
    loads
}

/// `(layer ids, loads[layer][expert], affinity[layer][from][to])` for the generator.
type SynthShape = (Vec<u32>, Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>);

/// Layers of a co-activation series, per-layer popularity from the marginals (row sums of
/// `(l, next)` pairs, column sums for the last layer) and affinity of each layer given the
/// previous one (uniform rows where the pair is missing).
fn coactivation_shape(c: &CoActivation, key: &(String, String, String), experts: Option<usize>) -> SynthShape {
    let pairs: Vec<(u32, u32)> = c
        .pairs
        .keys()
        .filter(|k| (&k.0, &k.1, &k.2) == (&key.0, &key.1, &key.2))
        .map(|k| (k.3, k.4))
        .collect();
    let mut layer_ids: Vec<u32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    layer_ids.sort_unstable();
    layer_ids.dedup();
    let seen = c
        .pairs
        .iter()
        .filter(|(k, _)| pairs.contains(&(k.3, k.4)) && (&k.0, &k.1, &k.2) == (&key.0, &key.1, &key.2))
        .flat_map(|(_, m)| m.keys().map(|&(a, b)| a.max(b) as usize + 1))
        .max()
        .unwrap_or(0);
    let n = experts.unwrap_or(0).max(seen);
    let table = |a: u32, b: u32| c.pairs.get(&(key.0.clone(), key.1.clone(), key.2.clone(), a, b));
    let mut loads = vec![vec![0.0; n]; layer_ids.len()];
    for (i, &l) in layer_ids.iter().enumerate() {
        if let Some(m) = layer_ids.get(i + 1).and_then(|&next| table(l, next)) {
            for (&(a, _), &cnt) in m {
                loads[i][a as usize] += cnt as f64;
            }
        } else if let Some(m) = i.checked_sub(1).and_then(|p| table(layer_ids[p], l)) {
            for (&(_, b), &cnt) in m {
                loads[i][b as usize] += cnt as f64;
            }
        }
    }
    let mut affinity = vec![Vec::new(); layer_ids.len()];
    for i in 1..layer_ids.len() {
        let mut rows = vec![vec![1.0 / n as f64; n]; n];
        if let Some(a) = c.affinity(&key.0, &key.1, &key.2, layer_ids[i - 1], layer_ids[i]) {
            for (r, row) in a.iter().enumerate() {
                if row.len() == n {
                    rows[r].clone_from(row);
                } else {
                    // Pad a smaller table: the experts it never saw get nothing.
                    rows[r] = row.iter().copied().chain(std::iter::repeat(0.0)).take(n).collect();
                }
            }
        }
        affinity[i] = rows;
    }
    (layer_ids, loads, affinity)
}

fn synthesise(
    layer_ids: Vec<u32>,
    loads: Vec<Vec<f64>>,
    affinity: Option<Vec<Vec<Vec<f64>>>>,
    top_k: usize,
    opts: &SourceOptions,
    series: &str,
) -> Result<RoutingSteps, SourceError> {
    let cfg = SynthConfig::new(top_k, opts.batch, opts.synth_groups, opts.synth_steps, opts.seed);
    let steps = generate(&loads, affinity.as_deref(), &cfg)?;
    let num_experts = loads.first().map_or(0, Vec::len);
    Ok(RoutingSteps {
        steps,
        num_experts,
        top_k,
        layer_ids,
        description: format!(
            "synthetic decode steps calibrated on `{series}` (top-{top_k}, {} groups x {} steps, seed {}{})",
            opts.synth_groups,
            opts.synth_steps,
            opts.seed,
            if affinity.is_some() {
                ", cross-layer affinity"
            } else {
                ""
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The halves partition the steps by batch, in order; a split with nothing left is an error.
    #[test]
    fn halves_partition_the_batches() {
        let steps: Vec<Step> = (0..5)
            .flat_map(|g| (0..3).map(move |i| Step::new(g, i, vec![vec![g as u32]], 8)))
            .collect();
        let pick = |s: &str| {
            let mut v = steps.clone();
            s.parse::<Split>().unwrap().apply(&mut v).unwrap();
            v
        };
        let (first, second) = (pick("first-half"), pick("second-half"));
        assert!(first.iter().all(|s| s.group < 3) && second.iter().all(|s| s.group >= 3));
        assert_eq!([first, second].concat(), pick("all"));
        assert!(matches!("half".parse::<Split>(), Err(SourceError::UnknownSplit(_))));
        let mut one = steps[..3].to_vec();
        assert!(matches!(
            Split::SecondHalf.apply(&mut one),
            Err(SourceError::EmptySplit { groups: 1, .. })
        ));
    }

    #[test]
    fn detects_the_reference_file_names() {
        let cases = [
            ("top1_per_token.csv", Some(RoutingFormat::Llama4Top1)),
            ("derived_top6_per_token.csv", Some(RoutingFormat::FlameTopK)),
            ("moe_routes.jsonl", Some(RoutingFormat::VllmJsonl)),
            ("derived_expert_counts_long.csv", Some(RoutingFormat::ExpertCounts)),
            (
                "derived_crosslayer_cooccurrence_long.csv",
                Some(RoutingFormat::CoActivation),
            ),
            (
                "moe_all_layers_analysis_x_avg_dist.csv",
                Some(RoutingFormat::LayerFractions),
            ),
            ("trace.csv", None),
            ("raw_sample_abstract_algebra_0.json", None),
        ];
        for (name, want) in cases {
            assert_eq!(RoutingFormat::detect(name), want, "{name}");
        }
        for f in RoutingFormat::ALL {
            assert_eq!(f.label().parse::<RoutingFormat>().unwrap(), f);
        }
        assert!(matches!(
            "csv".parse::<RoutingFormat>(),
            Err(SourceError::UnknownFormat(_))
        ));
    }

    #[test]
    fn selections_give_top_k() {
        assert_eq!(top_k_of_selection("top1"), Some(1));
        assert_eq!(top_k_of_selection("topk(k=8)"), Some(8));
        assert_eq!(top_k_of_selection("topk"), None);
    }

    #[test]
    fn counts_synthesise_and_name_missing_series() {
        let csv = "model,hf_model_id,domain,selection,layer,expert,count\n\
                   m,h,d,topk(k=2),0,0,5\nm,h,d,topk(k=2),0,1,3\nm,h,d,topk(k=2),0,3,1\n\
                   m,h,d,topk(k=2),7,1,3\nm,h,d,topk(k=2),7,2,3\n";
        let mut o = SourceOptions::new(Phase::Decode, 8);
        o.synth_steps = 5;
        let r = load_steps(RoutingFormat::ExpertCounts, csv.as_bytes(), &o).unwrap();
        assert_eq!((r.num_experts, r.top_k, r.layer_ids.clone()), (4, 2, vec![0, 7]));
        assert_eq!(r.steps.len(), 20);
        assert_eq!(r.steps[0].routes[0].len(), 16);
        o.series = Some("m,d,top1".into());
        let e = load_steps(RoutingFormat::ExpertCounts, csv.as_bytes(), &o).unwrap_err();
        assert!(matches!(e, SourceError::NoSeries { .. }), "{e}");
        o.series = None;
        o.phase = Phase::Prefill;
        let e = load_steps(RoutingFormat::ExpertCounts, csv.as_bytes(), &o).unwrap_err();
        assert!(matches!(e, SourceError::PhaseUnsupported { .. }), "{e}");
    }

    #[test]
    fn coactivation_gives_marginals_and_affinity() {
        let csv = "model,domain,selection,layer_a,layer_b,expert_a,expert_b,count\n\
                   m,d,topk,0,7,0,1,4\nm,d,topk,0,7,1,1,2\nm,d,topk,0,7,1,0,2\n";
        let mut o = SourceOptions::new(Phase::Decode, 4);
        let e = load_steps(RoutingFormat::CoActivation, csv.as_bytes(), &o).unwrap_err();
        assert!(matches!(e, SourceError::TopKUnknown(_)), "{e}");
        o.top_k = Some(1);
        o.num_experts = Some(4);
        o.synth_steps = 3;
        let r = load_steps(RoutingFormat::CoActivation, csv.as_bytes(), &o).unwrap();
        assert_eq!((r.num_experts, r.layer_ids.clone()), (4, vec![0, 7]));
        let c = CoActivation::parse_long_csv(csv.as_bytes()).unwrap();
        let key = ("m".to_string(), "d".to_string(), "topk".to_string());
        let (_, loads, aff) = coactivation_shape(&c, &key, Some(4));
        assert_eq!(loads, vec![vec![4.0, 4.0, 0.0, 0.0], vec![2.0, 6.0, 0.0, 0.0]]);
        assert_eq!(aff[1][0], vec![0.0, 1.0, 0.0, 0.0]);
        assert_eq!(aff[1][3], vec![0.25; 4]);
    }

    #[test]
    fn per_token_csvs_need_the_expert_count() {
        let csv = "subject,query_id,phase,token_idx,L1\na,0,decode,1,1\n";
        let o = SourceOptions::new(Phase::Decode, 1);
        let e = load_steps(RoutingFormat::Llama4Top1, csv.as_bytes(), &o).unwrap_err();
        assert!(matches!(e, SourceError::ExpertsUnknown(_)), "{e}");
    }
}
