//! Placement decisions as pure functions: the initial plan of a model, moving the instances of
//! lost workers, and plans from recent loads under the policy's placement ("static", "eplb",
//! "moeless") through `shared`'s policies. This is the one place where `shared`'s plans (GPU
//! indices) and control-plane instances (worker ids) are converted into each other.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use shared::eplb::rebalance_global;
use shared::plan::{Instance, LayerPlan, LoadMatrix, Plan, PlanError};
use shared::replay::{moeless_plan, ReplayConfig};

use crate::state::{ExpertInstance, ModelSpec};

/// Tokens per (layer, expert), as kept by the load board.
pub type ExpertLoads = BTreeMap<(u32, u32), u64>;

/// Why no plan could be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("no live active worker to place instances on")]
    NoLiveWorkers,
    #[error("unknown placement policy {0:?} (static, eplb, moeless)")]
    UnknownPolicy(String),
    #[error("planning failed: {0}")]
    Plan(#[from] PlanError),
}

/// The placement policies the scaling loop can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Experts round-robin over the workers, one instance each.
    Static,
    /// DeepSeek's EPLB (global policy) with one redundant slot per worker.
    Eplb,
    /// MoEless: replicas of the predicted-hot experts, water-filled shares.
    Moeless,
}

impl FromStr for Placement {
    type Err = PlacementError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "static" => Ok(Placement::Static),
            "eplb" => Ok(Placement::Eplb),
            "moeless" => Ok(Placement::Moeless),
            other => Err(PlacementError::UnknownPolicy(other.to_string())),
        }
    }
}

/// One instance of every expert, spread round-robin over `workers` (share 1.0).
pub fn initial_plan(model: &ModelSpec, workers: &[u64]) -> Result<Vec<ExpertInstance>, PlacementError> {
    if workers.is_empty() {
        return Err(PlacementError::NoLiveWorkers);
    }
    let (layers, experts) = (model.num_layers as usize, model.num_experts as usize);
    let mut out = Vec::with_capacity(layers * experts);
    for layer in 0..layers {
        for expert in 0..experts {
            out.push(ExpertInstance {
                layer: layer as u32,
                expert: expert as u32,
                worker: workers[(layer * experts + expert) % workers.len()],
                gpu: 0,
                share: 1.0,
            });
        }
    }
    Ok(out)
}

/// Moves the instances on `lost` workers to `live` ones, keeping each expert's total share: an
/// expert that keeps other instances gives the moved share to them (in proportion to what they
/// hold, they are already warm); an expert left without any gets a new instance on the live
/// worker with the least planned load (sum of shares, lowest id on ties).
/// Returns `None` when no instance sits on a lost worker.
pub fn replace_lost_workers(
    instances: &[ExpertInstance],
    lost: &BTreeSet<u64>,
    live: &[u64],
) -> Result<Option<Vec<ExpertInstance>>, PlacementError> {
    if !instances.iter().any(|i| lost.contains(&i.worker)) {
        return Ok(None);
    }
    if live.is_empty() {
        return Err(PlacementError::NoLiveWorkers);
    }
    let mut planned: BTreeMap<u64, f64> = live.iter().map(|w| (*w, 0.0)).collect();
    let mut by_expert: BTreeMap<(u32, u32), (Vec<ExpertInstance>, f64)> = BTreeMap::new();
    for i in instances {
        let entry = by_expert.entry((i.layer, i.expert)).or_default();
        if lost.contains(&i.worker) {
            entry.1 += i.share;
        } else {
            entry.0.push(i.clone());
            if let Some(load) = planned.get_mut(&i.worker) {
                *load += i.share;
            }
        }
    }
    let mut out = Vec::with_capacity(instances.len());
    for ((layer, expert), (mut kept, moved)) in by_expert {
        if kept.is_empty() {
            let target = least_loaded(&planned).ok_or(PlacementError::NoLiveWorkers)?;
            if let Some(load) = planned.get_mut(&target) {
                *load += moved;
            }
            kept.push(ExpertInstance {
                layer,
                expert,
                worker: target,
                gpu: 0,
                share: moved,
            });
        } else if moved > 0.0 {
            let held: f64 = kept.iter().map(|i| i.share).sum();
            let n = kept.len() as f64;
            for i in &mut kept {
                i.share += if held > 0.0 { moved * i.share / held } else { moved / n };
            }
        }
        out.extend(kept);
    }
    Ok(Some(out))
}

fn least_loaded(planned: &BTreeMap<u64, f64>) -> Option<u64> {
    planned
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))
        .map(|(w, _)| *w)
}

