//! Observed worker state: when each worker's last heartbeat reached this node, and what that
//! heartbeat said it holds (instances, memory). Soft state like the load board, never replicated;
//! the leader turns it into replicated `MarkWorkerDead`/`MarkWorkerAlive` commands.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::state::WorkerHealth;

/// Lifecycle state of an expert instance on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Loading,
    Warm,
    Idle,
    Evicted,
}

/// An instance state string that is not one of "loading", "warm", "idle", "evicted".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown instance state {0:?} (loading, warm, idle, evicted)")]
pub struct UnknownInstanceState(pub String);

impl InstanceState {
    pub const ALL: [InstanceState; 4] = [
        InstanceState::Loading,
        InstanceState::Warm,
        InstanceState::Idle,
        InstanceState::Evicted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            InstanceState::Loading => "loading",
            InstanceState::Warm => "warm",
            InstanceState::Idle => "idle",
            InstanceState::Evicted => "evicted",
        }
    }
}

impl FromStr for InstanceState {
    type Err = UnknownInstanceState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.label() == s)
            .ok_or_else(|| UnknownInstanceState(s.to_string()))
    }
}

/// One instance as a worker last reported it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceReport {
    pub layer: u32,
    pub expert: u32,
    pub state: InstanceState,
    pub bytes: u64,
    pub cold_start_ms: f64,
    pub tokens: u64,
    pub source: String,
}

/// What the latest heartbeat of one worker said, and when it arrived.
#[derive(Debug, Clone)]
pub struct WorkerObservation {
    pub last_heartbeat: Instant,
    pub applied_epoch: u64,
    pub instances: Vec<InstanceReport>,
    pub memory_used_bytes: u64,
    pub memory_budget_bytes: u64,
}

/// Heartbeats received by this node, per worker.
#[derive(Debug)]
pub struct Liveness {
    timeout: Duration,
    workers: BTreeMap<u64, WorkerObservation>,
}

impl Liveness {
    /// A worker is dead once no heartbeat arrived for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            workers: BTreeMap::new(),
        }
    }

    /// How long a worker may stay silent before it is dead.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records a heartbeat (replacing the previous observation of that worker).
    pub fn record(&mut self, worker: u64, observation: WorkerObservation) {
        self.workers.insert(worker, observation);
    }

    /// The latest heartbeat of `worker` received here.
    pub fn observation(&self, worker: u64) -> Option<&WorkerObservation> {
        self.workers.get(&worker)
    }

    /// Every worker's latest heartbeat received here, by worker id.
    pub fn observations(&self) -> impl Iterator<Item = (u64, &WorkerObservation)> {
        self.workers.iter().map(|(w, o)| (*w, o))
    }

    /// Time since the worker's last heartbeat reached this node; `None` if none ever did.
    pub fn age(&self, worker: u64, now: Instant) -> Option<Duration> {
        self.workers
            .get(&worker)
            .map(|o| now.saturating_duration_since(o.last_heartbeat))
    }

    /// Whether a heartbeat arrived within the timeout.
    pub fn fresh(&self, worker: u64, now: Instant) -> bool {
        self.age(worker, now).is_some_and(|a| a <= self.timeout)
    }

    /// No heartbeat within the timeout, counting from `since` at the earliest (when this node
    /// became leader, so that a new leader gives every worker a full timeout to reach it).
    pub fn silent(&self, worker: u64, since: Instant, now: Instant) -> bool {
        let last = self.workers.get(&worker).map_or(since, |o| o.last_heartbeat.max(since));
        now.saturating_duration_since(last) > self.timeout
    }

    /// The health to show for a worker whose replicated health is `replicated`: draining stays
    /// draining; a fresh heartbeat here means active; the leader (`leader_since` set) decides
    /// dead from its own heartbeats; a follower, which sees only the heartbeats sent to it,
    /// falls back to the replicated health.
    pub fn health(
        &self,
        worker: u64,
        replicated: WorkerHealth,
        leader_since: Option<Instant>,
        now: Instant,
    ) -> WorkerHealth {
        if replicated == WorkerHealth::Draining {
            return WorkerHealth::Draining;
        }
        if self.fresh(worker, now) {
            return WorkerHealth::Active;
        }
        match leader_since {
            Some(since) if self.silent(worker, since, now) => WorkerHealth::Dead,
            _ => replicated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at: Instant) -> WorkerObservation {
        WorkerObservation {
            last_heartbeat: at,
            applied_epoch: 1,
            instances: Vec::new(),
            memory_used_bytes: 0,
            memory_budget_bytes: 0,
        }
    }

    #[test]
    fn a_new_leader_waits_a_full_timeout_before_declaring_anyone_dead() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(1000);
        let mut l = Liveness::new(timeout);
        l.record(1, seen(t0));
        let since = t0 + Duration::from_secs(10);
        // Worker 1 last seen long before this node led; worker 2 never seen.
        assert!(!l.silent(1, since, since + Duration::from_millis(900)));
        assert!(!l.silent(2, since, since + Duration::from_millis(900)));
        assert!(l.silent(1, since, since + Duration::from_millis(1100)));
        assert!(l.silent(2, since, since + Duration::from_millis(1100)));
        let now = since + Duration::from_millis(1100);
        assert_eq!(l.health(2, WorkerHealth::Active, Some(since), now), WorkerHealth::Dead);
        assert_eq!(l.health(2, WorkerHealth::Active, None, now), WorkerHealth::Active);
        assert_eq!(l.health(2, WorkerHealth::Dead, None, now), WorkerHealth::Dead);
        assert_eq!(
            l.health(2, WorkerHealth::Draining, Some(since), now),
            WorkerHealth::Draining
        );
        l.record(2, seen(now));
        assert_eq!(l.health(2, WorkerHealth::Dead, Some(since), now), WorkerHealth::Active);
    }
}
