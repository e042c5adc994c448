//! Per-policy results: latency percentiles, MoE-layer time, throughput, the two cost
//! currencies, balancedness and instances over time.

use serde::Serialize;

use crate::arrivals::Request;
use crate::cost::{Billing, Pricing};
use crate::engine::{Layout, SimConfig};
use crate::model::ModelShape;

/// What one policy did, accumulated over its expert-parallel groups.
#[derive(Debug, Clone)]
pub struct PolicyReport {
    pub policy: String,
    pub billing: Billing,
    pub arrived: usize,
    pub completed: usize,
    /// Requests larger than a GPU's whole KV cache: never admitted.
    pub rejected: usize,
    /// Still waiting or running when the drain limit stopped the run.
    pub unfinished: usize,
    pub ttft_s: Vec<f64>,
    pub tpot_s: Vec<f64>,
    pub e2e_s: Vec<f64>,
    /// Every (step, MoE layer): dispatch + slowest GPU's experts + combine (+ cold start).
    pub moe_layer_s: Vec<f32>,
    pub bal_sum: f64,
    pub bal_n: u64,
    pub cold_starts: u64,
    /// Token copies dispatched and token-layers, over the steps sampled for fan-out.
    pub fanout_copies: u64,
    pub fanout_token_layers: u64,
    pub instances_created: u64,
    /// MoE layers simulated (each standing for `moe layers / this` of the model's).
    pub moe_layers_simulated: usize,
    pub tokens_processed: u64,
    pub output_tokens: u64,
    pub steps: u64,
    pub busy_s: f64,
    pub mem_expert_gb_s: f64,
    pub mem_non_expert_gb_s: f64,
    pub mem_kv_gb_s: f64,
    pub sim_end_s: f64,
    /// (time s, instances per layer, balancedness, running requests), summed over groups.
    pub samples: Vec<(f64, f64, f64, usize)>,
    pub summary: Option<Summary>,
}

/// p50, p90, p99 and mean.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(v: &mut [f64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// The JSON form of one policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub policy: String,
    pub billing: Billing,
    pub requests_arrived: usize,
    pub requests_completed: usize,
    pub requests_rejected: usize,
    pub requests_unfinished: usize,
    pub ttft_s: Percentiles,
    pub tpot_s: Percentiles,
    pub e2e_s: Percentiles,
    pub moe_layer_time_mean_s: f64,
    pub moe_layer_time_p99_s: f64,
    pub throughput_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub cost_gpu_mem_gb_s: f64,
    pub cost_gpu_s: f64,
    pub cost_usd: f64,
    /// Both billings for every policy, to compare like with like.
    pub cost_usd_serverful: f64,
    pub cost_usd_serverless: f64,
    /// Memory actually held, by kind (GB-s): non-expert weights, expert instances, KV in use.
    pub mem_non_expert_gb_s: f64,
    pub mem_expert_gb_s: f64,
    pub mem_kv_gb_s: f64,
    pub balancedness_mean: f64,
    /// Token copies the dispatch sends per token and MoE layer (distinct GPUs of its
    /// experts), over the steps sampled for it (`None`: not sampled, see
    /// `SimConfig::fanout_sample_every`).
    pub dispatch_fanout_mean: Option<f64>,
    pub cold_starts: u64,
    pub instances_created: u64,
    /// MoE layers simulated: all of the model's, or the sample that stood for them
    /// (`SimConfig::sample_moe_layers`).
    pub moe_layers_simulated: usize,
    pub steps: u64,
    pub simulated_s: f64,
    /// `[time s, mean instances per MoE layer per group, balancedness]`.
    pub instances_over_time: Vec<[f64; 2]>,
    pub balancedness_over_time: Vec<[f64; 2]>,
}

impl PolicyReport {
    pub fn new(policy: &str, billing: Billing) -> Self {
        Self {
            policy: policy.to_string(),
            billing,
            arrived: 0,
            completed: 0,
            rejected: 0,
            unfinished: 0,
            ttft_s: Vec::new(),
            tpot_s: Vec::new(),
            e2e_s: Vec::new(),
            moe_layer_s: Vec::new(),
            bal_sum: 0.0,
            bal_n: 0,
            cold_starts: 0,
            fanout_copies: 0,
            fanout_token_layers: 0,
            instances_created: 0,
            moe_layers_simulated: 0,
            tokens_processed: 0,
            output_tokens: 0,
            steps: 0,
            busy_s: 0.0,
            mem_expert_gb_s: 0.0,
            mem_non_expert_gb_s: 0.0,
            mem_kv_gb_s: 0.0,
            sim_end_s: 0.0,
            samples: Vec::new(),
            summary: None,
        }
    }

