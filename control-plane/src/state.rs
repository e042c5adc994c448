//! The replicated state: workers, models, placement plans with epochs, predictor state, policy,
//! decision log and cost ledger. Pure and deterministic: `apply` is a function of the state and
//! the command, so every replica that applies the same log holds the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{Command, CommandResponse};

/// How many decisions the log keeps; older ones are dropped (the plans themselves stay).
pub const DECISION_LOG_LIMIT: usize = 1000;
/// How many idempotency keys the state machine remembers (oldest forgotten first). A retry
/// arrives within seconds; this many writes take far longer on any real control plane.
pub const REQUEST_KEY_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub index: u32,
    pub kind: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: u64,
    pub address: String,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerHealth {
    Active,
    Draining,
    /// No heartbeat reached the leader within the worker timeout; set by the leader's liveness
    /// loop so that every replica agrees. A heartbeat or a new registration makes it Active again.
    Dead,
}

impl WorkerHealth {
    /// The label used by the APIs and metrics ("active", "draining", "dead").
    pub fn label(self) -> &'static str {
        match self {
            WorkerHealth::Active => "active",
            WorkerHealth::Draining => "draining",
            WorkerHealth::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    #[serde(flatten)]
    pub spec: WorkerSpec,
    pub health: WorkerHealth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    pub architecture: String,
    pub num_layers: u32,
    pub num_experts: u32,
    pub top_k: u32,
    /// Where workers fetch expert weights from (path or URL).
    pub weights: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertInstance {
    pub layer: u32,
    pub expert: u32,
    pub worker: u64,
    pub gpu: u32,
    pub share: f64,
}

/// Who decided a plan. The reconciler branches on it (the reason is prose for people): only its
/// own static spread grows to workers that join, an operator's plan is never replaced by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanOrigin {
    /// Committed through the admin API or a tool; also what plans stored before origins
    /// existed read as.
    #[default]
    Operator,
    /// The reconciler's static spread, before any load-driven plan.
    InitialSpread,
    /// The reconciler moved instances off lost or draining workers.
    WorkerReplacement,
    /// A scaling round re-planned from reported load.
    Scaling,
}

impl PlanOrigin {
    pub fn label(self) -> &'static str {
        match self {
            PlanOrigin::Operator => "operator",
            PlanOrigin::InitialSpread => "initial_spread",
            PlanOrigin::WorkerReplacement => "worker_replacement",
            PlanOrigin::Scaling => "scaling",
        }
    }
}

/// A plan as proposed, before the state machine gives it an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanIntent {
    pub model: String,
    pub instances: Vec<ExpertInstance>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub origin: PlanOrigin,
}

/// A committed plan. Epochs start at 1 and increase by one per committed plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementPlan {
    pub epoch: u64,
    pub model: String,
    pub instances: Vec<ExpertInstance>,
    pub reason: String,
    #[serde(default)]
    pub origin: PlanOrigin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Placement policy: "static", "eplb" or "moeless".
    pub placement: String,
    /// Load predictor name, as in `shared::predict`.
    pub predictor: String,
    /// How often the leader's scaling loop re-plans from recent loads; 0 never does (the default,
    /// so that hand-committed plans are left alone unless asked).
    pub rebalance_interval_ms: u64,
    pub keep_alive_ms: u64,
    pub max_replicas_per_expert: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            placement: "moeless".into(),
            predictor: "ema".into(),
            rebalance_interval_ms: 0,
            keep_alive_ms: 60_000,
            max_replicas_per_expert: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorUpdate {
    pub name: String,
    pub parameters: serde_json::Value,
    #[serde(default)]
    pub statistics: serde_json::Value,
}

/// Versioned predictor parameters and statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorState {
    pub version: u64,
    pub name: String,
    pub parameters: serde_json::Value,
    pub statistics: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub log_index: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostEntry {
    pub window_end_ms: u64,
    pub gpu_seconds: f64,
    pub cold_starts: u64,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub workers: BTreeMap<u64, WorkerRecord>,
    pub models: BTreeMap<String, ModelSpec>,
    /// Every committed plan by epoch (history included).
    pub plans: BTreeMap<u64, PlacementPlan>,
    pub policy: PolicyConfig,
    pub predictor: Option<PredictorState>,
    pub decisions: Vec<Decision>,
    pub cost: Vec<CostEntry>,
    /// Answers of the last keyed commands (see `Command::Keyed`), for at-most-once retries.
    #[serde(default)]
    pub requests: RequestLog,
}

