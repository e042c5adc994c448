//! One worker's instances of expert functions and their serverless lifecycle.
//!
//! The plan says which experts this worker should hold ([`InstanceManager::set_wanted`]);
//! wanted experts are loaded in the background by a fixed number of loader threads, experts
//! dropped from the plan stay resident as `Idle` for a keep-alive period (so a plan that flips
//! back finds them warm), and work for an expert that is not resident cold-starts it on demand
//! ([`InstanceManager::acquire`]). Memory is reserved before a load starts, so the sum of
//! loading and resident instances never exceeds the budget; room is made by evicting idle
//! instances, least recently used first, never warm or loading ones.
//!
//! ```text
//!   Cold/Evicted --set_wanted--> Loading --loaded--> Warm <--set_wanted--> Idle --keep-alive--> Evicted
//!   Cold/Evicted --acquire (not wanted)--> Loading --loaded--> Idle
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shared::ExpertKey;

use crate::config::{ExpertLayout, ModelConfig};
use crate::error::LoadError;
use crate::expert::ExpertWeights;
use crate::store::{LoadedExpert, WeightStore};

/// Evicted instances remembered for observability.
const EVICTED_RECORDS: usize = 1024;

/// Where an instance is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Not resident and not loading (never shown by `snapshot`).
    Cold,
    /// Memory reserved; weights on their way.
    Loading,
    /// Resident and in the current plan.
    Warm,
    /// Resident, not in the plan; evicted when its keep-alive expires or memory is needed.
    Idle,
    /// Was resident; its memory is released.
    Evicted,
}

impl InstanceState {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Cold => "cold",
            InstanceState::Loading => "loading",
            InstanceState::Warm => "warm",
            InstanceState::Idle => "idle",
            InstanceState::Evicted => "evicted",
        }
    }
}

fn serialize_key<S: serde::Serializer>(key: &ExpertKey, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("ExpertKey", 2)?;
    st.serialize_field("layer", &key.layer)?;
    st.serialize_field("expert", &key.expert)?;
    st.end()
}

/// What one instance looks like from outside.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceInfo {
    #[serde(serialize_with = "serialize_key")]
    pub key: ExpertKey,
    pub state: InstanceState,
    /// Bytes held (reserved while loading; what it held, once evicted).
    pub bytes: u64,
    /// From start of load to resident, once loaded.
    pub cold_start_ms: Option<f64>,
    /// Where the weights came from (empty while loading).
    pub source: String,
    /// Tokens this instance served ([`InstanceManager::record_tokens`]).
    pub tokens: u64,
    /// How long an idle instance has been idle.
    pub idle_for_ms: Option<u64>,
}

/// Why an instance could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "no memory for expert {key}: needs {needed} bytes, {in_use} of {budget} in use and not enough idle to evict"
    )]
    OutOfMemory {
        key: ExpertKey,
        needed: u64,
        budget: u64,
        in_use: u64,
    },
    #[error("loading expert {key}: {source}")]
    Load {
        key: ExpertKey,
        #[source]
        source: LoadError,
    },
    /// A load this caller waited for (started by another thread) failed.
    #[error("loading expert {key} failed ({error_type}): {message}")]
    Failed {
        key: ExpertKey,
        error_type: &'static str,
        message: String,
    },
    #[error("loading expert {key} panicked: {message}")]
    Panicked { key: ExpertKey, message: String },
}

impl InstanceError {
    /// Stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            InstanceError::OutOfMemory { .. } => "out_of_memory",
            InstanceError::Load { source, .. } => source.error_type(),
            InstanceError::Failed { error_type, .. } => error_type,
            InstanceError::Panicked { .. } => "panicked",
        }
    }

    /// The expert concerned.
    pub fn key(&self) -> ExpertKey {
        match self {
            InstanceError::OutOfMemory { key, .. }
            | InstanceError::Load { key, .. }
            | InstanceError::Failed { key, .. }
            | InstanceError::Panicked { key, .. } => *key,
        }
    }
}

