//! The leader's reconciler: every `TICK` it turns observed heartbeats into replicated worker
//! health, re-places the instances of dead workers, gives a newly registered model its initial
//! plan, and every `policy.rebalance_interval_ms` runs a scaling round. Followers idle.
//!
//! Every plan is committed with `expected_epoch` = the epoch it was computed from, so a plan
//! computed from stale state (a concurrent admin commit, a deposed leader) is rejected instead
//! of overwriting a newer one.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::node::{Node, NodeError};
use crate::placement::{
    balancedness, forecast_error, initial_plan, load_matrix, policy_plan, replace_lost_workers, round_decision,
    Placement, RoundDecision,
};
use crate::state::{ClusterState, PlanIntent, PlanOrigin, WorkerHealth};
use crate::types::{Command, CommandResponse};

/// How often the leader reconciles.
pub const TICK: Duration = Duration::from_millis(200);
/// A scaling round commits a new plan only if it improves balancedness by more than this.
pub const BALANCE_THRESHOLD: f64 = 0.05;
/// How the reason of a warm-up plan (`RoundDecision::WarmUp`) starts.
pub const WARM_UP_REASON: &str = "warm-up ahead of need";
const WRITE_WAIT: Duration = Duration::from_secs(1);

/// Runs until `stop` fires.
pub async fn run(node: Node, mut stop: oneshot::Receiver<()>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = interval.tick() => {
                if let Err(e) = tick(&node).await {
                    tracing::debug!(error = %e, "reconcile tick");
                }
            }
        }
    }
}

/// Workers as the leader sees them now.
struct Fleet {
    /// Active and heartbeating: where instances may go.
    live: Vec<u64>,
    /// Dead (silent past the timeout, or marked dead and still silent): instances leave them.
    lost: BTreeSet<u64>,
    /// Draining (asked to leave, still serving): instances leave them too, and they keep serving
    /// the old plan until engines have moved on.
    draining: BTreeSet<u64>,
}

fn fleet(node: &Node, state: &ClusterState, since: Instant, now: Instant) -> Fleet {
    let mut f = Fleet {
        live: Vec::new(),
        lost: BTreeSet::new(),
        draining: BTreeSet::new(),
    };
    node.with_liveness(|l| {
        for w in state.workers.values() {
            match l.health(w.spec.id, w.health, Some(since), now) {
                WorkerHealth::Active => f.live.push(w.spec.id),
                WorkerHealth::Dead => {
                    f.lost.insert(w.spec.id);
                }
                WorkerHealth::Draining => {
                    f.draining.insert(w.spec.id);
                }
            }
        }
    });
    f
}