/// A plan for `model` from recent per-expert `loads` under `placement`, over `workers`.
pub fn policy_plan(
    placement: Placement,
    model: &ModelSpec,
    loads: &ExpertLoads,
    workers: &[u64],
) -> Result<Vec<ExpertInstance>, PlacementError> {
    if workers.is_empty() {
        return Err(PlacementError::NoLiveWorkers);
    }
    let matrix = load_matrix(model, loads)?;
    let experts = model.num_experts as usize;
    let plan = match placement {
        Placement::Static => return initial_plan(model, workers),
        Placement::Eplb => {
            let gpus = workers.len();
            let slots = experts.div_ceil(gpus) + 1;
            let mut plan = Plan::default();
            for l in 0..matrix.num_layers() {
                plan.layers
                    .push(rebalance_global(matrix.layer(l), gpus * slots, gpus)?.to_layer_plan());
            }
            plan
        }
        Placement::Moeless => {
            // `shared`'s MoEless plan starts from static EP, which needs the experts to divide
            // evenly over the GPUs: use the most workers for which they do.
            let gpus = (1..=workers.len())
                .rev()
                .find(|g| experts.is_multiple_of(*g))
                .unwrap_or(1);
            moeless_plan(&matrix, &ReplayConfig::new(gpus, experts / gpus + 1))?
        }
    };
    Ok(instances_from_plan(&plan, workers))
}