    pub fn record_request(&mut self, r: &Request, first_token_s: f64, done_s: f64) {
        self.completed += 1;
        let out = r.output_tokens.max(1);
        self.output_tokens += out as u64;
        self.ttft_s.push(first_token_s - r.arrival_s);
        self.e2e_s.push(done_s - r.arrival_s);
        if out > 1 {
            self.tpot_s.push((done_s - first_token_s) / (out - 1) as f64);
        }
    }

    /// Add a time-series sample; samples at the same time from several groups are summed
    /// (instances) or averaged (balancedness).
    pub fn push_sample(&mut self, t: f64, instances_per_layer: f64, bal: f64, running: usize) {
        if let Some(s) = self.samples.iter_mut().find(|s| s.0 == t) {
            s.1 += instances_per_layer;
            if bal.is_finite() {
                s.2 = if s.2.is_finite() { (s.2 + bal) / 2.0 } else { bal };
            }
            s.3 += running;
        } else {
            self.samples.push((t, instances_per_layer, bal, running));
        }
    }

    pub fn finish(&mut self, cfg: &SimConfig, model: &ModelShape, lay: &Layout, duration_s: f64) {
        let span = self.sim_end_s.max(duration_s);
        // Central attention adds one engine device per group.
        let engines = if cfg.central_attention { lay.groups } else { 0 };
        let gpus = (cfg.gpus + engines) as f64;
        let mem_gb = cfg.gpu.memory_bytes / 1e9;
        let pricing = Pricing {
            usd_per_gpu_hour: cfg.pricing_usd_per_gpu_hour,
            gpu_memory_gb: mem_gb,
        };
        let gpu_s = gpus * span;
        let reserved_gb_s = gpus * mem_gb * cfg.gpu_memory_utilization * span;
        let used_gb_s = self.mem_expert_gb_s + self.mem_non_expert_gb_s + self.mem_kv_gb_s;
        let held = match self.billing {
            Billing::Serverful => reserved_gb_s,
            Billing::Serverless => used_gb_s,
        };
        let mut layer: Vec<f64> = self.moe_layer_s.iter().map(|&x| x as f64).collect();
        let lp = Percentiles::of(&mut layer);
        let per_group = lay.groups as f64;
        let _ = model;
        self.samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.summary = Some(Summary {
            policy: self.policy.clone(),
            billing: self.billing,
            requests_arrived: self.arrived,
            requests_completed: self.completed,
            requests_rejected: self.rejected,
            requests_unfinished: self.unfinished,
            ttft_s: Percentiles::of(&mut self.ttft_s.clone()),
            tpot_s: Percentiles::of(&mut self.tpot_s.clone()),
            e2e_s: Percentiles::of(&mut self.e2e_s.clone()),
            moe_layer_time_mean_s: lp.mean,
            moe_layer_time_p99_s: lp.p99,
            throughput_tokens_per_s: self.tokens_processed as f64 / span,
            output_tokens_per_s: self.output_tokens as f64 / span,
            cost_gpu_mem_gb_s: held,
            cost_gpu_s: gpu_s,
            cost_usd: match self.billing {
                Billing::Serverful => pricing.serverful_usd(gpu_s),
                Billing::Serverless => pricing.serverless_usd(used_gb_s),
            },
            cost_usd_serverful: pricing.serverful_usd(gpu_s),
            cost_usd_serverless: pricing.serverless_usd(used_gb_s),
            mem_non_expert_gb_s: self.mem_non_expert_gb_s,
            mem_expert_gb_s: self.mem_expert_gb_s,
            mem_kv_gb_s: self.mem_kv_gb_s,
            balancedness_mean: if self.bal_n == 0 {
                0.0
            } else {
                self.bal_sum / self.bal_n as f64
            },
            dispatch_fanout_mean: (self.fanout_token_layers > 0)
                .then(|| self.fanout_copies as f64 / self.fanout_token_layers as f64),
            cold_starts: self.cold_starts,
            instances_created: self.instances_created,
            moe_layers_simulated: self.moe_layers_simulated,
            steps: self.steps,
            simulated_s: span,
            instances_over_time: self.samples.iter().map(|s| [s.0, s.1 / per_group]).collect(),
            balancedness_over_time: self
                .samples
                .iter()
                .filter(|s| s.2.is_finite())
                .map(|s| [s.0, s.2])
                .collect(),
        });
    }
}
