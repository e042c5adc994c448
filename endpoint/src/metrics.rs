//! Prometheus metrics with vLLM's names under the `moeless:` prefix, recorded through the
//! `metrics` facade; `/metrics` renders the process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::api::FinishReason;

/// vLLM's latency buckets (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; `None` when another recorder was
/// installed first (metrics then go to that one).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            spawn_upkeep(handle.clone());
            Some(handle)
        })
        .as_ref()
}

/// How often the recorder folds its buffered histogram samples into the histograms.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `install_recorder` leaves upkeep to the caller: histogram samples are buffered until
/// `run_upkeep`, so without a scrape every request's samples would be kept (a leak that grows
/// with the requests served; caught by tests/t07_sustained_load.rs). A thread does it.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples wait for a scrape");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "moeless:time_to_first_token_seconds",
        Unit::Seconds,
        "Arrival to first token."
    );
    describe_histogram!(
        "moeless:inter_token_latency_seconds",
        Unit::Seconds,
        "Time between consecutive tokens of a sequence."
    );
    describe_histogram!(
        "moeless:e2e_request_latency_seconds",
        Unit::Seconds,
        "Arrival to last token."
    );
    describe_histogram!(
        "moeless:request_queue_time_seconds",
        Unit::Seconds,
        "Arrival to first scheduled."
    );
    describe_gauge!("moeless:num_requests_running", "Sequences in the running batch.");
    describe_gauge!("moeless:num_requests_waiting", "Sequences waiting to be scheduled.");
    describe_gauge!("moeless:kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).");
    describe_counter!("moeless:prompt_tokens_total", "Prompt tokens prefilled.");
    describe_counter!("moeless:generation_tokens_total", "Tokens generated.");
    describe_counter!(
        "moeless:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache when a sequence is admitted."
    );
    describe_counter!(
        "moeless:prefix_cache_hits_total",
        "Of those, tokens whose KV blocks were found cached (not recomputed)."
    );
    describe_counter!(
        "moeless:num_preemptions_total",
        "Sequences preempted for lack of KV blocks."
    );
    describe_counter!("moeless:request_success_total", "Finished choices by finish reason.");
    describe_counter!(
        "moeless:expert_tokens_total",
        "Tokens routed to each (layer, expert), top-k slots counted."
    );
    describe_gauge!(
        "moeless:expert_balancedness",
        "Mean over max tokens per expert in the last step, per MoE layer (1 is perfectly even)."
    );
}

/// Handles the scheduler thread records into.
pub struct EngineMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub queue_time: Histogram,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub preemptions: Counter,
    pub prefix_queries: Counter,
    pub prefix_hits: Counter,
    model: String,
    /// Per MoE layer: one counter per expert, and the layer's balancedness gauge.
    experts: std::collections::HashMap<usize, (Vec<Counter>, Gauge)>,
}

impl EngineMetrics {
    pub fn new(model: &str) -> Self {
        let m = model.to_string();
        Self {
            ttft: histogram!("moeless:time_to_first_token_seconds", "model_name" => m.clone()),
            itl: histogram!("moeless:inter_token_latency_seconds", "model_name" => m.clone()),
            queue_time: histogram!("moeless:request_queue_time_seconds", "model_name" => m.clone()),
            running: gauge!("moeless:num_requests_running", "model_name" => m.clone()),
            waiting: gauge!("moeless:num_requests_waiting", "model_name" => m.clone()),
            kv_usage: gauge!("moeless:kv_cache_usage_perc", "model_name" => m.clone()),
            prompt_tokens: counter!("moeless:prompt_tokens_total", "model_name" => m.clone()),
            generation_tokens: counter!("moeless:generation_tokens_total", "model_name" => m.clone()),
            preemptions: counter!("moeless:num_preemptions_total", "model_name" => m.clone()),
            prefix_queries: counter!("moeless:prefix_cache_queries_total", "model_name" => m.clone()),
            prefix_hits: counter!("moeless:prefix_cache_hits_total", "model_name" => m.clone()),
            model: m,
            experts: Default::default(),
        }
    }

    /// Records one step's routing: `ids` are the chosen experts of every token at `layer`.
    pub fn record_routing(&mut self, layer: usize, num_experts: usize, ids: &[u32]) {
        if num_experts == 0 || ids.is_empty() {
            return;
        }
        let model = &self.model;
        let (counters, balance) = self.experts.entry(layer).or_insert_with(|| {
            let counters = (0..num_experts)
                .map(|e| {
                    counter!("moeless:expert_tokens_total", "model_name" => model.clone(),
                        "layer" => layer.to_string(), "expert" => e.to_string())
                })
                .collect();
            let gauge =
                gauge!("moeless:expert_balancedness", "model_name" => model.clone(), "layer" => layer.to_string());
            (counters, gauge)
        });
        let mut load = vec![0u64; counters.len()];
        for &id in ids {
            if let Some(l) = load.get_mut(id as usize) {
                *l += 1;
            }
        }
        for (c, &l) in counters.iter().zip(&load) {
            if l > 0 {
                c.increment(l);
            }
        }
        let max = load.iter().copied().max().unwrap_or(0);
        if max > 0 {
            let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
            balance.set(mean / max as f64);
        }
    }
}

/// Records a finished choice (API side: it knows about stop strings and disconnects).
pub fn record_finished(model: &str, reason: FinishReason, e2e_seconds: f64) {
    histogram!("moeless:e2e_request_latency_seconds", "model_name" => model.to_string()).record(e2e_seconds);
    counter!("moeless:request_success_total", "model_name" => model.to_string(), "finished_reason" => reason.as_str())
        .increment(1);
}