/// The last failed load of an expert, kept until it loads successfully.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub key: ExpertKey,
    pub error_type: &'static str,
    pub message: String,
    generation: u64,
}

/// Counters since the manager started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct InstanceStats {
    /// Loads started by the plan (background).
    pub cold_starts_plan: u64,
    /// Loads started (or taken over) by work for an expert that was not resident.
    pub cold_starts_demand: u64,
    pub evictions: u64,
    pub load_failures: u64,
    pub out_of_memory: u64,
}

impl InstanceStats {
    /// All completed cold starts.
    pub fn cold_starts(&self) -> u64 {
        self.cold_starts_plan + self.cold_starts_demand
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Plan,
    Demand,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Plan => "plan",
            Trigger::Demand => "demand",
        }
    }
}

struct Slot {
    state: InstanceState,
    /// Distinguishes successive instances of one key (a waiter knows which load it awaited).
    generation: u64,
    bytes: u64,
    weights: Option<Arc<ExpertWeights>>,
    /// Set when a thread has begun loading (a queued load has none).
    load_started: Option<Instant>,
    cold_start_ms: Option<f64>,
    source: String,
    tokens: u64,
    last_used: Instant,
    idle_since: Option<Instant>,
    evicted_at: Option<Instant>,
}

impl Slot {
    fn info(&self, key: ExpertKey, now: Instant) -> InstanceInfo {
        InstanceInfo {
            key,
            state: self.state,
            bytes: self.bytes,
            cold_start_ms: self.cold_start_ms,
            source: self.source.clone(),
            tokens: self.tokens,
            idle_for_ms: match self.state {
                InstanceState::Idle => self.idle_since.map(|t| now.duration_since(t).as_millis() as u64),
                _ => None,
            },
        }
    }

    fn resident(&self) -> bool {
        matches!(self.state, InstanceState::Warm | InstanceState::Idle)
    }
}

#[derive(Default)]
struct Inner {
    slots: HashMap<ExpertKey, Slot>,
    wanted: BTreeSet<ExpertKey>,
    /// Plan loads not yet taken by a loader thread.
    queue: VecDeque<ExpertKey>,
    /// Bytes of loading (reserved) and resident instances.
    used: u64,
    next_generation: u64,
    failures: HashMap<ExpertKey, LoadFailure>,
    stats: InstanceStats,
    shutdown: bool,
}

struct Shared {
    config: Arc<ModelConfig>,
    store: Arc<dyn WeightStore>,
    budget: u64,
    keep_alive: Duration,
    inner: Mutex<Inner>,
    /// Signalled on every state change (waiters in `acquire` and `wait_warm`).
    changed: Condvar,
    /// Signalled when loads are queued or on shutdown (loader threads).
    work: Condvar,
}

/// One worker's expert instances: plan-driven loading, keep-alive, on-demand cold starts and a
/// memory budget. `Send + Sync`; share it as an `Arc`. Dropping it stops the loader threads
/// after their current load.
pub struct InstanceManager {
    shared: Arc<Shared>,
    loaders: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for InstanceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InstanceManager({}, budget {} bytes)",
            self.shared.store.describe(),
            self.shared.budget
        )
    }
}

