//! Prometheus metrics with vLLM's names under the `moeless:` prefix, recorded through the
//! `metrics` facade; `/metrics` renders the process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::FinishReason;

static DESCRIBED: OnceLock<()> = OnceLock::new();

/// The process's Prometheus recorder (`pki::https::prometheus`, shared with the admin API when
/// both run in one process), with this crate's metrics described; `None` when another
/// recorder was installed first (metrics then go to that one).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    let handle = pki::https::prometheus()?;
    DESCRIBED.get_or_init(describe);
    Some(handle)
}

/// How often the recorder folds its buffered histogram samples into the histograms (see
/// tests/t07_sustained_load.rs: without it every request's samples would be kept).
pub const UPKEEP_INTERVAL: std::time::Duration = pki::https::METRICS_UPKEEP_INTERVAL;

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
