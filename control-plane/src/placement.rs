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

/// What a scaling round does with a candidate plan.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundDecision {
    /// Commit the candidate: it improves balancedness by more than the threshold.
    Commit,
    /// Warm-up ahead of need: commit the current plan's serving instances plus, as standbys
    /// (share 0), the candidate's instances it does not hold yet. The candidate improves
    /// balancedness by more than half the threshold, not yet by all of it (a gain building
    /// up; smaller ones are noise not worth the memory): if the trend goes on, the round that
    /// commits it finds those instances warm, and the engines (which switch to a plan once
    /// every worker named in it has loaded its instances) switch without waiting for cold
    /// starts. Standbys get no tokens (every token split gives a share-0 instance nothing
    /// while another share is positive); dropped later, they idle out under the workers'
    /// keep-alive.
    WarmUp(Vec<ExpertInstance>),
    /// Keep the current plan.
    Keep,
}

/// The round's decision for `placement` (MoEless warms up ahead of need; static and EPLB,
/// like their originals, only rebalance), balancedness `before` under `current` and `after`
/// under `candidate` on the same loads, and the threshold a commit must beat.
pub fn round_decision(
    placement: Placement,
    current: &[ExpertInstance],
    candidate: &[ExpertInstance],
    before: f64,
    after: f64,
    threshold: f64,
) -> RoundDecision {
    if after - before > threshold {
        return RoundDecision::Commit;
    }
    if placement != Placement::Moeless || after - before <= threshold / 2.0 {
        return RoundDecision::Keep;
    }
    with_standbys(current, candidate).map_or(RoundDecision::Keep, RoundDecision::WarmUp)
}