/// Bytes an expert takes as f32: an upper bound when the store cannot say (bf16 is smaller).
fn f32_estimate(cfg: &ModelConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.moe.expert_intermediate as u64);
    match cfg.moe.layout {
        ExpertLayout::SwiGlu => 4 * 3 * h * i,
        ExpertLayout::GptOssFused => 4 * (3 * h * i + 2 * i + h),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the bookkeeping half-updated in a way
        // worse than refusing all further work, so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expected_bytes(&self, key: ExpertKey) -> u64 {
        self.store
            .expected_bytes(key)
            .unwrap_or_else(|| f32_estimate(&self.config))
    }

    /// Reserves `needed` more bytes for `key`, evicting idle instances (least recently used,
    /// fewest tokens first) only when that makes enough room.
    fn reserve(&self, inner: &mut Inner, key: ExpertKey, needed: u64) -> Result<(), InstanceError> {
        let free = self.budget.saturating_sub(inner.used);
        if needed <= free {
            inner.used += needed;
            return Ok(());
        }
        let mut idle: Vec<(Instant, u64, ExpertKey, u64)> = inner
            .slots
            .iter()
            .filter(|(_, s)| s.state == InstanceState::Idle)
            .map(|(k, s)| (s.last_used, s.tokens, *k, s.bytes))
            .collect();
        let evictable: u64 = idle.iter().map(|x| x.3).sum();
        if needed > free + evictable {
            inner.stats.out_of_memory += 1;
            metrics::counter!("moeless_instance_out_of_memory_total").increment(1);
            return Err(InstanceError::OutOfMemory {
                key,
                needed,
                budget: self.budget,
                in_use: inner.used,
            });
        }
        idle.sort();
        for (_, _, victim, _) in idle {
            if needed <= self.budget.saturating_sub(inner.used) {
                break;
            }
            self.evict(inner, victim);
        }
        inner.used += needed;
        Ok(())
    }

    fn evict(&self, inner: &mut Inner, key: ExpertKey) {
        let Some(slot) = inner.slots.get_mut(&key) else { return };
        if !slot.resident() {
            return;
        }
        slot.state = InstanceState::Evicted;
        slot.weights = None;
        slot.idle_since = None;
        slot.evicted_at = Some(Instant::now());
        inner.used = inner.used.saturating_sub(slot.bytes);
        inner.stats.evictions += 1;
        metrics::counter!("moeless_instance_evictions_total").increment(1);
        let evicted: Vec<(Instant, ExpertKey)> = inner
            .slots
            .iter()
            .filter_map(|(k, s)| {
                s.evicted_at
                    .filter(|_| s.state == InstanceState::Evicted)
                    .map(|t| (t, *k))
            })
            .collect();
        if evicted.len() > EVICTED_RECORDS {
            let mut evicted = evicted;
            evicted.sort();
            for (_, k) in &evicted[..evicted.len() - EVICTED_RECORDS] {
                inner.slots.remove(k);
            }
        }
    }

    /// Reserves memory and creates a `Loading` slot; returns its generation.
    fn begin_load(&self, inner: &mut Inner, key: ExpertKey, started: Option<Instant>) -> Result<u64, InstanceError> {
        let bytes = self.expected_bytes(key);
        self.reserve(inner, key, bytes)?;
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner.slots.insert(
            key,
            Slot {
                state: InstanceState::Loading,
                generation,
                bytes,
                weights: None,
                load_started: started,
                cold_start_ms: None,
                source: String::new(),
                tokens: 0,
                last_used: Instant::now(),
                idle_since: None,
                evicted_at: None,
            },
        );
        Ok(generation)
    }

    fn run_load(&self, key: ExpertKey) -> Result<LoadedExpert, InstanceError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.store.load(key))) {
            Ok(Ok(loaded)) => Ok(loaded),
            Ok(Err(source)) => Err(InstanceError::Load { key, source }),
            Err(panic) => Err(InstanceError::Panicked {
                key,
                message: panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into()),
            }),
        }
    }

    /// Loads a slot this thread owns (its `load_started` is set) and settles it.
    fn load_and_settle(
        &self,
        key: ExpertKey,
        generation: u64,
        started: Instant,
        trigger: Trigger,
    ) -> Result<Arc<ExpertWeights>, InstanceError> {
        let result = self.run_load(key);
        let mut inner = self.lock();
        let out = self.settle(&mut inner, key, generation, started, trigger, result);
        publish(&inner);
        drop(inner);
        self.changed.notify_all();
        out
    }

    fn settle(
        &self,
        inner: &mut Inner,
        key: ExpertKey,
        generation: u64,
        started: Instant,
        trigger: Trigger,
        result: Result<LoadedExpert, InstanceError>,
    ) -> Result<Arc<ExpertWeights>, InstanceError> {
        let reserved = match inner.slots.get(&key) {
            Some(s) if s.generation == generation && s.state == InstanceState::Loading => s.bytes,
            // Only the owner of a loading slot settles it, so this does not happen.
            _ => {
                return result.map(|l| Arc::new(l.weights));
            }
        };
        let loaded = result.and_then(|l| {
            let actual = l.weights.bytes() as u64;
            if actual > reserved {
                self.reserve(inner, key, actual - reserved)?;
            } else {
                inner.used -= reserved - actual;
            }
            Ok((l, actual))
        });
        match loaded {
            Ok((l, actual)) => {
                let now = Instant::now();
                let elapsed = now.duration_since(started);
                let wanted = inner.wanted.contains(&key);
                let weights = Arc::new(l.weights);
                if let Some(slot) = inner.slots.get_mut(&key) {
                    slot.state = if wanted {
                        InstanceState::Warm
                    } else {
                        InstanceState::Idle
                    };
                    slot.idle_since = (!wanted).then_some(now);
                    slot.bytes = actual;
                    slot.weights = Some(weights.clone());
                    slot.cold_start_ms = Some(elapsed.as_secs_f64() * 1e3);
                    slot.source = l.source;
                    slot.last_used = now;
                }
                inner.failures.remove(&key);
                match trigger {
                    Trigger::Plan => inner.stats.cold_starts_plan += 1,
                    Trigger::Demand => inner.stats.cold_starts_demand += 1,
                }
                metrics::counter!("moeless_cold_starts_total", "trigger" => trigger.as_str()).increment(1);
                metrics::histogram!("moeless_cold_start_seconds", "trigger" => trigger.as_str())
                    .record(elapsed.as_secs_f64());
                Ok(weights)
            }
            Err(e) => {
                inner.slots.remove(&key);
                inner.used = inner.used.saturating_sub(reserved);
                inner.stats.load_failures += 1;
                metrics::counter!("moeless_instance_load_failures_total", "error_type" => e.error_type()).increment(1);
                inner.failures.insert(
                    key,
                    LoadFailure {
                        key,
                        error_type: e.error_type(),
                        message: e.to_string(),
                        generation,
                    },
                );
                Err(e)
            }
        }
    }

    fn loader(self: Arc<Self>) {
        loop {
            let mut inner = self.lock();
            let job = loop {
                if inner.shutdown {
                    return;
                }
                if let Some(key) = inner.queue.pop_front() {
                    let now = Instant::now();
                    match inner.slots.get_mut(&key) {
                        Some(s) if s.state == InstanceState::Loading && s.load_started.is_none() => {
                            s.load_started = Some(now);
                            break (key, s.generation, now);
                        }
                        _ => continue,
                    }
                }
                inner = self.work.wait(inner).unwrap_or_else(|e| e.into_inner());
            };
            drop(inner);
            let (key, generation, started) = job;
            // The error is kept in `failures` and reported through `snapshot`/`failures`.
            let _ = self.load_and_settle(key, generation, started, Trigger::Plan);
        }
    }
}