async fn tick(node: &Node) -> Result<(), NodeError> {
    let Some(since) = node.leader_since() else {
        return Ok(());
    };
    let state = node.state_machine().state().await;
    let now = Instant::now();
    let fleet = fleet(node, &state, since, now);

    // Replicate what the heartbeats say, so every node (and the next leader) agrees.
    for w in state.workers.values() {
        let (cmd, to) = match w.health {
            WorkerHealth::Active if fleet.lost.contains(&w.spec.id) => {
                (Command::MarkWorkerDead { worker: w.spec.id }, WorkerHealth::Dead)
            }
            WorkerHealth::Dead if fleet.live.contains(&w.spec.id) => {
                (Command::MarkWorkerAlive { worker: w.spec.id }, WorkerHealth::Active)
            }
            _ => continue,
        };
        tracing::info!(worker = w.spec.id, to = to.label(), "worker health changes");
        metrics::counter!("moeless_worker_health_changes_total", "to" => to.label()).increment(1);
        node.write(cmd, WRITE_WAIT).await?;
    }

    // One plan per tick at most: the next tick starts from the new epoch. Instances leave dead
    // workers and draining ones alike.
    let current = state.current_epoch();
    let leaving: BTreeSet<u64> = fleet.lost.union(&fleet.draining).copied().collect();
    for model in state.models.values() {
        let intent = match state.latest_plan_of(&model.name) {
            Some(plan) => match replace_lost_workers(&plan.instances, &leaving, &fleet.live) {
                Ok(Some(instances)) => {
                    let held: BTreeSet<u64> = plan.instances.iter().map(|i| i.worker).collect();
                    let mut why = Vec::new();
                    for (set, what) in [(&fleet.lost, "lost"), (&fleet.draining, "draining")] {
                        let ids: Vec<String> = set.intersection(&held).map(u64::to_string).collect();
                        if !ids.is_empty() {
                            let noun = if ids.len() == 1 { "worker" } else { "workers" };
                            why.push(format!("{noun} {} {what}", ids.join(", ")));
                        }
                    }
                    PlanIntent {
                        model: model.name.clone(),
                        instances,
                        reason: why.join("; "),
                        origin: PlanOrigin::WorkerReplacement,
                    }
                }
                Ok(None) => {
                    // Until load drives a plan, the static spread follows workers that join:
                    // they start together, and the first tick may have seen only some of them
                    // (a scaling round needs reported load to move anything).
                    if plan.origin != PlanOrigin::InitialSpread {
                        continue;
                    }
                    let held: BTreeSet<u64> = plan.instances.iter().map(|i| i.worker).collect();
                    let Ok(instances) = initial_plan(model, &fleet.live) else {
                        continue;
                    };
                    let spread: BTreeSet<u64> = instances.iter().map(|i| i.worker).collect();
                    if spread.len() <= held.len() {
                        continue;
                    }
                    PlanIntent {
                        model: model.name.clone(),
                        instances,
                        reason: format!("initial static plan over {} workers (workers joined)", spread.len()),
                        origin: PlanOrigin::InitialSpread,
                    }
                }
                Err(e) => {
                    tracing::warn!(model = %model.name, error = %e, "cannot re-place the instances of dead workers");
                    continue;
                }
            },
            None if !fleet.live.is_empty() => match initial_plan(model, &fleet.live) {
                Ok(instances) => PlanIntent {
                    model: model.name.clone(),
                    instances,
                    reason: "initial static plan".into(),
                    origin: PlanOrigin::InitialSpread,
                },
                Err(_) => continue,
            },
            None => continue,
        };
        let epoch = commit(node, intent, current).await?;
        tracing::info!(model = %model.name, epoch, "reconciler committed a plan");
        return Ok(());
    }

    let interval = state.policy.rebalance_interval_ms;
    if interval > 0 {
        let due = node.scaling_round().await.elapsed() >= Duration::from_millis(interval);
        if due {
            let report = rebalance(node).await?;
            tracing::info!(epoch = ?report.epoch, "scaling round");
        }
    }
    Ok(())
}

async fn commit(node: &Node, intent: PlanIntent, expected_epoch: u64) -> Result<u64, NodeError> {
    let cmd = Command::CommitPlan {
        intent,
        expected_epoch: Some(expected_epoch),
    };
    match node.write(cmd, WRITE_WAIT).await? {
        (_, CommandResponse::PlanCommitted { epoch }) => {
            metrics::gauge!("moeless_plan_epoch").set(epoch as f64);
            Ok(epoch)
        }
        (_, other) => Err(NodeError::Raft(format!(
            "unexpected answer to a plan commit: {other:?}"
        ))),
    }
}

/// What a scaling round did for one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRound {
    pub model: String,
    /// The epoch committed for this model, if any.
    pub epoch: Option<u64>,
    pub balancedness_before: Option<f64>,
    pub balancedness_after: Option<f64>,
    /// How far the last round's forecast of this window (the loads it planned from: the window
    /// before) was from the loads that came: the mean over layers of the total-variation
    /// distance between the two expert-load distributions (0 exact, 1 disjoint). `None` on the
    /// first round with load, or when a window had none. Also the `moeless_predictor_error`
    /// gauge.
    pub predictor_error: Option<f64>,
    /// Why this outcome (the plan's reason, or why no plan was committed).
    pub reason: String,
}

/// What a scaling round did.
#[derive(Debug, Clone, Serialize)]
pub struct RebalanceReport {
    /// The latest epoch this round committed (`None`: no new plan).
    pub epoch: Option<u64>,
    pub placement: String,
    pub models: Vec<ModelRound>,
}