/// `current`'s serving instances (share > 0) and, with share 0, each instance of `candidate`
/// on a worker where `current` does not serve that expert (one per (layer, expert, worker)).
/// `None` when that adds no standby or `current` already holds exactly these standbys.
pub fn with_standbys(current: &[ExpertInstance], candidate: &[ExpertInstance]) -> Option<Vec<ExpertInstance>> {
    let key = |i: &ExpertInstance| (i.layer, i.expert, i.worker);
    let serving: Vec<ExpertInstance> = current.iter().filter(|i| i.share > 0.0).cloned().collect();
    let held: BTreeSet<_> = serving.iter().map(key).collect();
    let mut standby: BTreeMap<(u32, u32, u64), ExpertInstance> = BTreeMap::new();
    for i in candidate.iter().filter(|i| !held.contains(&key(i))) {
        standby.entry(key(i)).or_insert_with(|| ExpertInstance {
            share: 0.0,
            ..i.clone()
        });
    }
    let had: BTreeSet<_> = current.iter().filter(|i| i.share <= 0.0).map(key).collect();
    if standby.is_empty() || standby.keys().copied().collect::<BTreeSet<_>>() == had {
        return None;
    }
    Some(serving.into_iter().chain(standby.into_values()).collect())
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

    fn inst(layer: u32, expert: u32, worker: u64, share: f64) -> ExpertInstance {
        ExpertInstance {
            layer,
            expert,
            worker,
            gpu: 0,
            share,
        }
    }

    #[test]
    fn a_candidate_under_the_threshold_is_warmed_up_as_standbys() {
        use RoundDecision::{Commit, Keep, WarmUp};
        let current = vec![inst(0, 0, 1, 1.0), inst(0, 1, 2, 1.0)];
        // The candidate replicates expert 0 onto worker 2.
        let candidate = vec![inst(0, 0, 1, 0.5), inst(0, 0, 2, 0.5), inst(0, 1, 2, 1.0)];
        let m = Placement::Moeless;
        assert_eq!(round_decision(m, &current, &candidate, 0.5, 0.6, 0.05), Commit);
        let WarmUp(warm) = round_decision(m, &current, &candidate, 0.5, 0.53, 0.05) else {
            panic!("an improvement under the threshold warms the candidate up");
        };
        // Serving shares unchanged, the new instance as a share-0 standby: still a valid plan.
        assert_eq!(warm, vec![inst(0, 0, 1, 1.0), inst(0, 1, 2, 1.0), inst(0, 0, 2, 0.0)]);
        covered(&warm, &model(1, 2));
        // Static and EPLB only rebalance; no improvement, nothing to warm.
        for p in [Placement::Static, Placement::Eplb] {
            assert_eq!(round_decision(p, &current, &candidate, 0.5, 0.53, 0.05), Keep);
        }
        assert_eq!(round_decision(m, &current, &candidate, 0.5, 0.5, 0.05), Keep);
        assert_eq!(
            round_decision(m, &current, &candidate, 0.5, 0.52, 0.05),
            Keep,
            "under half the threshold"
        );
        assert_eq!(round_decision(m, &current, &current, 0.5, 0.53, 0.05), Keep);
        // From the warmed plan the same candidate adds nothing: no new epoch per round.
        assert_eq!(round_decision(m, &warm, &candidate, 0.5, 0.53, 0.05), Keep);
        // Another candidate replaces the standbys.
        let other = vec![inst(0, 0, 1, 1.0), inst(0, 1, 2, 0.5), inst(0, 1, 1, 0.5)];
        let WarmUp(again) = round_decision(m, &warm, &other, 0.5, 0.53, 0.05) else {
            panic!("new standbys");
        };
        assert_eq!(again, vec![inst(0, 0, 1, 1.0), inst(0, 1, 2, 1.0), inst(0, 1, 1, 0.0)]);
        // Committing the candidate from the warmed plan needs no instance that is not warm.
        let warm_keys: BTreeSet<_> = warm.iter().map(|i| (i.layer, i.expert, i.worker)).collect();
        assert!(candidate
            .iter()
            .all(|i| warm_keys.contains(&(i.layer, i.expert, i.worker))));
    }

    /// A rising expert under MoEless: the round before the one that replicates it warms the
    /// replica up (the planner's own plans and balancedness, not hand-made ones).
    #[test]
    fn a_rising_expert_is_warmed_before_it_is_replicated() {
        let m = model(2, 6);
        let workers = [1, 2, 3];
        let loads_of = |h0: u64, h1: u64| -> ExpertLoads {
            (0..2u32)
                .flat_map(|l| {
                    (0..6u32).map(move |e| {
                        (
                            (l, e),
                            if e == 0 {
                                h0
                            } else if e == 1 {
                                h1
                            } else {
                                1000
                            },
                        )
                    })
                })
                .collect()
        };
        let decide = |current: &[ExpertInstance], loads: &ExpertLoads| {
            let matrix = load_matrix(&m, loads).unwrap();
            let cand = policy_plan(Placement::Moeless, &m, loads, &workers).expect("candidate");
            let (b, a) = (
                balancedness(current, &matrix, &workers),
                balancedness(&cand, &matrix, &workers),
            );
            (round_decision(Placement::Moeless, current, &cand, b, a, 0.05), cand)
        };
        let keys = |p: &[ExpertInstance]| -> BTreeSet<(u32, u32, u64)> {
            p.iter().map(|i| (i.layer, i.expert, i.worker)).collect()
        };
        let start = policy_plan(Placement::Moeless, &m, &loads_of(2000, 1000), &workers).expect("plan");
        // Expert 1 starts rising: replicating it would help, but not yet by the threshold.
        let (d, _) = decide(&start, &loads_of(2000, 1500));
        let RoundDecision::WarmUp(warm) = d else {
            panic!("expected a warm-up, got {d:?}");
        };
        covered(&warm, &m);
        assert_eq!(warm.iter().filter(|i| i.share == 0.0).count(), 2, "{warm:?}");
        // It goes on rising: the round that replicates it finds every new instance warm.
        // (From scratch the planner puts the replica elsewhere once expert 1 passes ~2,200:
        // warming helps while its placement holds.)
        let (d, cand) = decide(&warm, &loads_of(2000, 2000));
        assert_eq!(d, RoundDecision::Commit);
        let new: Vec<_> = keys(&cand).difference(&keys(&start)).copied().collect();
        assert!(!new.is_empty(), "the replica is new to the first plan");
        assert!(
            keys(&cand).is_subset(&keys(&warm)),
            "cold: {:?}",
            keys(&cand).difference(&keys(&warm)).collect::<Vec<_>>()
        );
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