/// The error of `forecast` against `actual` (same shape): the mean over layers with load in
/// both of the total-variation distance between their expert-load distributions, each
/// normalised to sum 1 (0: the same proportions, 1: disjoint experts). `None` if no layer has
/// load in both.
pub fn forecast_error(forecast: &LoadMatrix, actual: &LoadMatrix) -> Option<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for l in 0..forecast.num_layers().min(actual.num_layers()) {
        let (f, a) = (forecast.layer(l), actual.layer(l));
        let (fs, as_) = (f.iter().sum::<f64>(), a.iter().sum::<f64>());
        if fs > 0.0 && as_ > 0.0 {
            sum += f.iter().zip(a).map(|(x, y)| (x / fs - y / as_).abs()).sum::<f64>() / 2.0;
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// `loads` as a validated layer x expert matrix of the model's shape (missing entries are 0,
/// entries outside the shape are ignored).
pub fn load_matrix(model: &ModelSpec, loads: &ExpertLoads) -> Result<LoadMatrix, PlacementError> {
    let rows = (0..model.num_layers)
        .map(|l| {
            (0..model.num_experts)
                .map(|e| loads.get(&(l, e)).copied().unwrap_or(0) as f64)
                .collect()
        })
        .collect();
    Ok(LoadMatrix::new(rows)?)
}

/// `shared`'s plan (layer `l` is decoder layer `l`, GPU `g` is `workers[g]`) as instances:
/// replicas of one expert on one worker are merged and every expert's shares are normalised to
/// sum to one.
pub fn instances_from_plan(plan: &Plan, workers: &[u64]) -> Vec<ExpertInstance> {
    let mut merged: BTreeMap<(u32, u32, u64), f64> = BTreeMap::new();
    for (layer, lp) in plan.layers.iter().enumerate() {
        for i in &lp.instances {
            if let Some(worker) = workers.get(i.gpu as usize) {
                *merged.entry((layer as u32, i.expert, *worker)).or_default() += i.share;
            }
        }
    }
    let mut sums: BTreeMap<(u32, u32), (f64, usize)> = BTreeMap::new();
    for ((layer, expert, _), share) in &merged {
        let s = sums.entry((*layer, *expert)).or_default();
        s.0 += share;
        s.1 += 1;
    }
    merged
        .into_iter()
        .map(|((layer, expert, worker), share)| {
            let (sum, n) = sums.get(&(layer, expert)).copied().unwrap_or((1.0, 1));
            ExpertInstance {
                layer,
                expert,
                worker,
                gpu: 0,
                share: if sum > 0.0 { share / sum } else { 1.0 / n as f64 },
            }
        })
        .collect()
}

/// The instances of one `layer` as `shared`'s layer plan, GPU `g` being `workers[g]`; `None`
/// when an instance sits on a worker not in `workers`.
pub fn layer_plan_of(instances: &[ExpertInstance], layer: u32, workers: &[u64]) -> Option<LayerPlan> {
    let index: BTreeMap<u64, u32> = workers.iter().enumerate().map(|(g, w)| (*w, g as u32)).collect();
    let mut lp = LayerPlan::default();
    for i in instances.iter().filter(|i| i.layer == layer) {
        lp.instances.push(Instance {
            expert: i.expert,
            gpu: *index.get(&i.worker)?,
            share: i.share,
        });
    }
    Some(lp)
}

/// Mean over layers with load of (mean worker load / max worker load), the workers being
/// `workers` and any worker the plan uses; 1.0 is perfectly balanced.
pub fn balancedness(instances: &[ExpertInstance], matrix: &LoadMatrix, workers: &[u64]) -> f64 {
    let all: BTreeSet<u64> = workers
        .iter()
        .copied()
        .chain(instances.iter().map(|i| i.worker))
        .collect();
    let all: Vec<u64> = all.into_iter().collect();
    let mut total = 0.0;
    let mut layers = 0usize;
    for l in 0..matrix.num_layers() {
        let Some(lp) = layer_plan_of(instances, l as u32, &all) else {
            continue;
        };
        let per_worker = lp.gpu_loads(matrix.layer(l), all.len());
        let max = per_worker.iter().copied().fold(0.0, f64::max);
        if max > 0.0 {
            total += per_worker.iter().sum::<f64>() / all.len() as f64 / max;
            layers += 1;
        }
    }
    if layers == 0 {
        1.0
    } else {
        total / layers as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: u32, experts: u32) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            architecture: "mixtral".into(),
            num_layers: layers,
            num_experts: experts,
            top_k: 2,
            weights: "/w".into(),
        }
    }

    fn covered(instances: &[ExpertInstance], m: &ModelSpec) {
        let mut sums: BTreeMap<(u32, u32), f64> = BTreeMap::new();
        for i in instances {
            *sums.entry((i.layer, i.expert)).or_default() += i.share;
        }
        assert_eq!(
            sums.len(),
            (m.num_layers * m.num_experts) as usize,
            "every expert placed"
        );
        for (k, s) in sums {
            assert!((s - 1.0).abs() < 1e-9, "{k:?} sums to {s}");
        }
    }

    #[test]
    fn lost_worker_instances_move_and_shares_are_kept() {
        let m = model(2, 4);
        let mut plan = initial_plan(&m, &[1, 2, 3]).expect("plan");
        // Expert (0, 0) also has a replica on worker 2: it keeps serving with the whole share.
        plan.iter_mut()
            .find(|i| i.layer == 0 && i.expert == 0)
            .expect("e0")
            .share = 0.5;
        plan.push(ExpertInstance {
            layer: 0,
            expert: 0,
            worker: 2,
            gpu: 0,
            share: 0.5,
        });
        let lost = BTreeSet::from([1]);
        let moved = replace_lost_workers(&plan, &lost, &[2, 3])
            .expect("ok")
            .expect("changed");
        covered(&moved, &m);
        assert!(moved.iter().all(|i| i.worker != 1));
        let e0: Vec<_> = moved.iter().filter(|i| i.layer == 0 && i.expert == 0).collect();
        assert_eq!(e0.len(), 1);
        assert_eq!(e0[0].worker, 2);
        assert_eq!(replace_lost_workers(&moved, &lost, &[2, 3]), Ok(None));
        assert_eq!(
            replace_lost_workers(&plan, &lost, &[]),
            Err(PlacementError::NoLiveWorkers)
        );
    }

    #[test]
    fn forecast_error_is_the_mean_total_variation_over_layers_with_load() {
        let m = model(3, 4);
        let forecast: ExpertLoads = [((0, 0), 10), ((0, 1), 10), ((1, 2), 5), ((2, 3), 7)].into();
        // Layer 0: half the load moved from expert 1 to expert 2 (TV 0.5); layer 1: same
        // proportions at 4x the load (TV 0); layer 2: no load came (not counted).
        let actual: ExpertLoads = [((0, 0), 20), ((0, 2), 20), ((1, 2), 20)].into();
        let (f, a) = (load_matrix(&m, &forecast).unwrap(), load_matrix(&m, &actual).unwrap());
        let e = forecast_error(&f, &a).expect("two layers with load");
        assert!((e - 0.25).abs() < 1e-12, "{e}");
        assert_eq!(forecast_error(&f, &f), Some(0.0));
        let disjoint: ExpertLoads = [((0, 3), 1)].into();
        assert_eq!(forecast_error(&f, &load_matrix(&m, &disjoint).unwrap()), Some(1.0));
        assert_eq!(forecast_error(&f, &load_matrix(&m, &ExpertLoads::new()).unwrap()), None);
    }

    #[test]
    fn policies_cover_every_expert_with_shares_summing_to_one() {
        let m = model(2, 4);
        let mut loads = ExpertLoads::new();
        loads.insert((0, 0), 10_000);
        loads.insert((1, 3), 50);
        for p in [Placement::Static, Placement::Eplb, Placement::Moeless] {
            for workers in [vec![5], vec![5, 6], vec![5, 6, 7]] {
                let plan = policy_plan(p, &m, &loads, &workers).expect("plan");
                covered(&plan, &m);
                assert!(plan.iter().all(|i| workers.contains(&i.worker)));
            }
        }
        assert!("oracle".parse::<Placement>().is_err());
    }

    #[test]
    fn moeless_balances_a_skewed_load_better_than_static() {
        let m = model(1, 6);
        let loads: ExpertLoads = (0..6).map(|e| ((0, e), if e == 0 { 6000 } else { 100 })).collect();
        let workers = [1, 2, 3];
        let matrix = load_matrix(&m, &loads).expect("matrix");
        let before = balancedness(&initial_plan(&m, &workers).expect("static"), &matrix, &workers);
        let plan = policy_plan(Placement::Moeless, &m, &loads, &workers).expect("moeless");
        let after = balancedness(&plan, &matrix, &workers);
        assert!(after > before + 0.2, "balancedness {before} -> {after}");
    }
}