/// The answers of the most recent keyed commands, in the order they were applied.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RequestLog {
    answers: BTreeMap<String, KeyedAnswer>,
    order: std::collections::VecDeque<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyedAnswer {
    digest: u64,
    log_index: u64,
    response: CommandResponse,
}

impl RequestLog {
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn remember(&mut self, key: String, answer: KeyedAnswer) {
        self.order.push_back(key.clone());
        self.answers.insert(key, answer);
        while self.order.len() > REQUEST_KEY_LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

/// What every model write requires.
fn check_model(m: &ModelSpec) -> Result<(), String> {
    if m.name.is_empty() || m.num_layers == 0 || m.num_experts == 0 || m.top_k == 0 {
        return Err("model needs a name and non-zero layers, experts and top_k".into());
    }
    if m.top_k > m.num_experts {
        return Err(format!("top_k {} exceeds num_experts {}", m.top_k, m.num_experts));
    }
    Ok(())
}

impl ClusterState {
    pub fn current_epoch(&self) -> u64 {
        self.plans.keys().next_back().copied().unwrap_or(0)
    }

    pub fn latest_plan(&self) -> Option<&PlacementPlan> {
        self.plans.values().next_back()
    }

    /// The latest committed plan of `model`, if any.
    pub fn latest_plan_of(&self, model: &str) -> Option<&PlacementPlan> {
        self.plans.values().rev().find(|p| p.model == model)
    }

    /// Applies one committed command at `log_index`.
    pub fn apply(&mut self, log_index: u64, cmd: Command) -> CommandResponse {
        let Command::Keyed { key, digest, command } = cmd else {
            return self.apply_once(log_index, cmd);
        };
        if let Some(seen) = self.requests.answers.get(&key) {
            return if seen.digest == digest {
                seen.response.clone()
            } else {
                CommandResponse::Rejected {
                    reason: format!(
                        "idempotency key {key:?} was used for a different command (applied at log index {})",
                        seen.log_index
                    ),
                }
            };
        }
        let response = self.apply_once(log_index, *command);
        let answer = KeyedAnswer {
            digest,
            log_index,
            response: response.clone(),
        };
        self.requests.remember(key, answer);
        response
    }

    fn apply_once(&mut self, log_index: u64, cmd: Command) -> CommandResponse {
        let what = cmd.to_string();
        let resp = self.apply_inner(cmd);
        let what = match &resp {
            CommandResponse::Rejected { reason } => format!("{what} rejected: {reason}"),
            CommandResponse::PlanCommitted { epoch } => format!("{what} -> epoch {epoch}"),
            _ => what,
        };
        self.decisions.push(Decision { log_index, what });
        if self.decisions.len() > DECISION_LOG_LIMIT {
            let excess = self.decisions.len() - DECISION_LOG_LIMIT;
            self.decisions.drain(..excess);
        }
        resp
    }

    fn apply_inner(&mut self, cmd: Command) -> CommandResponse {
        let reject = |reason: String| CommandResponse::Rejected { reason };
        match cmd {
            Command::RegisterWorker(spec) => {
                if spec.address.is_empty() {
                    return reject("worker address is empty".into());
                }
                self.workers.insert(
                    spec.id,
                    WorkerRecord {
                        spec,
                        health: WorkerHealth::Active,
                    },
                );
                CommandResponse::Applied
            }
            Command::DrainWorker { worker } => match self.workers.get_mut(&worker) {
                Some(w) => {
                    w.health = WorkerHealth::Draining;
                    CommandResponse::Applied
                }
                None => reject(format!("unknown worker {worker}")),
            },
            Command::MarkWorkerDead { worker } => match self.workers.get_mut(&worker) {
                Some(w) => {
                    w.health = WorkerHealth::Dead;
                    CommandResponse::Applied
                }
                None => reject(format!("unknown worker {worker}")),
            },
            Command::MarkWorkerAlive { worker } => match self.workers.get_mut(&worker) {
                Some(w) => {
                    // Only a dead worker comes back; a draining one stays draining.
                    if w.health == WorkerHealth::Dead {
                        w.health = WorkerHealth::Active;
                    }
                    CommandResponse::Applied
                }
                None => reject(format!("unknown worker {worker}")),
            },
            Command::PutModel(m) => {
                if let Err(reason) = check_model(&m) {
                    return reject(reason);
                }
                self.models.insert(m.name.clone(), m);
                CommandResponse::Applied
            }
            Command::RegisterModel(m) => {
                if let Err(reason) = check_model(&m) {
                    return reject(reason);
                }
                let created = match self.models.get(&m.name) {
                    Some(existing) if *existing == m => false,
                    Some(e)
                        if (&e.architecture, e.num_layers, e.num_experts, e.top_k)
                            != (&m.architecture, m.num_layers, m.num_experts, m.top_k) =>
                    {
                        return reject(format!(
                            "model {:?} is registered with another shape ({} layers x {} experts, top-{} {}); \
                             serve it under another name",
                            m.name, e.num_layers, e.num_experts, e.top_k, e.architecture
                        ));
                    }
                    // New, or the same shape with a new weights path.
                    _ => true,
                };
                if created {
                    self.models.insert(m.name.clone(), m);
                }
                CommandResponse::ModelRegistered { created }
            }
            Command::CommitPlan { intent, expected_epoch } => {
                let current = self.current_epoch();
                if let Some(expected) = expected_epoch {
                    if expected != current {
                        return reject(format!("plan based on epoch {expected}, current epoch is {current}"));
                    }
                }
                if let Err(reason) = self.check_plan(&intent) {
                    return reject(reason);
                }
                let epoch = current + 1;
                let plan = PlacementPlan {
                    epoch,
                    model: intent.model,
                    instances: intent.instances,
                    reason: intent.reason,
                    origin: intent.origin,
                };
                self.plans.insert(epoch, plan);
                CommandResponse::PlanCommitted { epoch }
            }
            Command::SetPolicy(p) => {
                if p.placement.is_empty() || p.predictor.is_empty() || p.max_replicas_per_expert == 0 {
                    return reject("policy needs a placement, a predictor and max_replicas_per_expert >= 1".into());
                }
                self.policy = p;
                CommandResponse::Applied
            }
            Command::UpdatePredictor(u) => {
                let version = self.predictor.as_ref().map_or(1, |p| p.version + 1);
                self.predictor = Some(PredictorState {
                    version,
                    name: u.name,
                    parameters: u.parameters,
                    statistics: u.statistics,
                });
                CommandResponse::PredictorVersion { version }
            }
            Command::RecordCost {
                window_end_ms,
                gpu_seconds,
                cold_starts,
                note,
            } => {
                if !gpu_seconds.is_finite() || gpu_seconds < 0.0 {
                    return reject(format!("gpu_seconds must be finite and >= 0, got {gpu_seconds}"));
                }
                self.cost.push(CostEntry {
                    window_end_ms,
                    gpu_seconds,
                    cold_starts,
                    note,
                });
                CommandResponse::Applied
            }
            // `apply` unwraps one level; a second one is refused there.
            Command::Keyed { .. } => reject("a keyed command may not hold another keyed command".into()),
        }
    }

    fn check_plan(&self, intent: &PlanIntent) -> Result<(), String> {
        let model = self
            .models
            .get(&intent.model)
            .ok_or_else(|| format!("unknown model {:?}", intent.model))?;
        let mut share_sums: BTreeMap<(u32, u32), f64> = BTreeMap::new();
        for i in &intent.instances {
            if i.layer >= model.num_layers || i.expert >= model.num_experts {
                return Err(format!(
                    "instance ({}, {}) outside the model's shape",
                    i.layer, i.expert
                ));
            }
            if !i.share.is_finite() || i.share < 0.0 {
                return Err(format!("instance ({}, {}) has share {}", i.layer, i.expert, i.share));
            }
            if !self.workers.contains_key(&i.worker) {
                return Err(format!(
                    "instance ({}, {}) on unknown worker {}",
                    i.layer, i.expert, i.worker
                ));
            }
            *share_sums.entry((i.layer, i.expert)).or_default() += i.share;
        }
        for ((layer, expert), sum) in share_sums {
            if (sum - 1.0).abs() > 1e-6 {
                return Err(format!("shares of expert ({layer}, {expert}) sum to {sum}, not 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> ClusterState {
        let mut s = ClusterState::default();
        let w = WorkerSpec {
            id: 7,
            address: "127.0.0.1:1".into(),
            devices: vec![],
            memory_bytes: 1,
        };
        assert_eq!(s.apply(1, Command::RegisterWorker(w)), CommandResponse::Applied);
        let m = ModelSpec {
            name: "m".into(),
            architecture: "mixtral".into(),
            num_layers: 2,
            num_experts: 4,
            top_k: 2,
            weights: "/w".into(),
        };
        assert_eq!(s.apply(2, Command::PutModel(m)), CommandResponse::Applied);
        s
    }

    #[test]
    fn register_model_creates_updates_weights_and_rejects_other_shapes() {
        let mut s = seeded();
        let m = s.models["m"].clone();
        let same = s.apply(3, Command::RegisterModel(m.clone()));
        assert_eq!(same, CommandResponse::ModelRegistered { created: false });
        let moved = ModelSpec {
            weights: "/elsewhere".into(),
            ..m.clone()
        };
        let r = s.apply(4, Command::RegisterModel(moved));
        assert_eq!(r, CommandResponse::ModelRegistered { created: true });
        assert_eq!(s.models["m"].weights, "/elsewhere");
        let wider = ModelSpec {
            num_experts: 8,
            ..m.clone()
        };
        assert!(matches!(
            s.apply(5, Command::RegisterModel(wider)),
            CommandResponse::Rejected { reason } if reason.contains("another shape")
        ));
        assert_eq!(s.models["m"].num_experts, 4, "a rejected registration changes nothing");
        let new = ModelSpec {
            name: "n".into(),
            ..m.clone()
        };
        assert_eq!(
            s.apply(6, Command::RegisterModel(new)),
            CommandResponse::ModelRegistered { created: true }
        );
        let bad = ModelSpec { top_k: 9, ..m };
        assert!(matches!(
            s.apply(7, Command::RegisterModel(bad)),
            CommandResponse::Rejected { .. }
        ));
    }

    /// Plans stored before origins existed (JSON without the field) read as the operator's,
    /// so the reconciler leaves them alone.
    #[test]
    fn plans_without_an_origin_read_as_the_operators() {
        let old = r#"{"epoch": 3, "model": "m", "instances": [], "reason": "initial static plan"}"#;
        let p: PlacementPlan = serde_json::from_str(old).expect("old plan");
        assert_eq!(p.origin, PlanOrigin::Operator);
        let v = serde_json::to_value(PlanIntent {
            origin: PlanOrigin::InitialSpread,
            ..intent(1.0)
        })
        .expect("serializes");
        assert_eq!(v["origin"], "initial_spread");
    }

    fn intent(share: f64) -> PlanIntent {
        PlanIntent {
            model: "m".into(),
            instances: vec![ExpertInstance {
                layer: 1,
                expert: 3,
                worker: 7,
                gpu: 0,
                share,
            }],
            reason: String::new(),
            origin: PlanOrigin::Operator,
        }
    }

    #[test]
    fn epochs_increase_by_one_and_never_repeat() {
        let mut s = seeded();
        for n in 1..=5 {
            let r = s.apply(
                2 + n,
                Command::CommitPlan {
                    intent: intent(1.0),
                    expected_epoch: None,
                },
            );
            assert_eq!(r, CommandResponse::PlanCommitted { epoch: n });
        }
        assert_eq!(s.plans.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_keyed_command_applies_once_and_replays_its_first_answer() {
        let mut s = seeded();
        let commit = || Command::CommitPlan {
            intent: intent(1.0),
            expected_epoch: None,
        };
        let first = s.apply(3, commit().keyed("k1".into()));
        assert_eq!(first, CommandResponse::PlanCommitted { epoch: 1 });
        // The same write retried (a forward that timed out, a leader that lost its term).
        assert_eq!(s.apply(4, commit().keyed("k1".into())), first);
        assert_eq!(s.plans.len(), 1);
        // Another key is another write.
        assert_eq!(
            s.apply(5, commit().keyed("k2".into())),
            CommandResponse::PlanCommitted { epoch: 2 }
        );
        // A key reused for a different command is refused, and changes nothing.
        let other = Command::CommitPlan {
            intent: intent(0.5),
            expected_epoch: None,
        };
        assert!(
            matches!(s.apply(6, other.keyed("k1".into())), CommandResponse::Rejected { reason } if reason.contains("different command"))
        );
        assert_eq!(s.plans.len(), 2);
        // Nested keys are refused.
        let nested = Command::Keyed {
            key: "outer".into(),
            digest: 0,
            command: Box::new(commit().keyed("inner".into())),
        };
        assert!(matches!(s.apply(7, nested), CommandResponse::Rejected { .. }));
        assert_eq!(s.plans.len(), 2);
        // The remembered keys survive a snapshot round trip.
        let restored: ClusterState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(restored, s);
    }

    #[test]
    fn the_request_log_forgets_the_oldest_keys_first() {
        let mut s = seeded();
        for i in 0..REQUEST_KEY_LIMIT + 1 {
            let cmd = Command::DrainWorker { worker: 7 }.keyed(format!("k{i}"));
            assert_eq!(s.apply(3 + i as u64, cmd), CommandResponse::Applied);
        }
        assert_eq!(s.requests.len(), REQUEST_KEY_LIMIT);
        // k0 is forgotten: applying it again is a new write (answered Applied, logged again).
        s.apply(1_000_000, Command::DrainWorker { worker: 7 }.keyed("k0".into()));
        assert_eq!(s.decisions.last().unwrap().log_index, 1_000_000);
        // k5 is still remembered: no new decision.
        let before = s.decisions.clone();
        s.apply(1_000_001, Command::DrainWorker { worker: 7 }.keyed("k5".into()));
        assert_eq!(s.decisions, before);
    }

    #[test]
    fn stale_or_invalid_plans_are_rejected_without_an_epoch() {
        let mut s = seeded();
        let r = s.apply(
            3,
            Command::CommitPlan {
                intent: intent(1.0),
                expected_epoch: Some(4),
            },
        );
        assert!(matches!(r, CommandResponse::Rejected { .. }));
        let r = s.apply(
            4,
            Command::CommitPlan {
                intent: intent(0.5),
                expected_epoch: None,
            },
        );
        assert!(matches!(r, CommandResponse::Rejected { .. }));
        let r = s.apply(
            5,
            Command::CommitPlan {
                intent: intent(f64::NAN),
                expected_epoch: None,
            },
        );
        assert!(matches!(r, CommandResponse::Rejected { .. }));
        assert_eq!(s.current_epoch(), 0);
        assert_eq!(s.decisions.len(), 5);
    }

    #[test]
    fn dead_workers_come_back_active_but_draining_ones_stay_draining() {
        let mut s = seeded();
        assert_eq!(
            s.apply(3, Command::MarkWorkerDead { worker: 7 }),
            CommandResponse::Applied
        );
        assert_eq!(s.workers[&7].health, WorkerHealth::Dead);
        assert_eq!(
            s.apply(4, Command::MarkWorkerAlive { worker: 7 }),
            CommandResponse::Applied
        );
        assert_eq!(s.workers[&7].health, WorkerHealth::Active);
        assert_eq!(s.apply(5, Command::DrainWorker { worker: 7 }), CommandResponse::Applied);
        assert_eq!(
            s.apply(6, Command::MarkWorkerAlive { worker: 7 }),
            CommandResponse::Applied
        );
        assert_eq!(s.workers[&7].health, WorkerHealth::Draining);
        assert!(matches!(
            s.apply(7, Command::MarkWorkerDead { worker: 8 }),
            CommandResponse::Rejected { .. }
        ));
    }

    #[test]
    fn predictor_versions_increase() {
        let mut s = ClusterState::default();
        let u = PredictorUpdate {
            name: "ema".into(),
            parameters: serde_json::json!({"alpha": 0.5}),
            statistics: serde_json::Value::Null,
        };
        assert_eq!(
            s.apply(1, Command::UpdatePredictor(u.clone())),
            CommandResponse::PredictorVersion { version: 1 }
        );
        assert_eq!(
            s.apply(2, Command::UpdatePredictor(u)),
            CommandResponse::PredictorVersion { version: 2 }
        );
    }
}