/// Publishes the state gauges.
fn publish(inner: &Inner) {
    let mut counts = [0usize; 4];
    for s in inner.slots.values() {
        match s.state {
            InstanceState::Loading => counts[0] += 1,
            InstanceState::Warm => counts[1] += 1,
            InstanceState::Idle => counts[2] += 1,
            InstanceState::Evicted => counts[3] += 1,
            InstanceState::Cold => {}
        }
    }
    for (state, n) in ["loading", "warm", "idle", "evicted"].iter().zip(counts) {
        metrics::gauge!("moeless_instances", "state" => *state).set(n as f64);
    }
    metrics::gauge!("moeless_instance_memory_bytes").set(inner.used as f64);
}

impl InstanceManager {
    /// A manager loading from `store` within `budget_bytes`, keeping unwanted instances
    /// `keep_alive` long, with `load_threads` (at least one) background loader threads.
    pub fn new(
        config: Arc<ModelConfig>,
        store: Arc<dyn WeightStore>,
        budget_bytes: u64,
        keep_alive: Duration,
        load_threads: usize,
    ) -> Self {
        let shared = Arc::new(Shared {
            config,
            store,
            budget: budget_bytes,
            keep_alive,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            work: Condvar::new(),
        });
        let loaders = (0..load_threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("expert-loader-{i}"))
                    .spawn(move || s.loader())
                    .ok()
            })
            .collect();
        publish(&shared.lock());
        InstanceManager { shared, loaders }
    }

    /// The instances the current plan wants here. Wanted and not resident: memory is reserved
    /// and the load queued for the loader threads. Resident and not wanted: `Idle` with a
    /// keep-alive deadline. Wanted and `Idle`: `Warm` again without reloading. Queued loads no
    /// longer wanted are cancelled. Returns the wanted keys that could not start (out of
    /// memory); calling again with the same set retries them and failed loads.
    pub fn set_wanted(&self, keys: &BTreeSet<ExpertKey>) -> Vec<InstanceError> {
        let s = &self.shared;
        let mut inner = s.lock();
        let now = Instant::now();
        inner.wanted = keys.clone();
        let mut cancelled = Vec::new();
        for (key, slot) in inner.slots.iter_mut() {
            let wanted = keys.contains(key);
            match slot.state {
                InstanceState::Warm if !wanted => {
                    slot.state = InstanceState::Idle;
                    slot.idle_since = Some(now);
                    slot.last_used = now;
                }
                InstanceState::Idle if wanted => {
                    slot.state = InstanceState::Warm;
                    slot.idle_since = None;
                }
                InstanceState::Loading if !wanted && slot.load_started.is_none() => cancelled.push(*key),
                _ => {}
            }
        }
        for key in cancelled {
            if let Some(slot) = inner.slots.remove(&key) {
                inner.used = inner.used.saturating_sub(slot.bytes);
            }
            inner.queue.retain(|k| *k != key);
        }
        let mut errors = Vec::new();
        for &key in keys {
            let cold = inner
                .slots
                .get(&key)
                .is_none_or(|sl| sl.state == InstanceState::Evicted);
            if cold {
                match s.begin_load(&mut inner, key, None) {
                    Ok(_) => inner.queue.push_back(key),
                    Err(e) => errors.push(e),
                }
            }
        }
        publish(&inner);
        drop(inner);
        s.work.notify_all();
        s.changed.notify_all();
        errors
    }

    /// The weights of `key` for executing work. Resident: at once (an idle instance stays idle
    /// and its keep-alive restarts). Loading: waits for it, or loads it in this thread if no
    /// loader has taken it yet. Cold or evicted: cold-starts it here, synchronously (it is
    /// `Warm` if the plan wants it, else `Idle`).
    pub fn acquire(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>, InstanceError> {
        let s = &self.shared;
        let mut inner = s.lock();
        let mut awaited: Option<u64> = None;
        loop {
            let now = Instant::now();
            let (generation, trigger) = match inner.slots.get_mut(&key) {
                Some(slot) if slot.resident() => {
                    slot.last_used = now;
                    if slot.state == InstanceState::Idle {
                        slot.idle_since = Some(now);
                    }
                    if let Some(w) = &slot.weights {
                        return Ok(w.clone());
                    }
                    // Resident slots always hold weights; treat the impossible as cold.
                    (None, Trigger::Demand)
                }
                Some(slot) if slot.state == InstanceState::Loading => {
                    if slot.load_started.is_none() {
                        slot.load_started = Some(now);
                        (Some(slot.generation), Trigger::Demand)
                    } else {
                        awaited = Some(slot.generation);
                        inner = s.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                }
                _ => {
                    if let Some(g) = awaited {
                        if let Some(f) = inner.failures.get(&key).filter(|f| f.generation == g) {
                            return Err(InstanceError::Failed {
                                key,
                                error_type: f.error_type,
                                message: f.message.clone(),
                            });
                        }
                    }
                    (None, Trigger::Demand)
                }
            };
            let generation = match generation {
                Some(g) => {
                    inner.queue.retain(|k| *k != key);
                    g
                }
                None => s.begin_load(&mut inner, key, Some(now))?,
            };
            publish(&inner);
            drop(inner);
            return s.load_and_settle(key, generation, now, trigger);
        }
    }

    /// The weights of a resident (`Warm` or `Idle`) instance without using it: recency and
    /// keep-alive are untouched, nothing loads. For serving a warm instance's weights to a peer.
    pub fn resident(&self, key: ExpertKey) -> Option<Arc<ExpertWeights>> {
        self.shared
            .lock()
            .slots
            .get(&key)
            .filter(|s| s.resident())
            .and_then(|s| s.weights.clone())
    }

    /// Adds to the tokens an instance has served (its value when choosing what to evict).
    pub fn record_tokens(&self, key: ExpertKey, tokens: u64) {
        if let Some(slot) = self.shared.lock().slots.get_mut(&key) {
            if slot.state != InstanceState::Evicted {
                slot.tokens += tokens;
            }
        }
    }

    /// Evicts idle instances whose keep-alive has expired. Called from a timer by the worker.
    pub fn tick(&self) {
        let s = &self.shared;
        let mut inner = s.lock();
        let now = Instant::now();
        let expired: Vec<ExpertKey> = inner
            .slots
            .iter()
            .filter(|(_, sl)| {
                sl.state == InstanceState::Idle && sl.idle_since.is_some_and(|t| now.duration_since(t) >= s.keep_alive)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            s.evict(&mut inner, key);
        }
        publish(&inner);
        drop(inner);
        s.changed.notify_all();
    }

    /// Every instance that is not cold, including recently evicted ones (the last 1024), by key.
    pub fn snapshot(&self) -> Vec<InstanceInfo> {
        let inner = self.shared.lock();
        let now = Instant::now();
        let mut v: Vec<InstanceInfo> = inner.slots.iter().map(|(k, s)| s.info(*k, now)).collect();
        v.sort_by_key(|i| i.key);
        v
    }

    /// The state of one expert here.
    pub fn state(&self, key: ExpertKey) -> InstanceState {
        self.shared
            .lock()
            .slots
            .get(&key)
            .map_or(InstanceState::Cold, |s| s.state)
    }

    /// The last failed load of each expert that has not loaded since.
    pub fn failures(&self) -> Vec<LoadFailure> {
        let mut v: Vec<LoadFailure> = self.shared.lock().failures.values().cloned().collect();
        v.sort_by_key(|f| f.key);
        v
    }

    /// Counters since start.
    pub fn stats(&self) -> InstanceStats {
        self.shared.lock().stats
    }

    /// Bytes of loading (reserved) and resident instances.
    pub fn memory_used(&self) -> u64 {
        self.shared.lock().used
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.shared.budget
    }

    /// True when every key is resident (`Warm` or `Idle`) here.
    pub fn all_warm(&self, keys: &BTreeSet<ExpertKey>) -> bool {
        let inner = self.shared.lock();
        Self::all_resident(&inner, keys)
    }

    fn all_resident(inner: &Inner, keys: &BTreeSet<ExpertKey>) -> bool {
        keys.iter().all(|k| inner.slots.get(k).is_some_and(|s| s.resident()))
    }

    /// Waits until every key is resident, or the timeout. Returns early (false) when some key
    /// is neither resident nor loading (its load failed or could not start), since it cannot
    /// become resident without another `set_wanted` or `acquire`.
    pub fn wait_warm(&self, keys: &BTreeSet<ExpertKey>, timeout: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        let mut inner = s.lock();
        loop {
            if Self::all_resident(&inner, keys) {
                return true;
            }
            let hopeless = keys.iter().any(|k| {
                inner
                    .slots
                    .get(k)
                    .is_none_or(|sl| !sl.resident() && sl.state != InstanceState::Loading)
            });
            let now = Instant::now();
            if hopeless || now >= deadline {
                return false;
            }
            inner = s
                .changed
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Drop for InstanceManager {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for h in self.loaders.drain(..) {
            let _ = h.join();
        }
    }
}