/// One scaling round on the leader: plans every model from the loads reported since the last
/// round under the policy's placement, and commits a plan where it improves balancedness by more
/// than `BALANCE_THRESHOLD`; under MoEless, a candidate that improves it by less is warmed up
/// ahead of need (its new instances committed as share-0 standbys, `RoundDecision::WarmUp`). A
/// follower answers `NotLeader`.
pub async fn rebalance(node: &Node) -> Result<RebalanceReport, NodeError> {
    let Some(since) = node.leader_since() else {
        return Err(node.leader_error());
    };
    let mut last_round = node.scaling_round().await;
    *last_round = Instant::now();
    let mut state = node.linearizable_state().await?;
    let (loads, previous) = node.take_recent_loads();
    let fleet = fleet(node, &state, since, Instant::now());
    let placement_name = state.policy.placement.clone();
    let mut report = RebalanceReport {
        epoch: None,
        placement: placement_name.clone(),
        models: Vec::new(),
    };
    let placement: Placement = match placement_name.parse() {
        Ok(p) => p,
        Err(e) => {
            for m in state.models.keys() {
                report.models.push(skipped(m, e.to_string()));
            }
            return Ok(report);
        }
    };
    let models: Vec<_> = state.models.values().cloned().collect();
    for model in models {
        let Some(current) = state.latest_plan_of(&model.name) else {
            report.models.push(skipped(&model.name, "no plan yet".into()));
            continue;
        };
        let matrix = match load_matrix(&model, &loads) {
            Ok(m) => m,
            Err(e) => {
                report.models.push(skipped(&model.name, e.to_string()));
                continue;
            }
        };
        let reported: u64 = loads
            .iter()
            .filter(|((l, e), _)| *l < model.num_layers && *e < model.num_experts)
            .map(|(_, t)| *t)
            .sum();
        if reported == 0 {
            report
                .models
                .push(skipped(&model.name, "no load reported since the last round".into()));
            continue;
        }
        let predictor_error = load_matrix(&model, &previous)
            .ok()
            .and_then(|forecast| forecast_error(&forecast, &matrix));
        if let Some(e) = predictor_error {
            metrics::gauge!("moeless_predictor_error", "model" => model.name.clone()).set(e);
        }
        let candidate = match policy_plan(placement, &model, &loads, &fleet.live) {
            Ok(c) => c,
            Err(e) => {
                report.models.push(skipped(&model.name, e.to_string()));
                continue;
            }
        };
        let before = balancedness(&current.instances, &matrix, &fleet.live);
        let after = balancedness(&candidate, &matrix, &fleet.live);
        let mut round = ModelRound {
            model: model.name.clone(),
            epoch: None,
            balancedness_before: Some(before),
            balancedness_after: Some(after),
            predictor_error,
            reason: String::new(),
        };
        let instances = match round_decision(
            placement,
            &current.instances,
            &candidate,
            before,
            after,
            BALANCE_THRESHOLD,
        ) {
            RoundDecision::Commit => {
                round.reason = format!("{placement_name} rebalance: balancedness {before:.3} -> {after:.3}");
                candidate
            }
            RoundDecision::WarmUp(instances) => {
                let n = instances.iter().filter(|i| i.share <= 0.0).count();
                round.reason = format!(
                    "{WARM_UP_REASON}: {n} standby instance(s) of the {placement_name} candidate \
                     (balancedness {before:.3} -> {after:.3}, not yet above {BALANCE_THRESHOLD})"
                );
                instances
            }
            RoundDecision::Keep => {
                round.reason =
                    format!("balancedness {before:.3} -> {after:.3} is not an improvement above {BALANCE_THRESHOLD}");
                report.models.push(round);
                continue;
            }
        };
        let intent = PlanIntent {
            model: model.name.clone(),
            instances,
            reason: round.reason.clone(),
            origin: PlanOrigin::Scaling,
        };
        let epoch = commit(node, intent, state.current_epoch()).await?;
        round.epoch = Some(epoch);
        report.epoch = Some(epoch);
        report.models.push(round);
        state = node.linearizable_state().await?;
    }
    Ok(report)
}

fn skipped(model: &str, reason: String) -> ModelRound {
    ModelRound {
        model: model.to_string(),
        epoch: None,
        balancedness_before: None,
        balancedness_after: None,
        predictor_error: None,
        reason,
    }
}
