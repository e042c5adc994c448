//! The discrete-event engine: arrivals and step completions on one clock per expert-parallel
//! group; continuous batching; the policy from `shared::replay` stepping with the batches.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use shared::replay::{PolicyKind, ReplayConfig, Replayer};
use shared::trace::Step;

use crate::arrivals::Request;
use crate::cost::{AttentionWork, Billing, CostModel};
use crate::gpu::GpuProfile;
use crate::model::ModelShape;
use crate::report::PolicyReport;
use crate::routing::RoutingPool;
use crate::SimError;

/// Everything a run depends on besides the traces.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub gpus: usize,
    pub gpu: GpuProfile,
    /// GPUs per expert-parallel group (`None`: the largest divisor of the expert count that
    /// is at most `gpus` and divides it). Groups are independent replicas; requests are spread
    /// over them round-robin.
    pub ep_size: Option<usize>,
    /// Expert slots per GPU and layer (`None`: 9/8 of the experts spread over the group, the
    /// EPLB budget of 12.5% redundant slots, capped by memory).
    pub slots_per_gpu: Option<usize>,
    /// Tokens one GPU processes per step at most (prefill chunks fill what decode leaves).
    pub token_budget_per_gpu: usize,
    /// Running requests per GPU at most.
    pub max_seqs_per_gpu: usize,
    /// Fraction of GPU memory a serverful engine reserves (vLLM's `gpu_memory_utilization`).
    pub gpu_memory_utilization: f64,
    pub pricing_usd_per_gpu_hour: f64,
    /// MoEless keeps an unneeded replica this long before dropping it.
    pub keep_alive_s: f64,
    /// MoEless drops an expert's last instance after this long without tokens (serverless
    /// scale to zero; `None`: never).
    pub scale_to_zero_after_s: Option<f64>,
    /// EPLB: history window and rebalancing interval in steps (vLLM defaults 1000 / 3000).
    pub eplb_window: usize,
    pub eplb_interval: usize,
    pub seed: u64,
    /// Seconds between time-series samples in the report.
    pub sample_every_s: f64,
    /// Stop simulating (and report the rest as unfinished) this long after the last arrival.
    pub drain_limit_s: f64,
    /// Disaggregated attention: one engine device per group runs every request's attention,
    /// router, shared experts, dense layers and LM head, and the group's GPUs run only routed
    /// experts (the deployment of `moeless serve` with workers). The per-GPU token budget,
    /// sequence limit and KV capacity then apply to the engine device; every routed token
    /// crosses a link. `false` (default): attention is data-parallel over the group's GPUs.
    pub central_attention: bool,
    /// Dispatch fan-out (data-parallel attention only): an all-to-all sends a token once to
    /// every distinct GPU that runs one of its experts, not once per expert. Every N-th step
    /// carries per-token routes so the policy's own token-to-instance matching counts the
    /// copies each GPU receives; between samples, each GPU's copies per routed choice from the
    /// last sample scale its routed choices. 1: every step (exact); 0: one copy per expert
    /// choice. With `central_attention` too: the workers' requests carry a token once per
    /// worker and their answers one weighted sum per token
    /// (`worker::wire::encode_request_combined`), so the combine is as large as the dispatch.
    pub fanout_sample_every: usize,
    /// Simulate only this many of the model's MoE layers, spread evenly
    /// ([`crate::routing::sampled_layers`]), and count each for the layers it stands for:
    /// its time, instances, memory and cold starts are scaled by `moe layers / n` (one
    /// simulated layer standing for all of them is how Vidur models a model's depth). The
    /// simulator's work per step is nearly proportional to the layers it simulates, so long
    /// horizons and large clusters run several times faster; what is lost is the spread
    /// between the layers left out (measured in `docs/PERFORMANCE.md`). `None`: every layer
    /// (exact).
    pub sample_moe_layers: Option<usize>,
}

impl SimConfig {
    pub fn new(gpus: usize, gpu: GpuProfile) -> Self {
        Self {
            gpus,
            gpu,
            ep_size: None,
            slots_per_gpu: None,
            token_budget_per_gpu: 2048,
            max_seqs_per_gpu: 128,
            gpu_memory_utilization: 0.9,
            pricing_usd_per_gpu_hour: 2.0,
            keep_alive_s: 10.0,
            scale_to_zero_after_s: Some(60.0),
            eplb_window: 1000,
            eplb_interval: 3000,
            seed: 0,
            sample_every_s: 10.0,
            drain_limit_s: 3600.0,
            central_attention: false,
            fanout_sample_every: 64,
            sample_moe_layers: None,
        }
    }
}

/// How the cluster is laid out for a model (validated once).
#[derive(Debug, Clone)]
pub struct Layout {
    pub ep_size: usize,
    pub groups: usize,
    pub slots_per_gpu: usize,
    /// KV cache tokens one GPU can hold.
    pub kv_tokens_per_gpu: usize,
}

pub fn layout(cfg: &SimConfig, model: &ModelShape) -> Result<Layout, SimError> {
    let e = model.num_experts;
    if cfg.gpus == 0 {
        return Err(SimError::Config("at least one GPU is needed".into()));
    }
    if cfg.token_budget_per_gpu == 0 || cfg.max_seqs_per_gpu == 0 {
        return Err(SimError::Config(
            "token budget and sequences per GPU must be positive".into(),
        ));
    }
    if !(cfg.gpu_memory_utilization > 0.0 && cfg.gpu_memory_utilization <= 1.0) {
        return Err(SimError::Config("gpu memory utilization must be in (0, 1]".into()));
    }
    let ep = match cfg.ep_size {
        Some(p) => p,
        None => (1..=cfg.gpus.min(e))
            .rev()
            .find(|&p| e.is_multiple_of(p) && cfg.gpus.is_multiple_of(p))
            .unwrap_or(1),
    };
    if ep == 0 || !cfg.gpus.is_multiple_of(ep) || !e.is_multiple_of(ep) {
        return Err(SimError::Config(format!(
            "expert-parallel group of {ep} GPUs must divide both the {} GPUs and the {e} experts",
            cfg.gpus
        )));
    }
    let usable = cfg.gpu.memory_bytes * cfg.gpu_memory_utilization;
    let per_slot = model.expert_bytes() * model.moe_layers.len() as f64;
    // With central attention the expert devices hold only experts; the engine device holds
    // the non-expert weights and the KV cache.
    let non_expert_here = if cfg.central_attention {
        0.0
    } else {
        model.non_expert_bytes()
    };
    let free_for_experts = usable - non_expert_here;
    let max_slots = (free_for_experts / per_slot).floor().max(0.0) as usize;
    let slots = cfg
        .slots_per_gpu
        .unwrap_or_else(|| (e * 9).div_ceil(8).div_ceil(ep).min(max_slots));
    if slots * ep < e || slots > max_slots {
        return Err(SimError::DoesNotFit(format!(
            "{} GB per GPU ({}% usable) hold {:.1} GB of non-expert weights and {max_slots} expert slots per layer; \
             {e} experts over {ep} GPUs need {} (asked {slots}): use more GPUs, bigger GPUs or 1-byte weights",
            cfg.gpu.memory_bytes / 1e9,
            cfg.gpu_memory_utilization * 100.0,
            model.non_expert_bytes() / 1e9,
            e.div_ceil(ep),
        )));
    }
    let kv_bytes = if cfg.central_attention {
        usable - model.non_expert_bytes()
    } else {
        usable - model.non_expert_bytes() - slots as f64 * per_slot
    };
    let kv_tokens_per_gpu = (kv_bytes / model.kv_bytes_per_token()).floor() as usize;
    if kv_tokens_per_gpu < 1024 {
        return Err(SimError::DoesNotFit(format!(
            "only {kv_tokens_per_gpu} KV-cache tokens per GPU remain after weights"
        )));
    }
    Ok(Layout {
        ep_size: ep,
        groups: cfg.gpus / ep,
        slots_per_gpu: slots,
        kv_tokens_per_gpu,
    })
}

/// An event on the simulated clock. Ties go by kind (arrivals before step completions, so a
/// request arriving as a step ends can join the next step), then by insertion order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub time: f64,
    pub kind: EventKind,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    Arrival(usize),
    StepDone,
}

impl Eq for Event {}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest event pops first.
        o.time
            .total_cmp(&self.time)
            .then_with(|| rank(o.kind).cmp(&rank(self.kind)))
            .then_with(|| o.seq.cmp(&self.seq))
    }
}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
fn rank(k: EventKind) -> u8 {
    match k {
        EventKind::Arrival(_) => 0,
        EventKind::StepDone => 1,
    }
}

/// The event queue: earliest first, ties as [`Event`] says.
#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Event>,
    seq: u64,
}

impl EventQueue {
    pub fn push(&mut self, time: f64, kind: EventKind) {
        self.seq += 1;
        self.heap.push(Event {
            time,
            kind,
            seq: self.seq,
        });
    }
    pub fn pop(&mut self) -> Option<Event> {
        self.heap.pop()
    }
    pub fn len(&self) -> usize {
        self.heap.len()
    }
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Live {
    req: Request,
    query: usize,
    gpu: usize,
    prefilled: usize,
    /// Output tokens produced (the first comes with the end of prefill).
    produced: usize,
    first_token_s: f64,
    /// Tokens scheduled in the current step: (prefill chunk, decode token).
    chunk: usize,
    decoding: bool,
}

/// Progress callback: (policy, simulated seconds, total seconds). Policies run on threads of
/// their own, so it is called from several threads (one at a time).
pub type Progress<'a> = &'a mut (dyn FnMut(&str, f64, f64) + Send);

/// Simulate every policy on the same requests; one report per policy.
pub fn simulate(
    cfg: &SimConfig,
    model: &ModelShape,
    routing: &RoutingPool,
    requests: &[Request],
    duration_s: f64,
    policies: &[PolicyKind],
    progress: Progress<'_>,
) -> Result<Vec<PolicyReport>, SimError> {
    if !(duration_s.is_finite() && duration_s > 0.0) {
        return Err(SimError::BadDuration(duration_s));
    }
    if requests.is_empty() {
        return Err(SimError::EmptyArrivals(" in the simulated window".into()));
    }
    if routing.num_experts != model.num_experts {
        return Err(SimError::ExpertMismatch {
            trace: routing.num_experts,
            model: model.num_experts,
        });
    }
    if routing.layers != model.moe_layers.len() {
        return Err(SimError::LayerMismatch {
            trace: routing.layers,
            model: model.moe_layers.len(),
        });
    }
    let lay = layout(cfg, model)?;
    let sampled;
    let routing = match cfg.sample_moe_layers {
        Some(0) => return Err(SimError::Config("sampling 0 MoE layers: give at least 1".into())),
        Some(n) if n < routing.layers => {
            sampled = routing.sample_layers(n)?;
            &sampled
        }
        _ => routing,
    };
    let progress = std::sync::Mutex::new(progress);
    // Policies share nothing but their inputs: one thread each (results do not depend on it).
    let run_policy = |p: PolicyKind| -> Result<PolicyReport, SimError> {
        let mut report = |label: &str, t: f64, total: f64| {
            if let Ok(mut f) = progress.lock() {
                (*f)(label, t, total)
            }
        };
        let mut rep = PolicyReport::new(p.label(), billing(p));
        for g in 0..lay.groups {
            let reqs: Vec<(u64, Request)> = requests
                .iter()
                .enumerate()
                .filter(|(i, _)| i % lay.groups == g)
                .map(|(i, r)| (i as u64, *r))
                .collect();
            let label = if lay.groups > 1 {
                format!("{} group {}/{}", p.label(), g + 1, lay.groups)
            } else {
                p.label().to_string()
            };
            run_group(
                cfg,
                model,
                routing,
                &lay,
                &reqs,
                duration_s,
                p,
                &mut rep,
                &label,
                &mut report,
            )?;
        }
        rep.finish(cfg, model, &lay, duration_s);
        Ok(rep)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || policies.len() < 2 {
        return policies.iter().map(|&p| run_policy(p)).collect();
    }
    let run_policy = &run_policy;
    std::thread::scope(|s| {
        let handles: Vec<_> = policies.iter().map(|&p| s.spawn(move || run_policy(p))).collect();
        handles
            .into_iter()
            .zip(policies)
            .map(|(h, p)| {
                h.join()
                    .unwrap_or_else(|_| Err(SimError::Config(format!("simulating policy {} panicked", p.label()))))
            })
            .collect()
    })
}

/// Static EP and EPLB run as reserved deployments; MoEless and the oracle as serverless.
pub fn billing(p: PolicyKind) -> Billing {
    match p {
        PolicyKind::Static | PolicyKind::Eplb => Billing::Serverful,
        PolicyKind::Moeless | PolicyKind::Oracle => Billing::Serverless,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_group(
    cfg: &SimConfig,
    model: &ModelShape,
    routing: &RoutingPool,
    lay: &Layout,
    reqs: &[(u64, Request)],
    duration_s: f64,
    policy: PolicyKind,
    rep: &mut PolicyReport,
    label: &str,
    progress: Progress<'_>,
) -> Result<(), SimError> {
    let g = lay.ep_size;
    let mut cost = CostModel::new(cfg.gpu.clone(), model.clone(), g);
    cost.central_attention = cfg.central_attention;
    // Devices that run attention (and hold KV caches and non-expert weights).
    let attn_devices = if cfg.central_attention { 1 } else { g };
    // MoE layers simulated (all, or a sample standing for `layer_scale` layers each).
    let layers = routing.layers;
    let moe_layers = model.moe_layers.len();
    let layer_scale = moe_layers as f64 / layers as f64;
    rep.moe_layers_simulated = layers;
    let k = routing.top_k;
    // Convert seconds of the policy's knobs into steps with a nominal decode step.
    let nominal_step = nominal_step_s(&cost, g, moe_layers);
    let to_steps = |s: f64| ((s / nominal_step).ceil() as usize).max(1);
    let mut rc = ReplayConfig::new(g, lay.slots_per_gpu);
    rc.creation_delay = to_steps(cost.cold_start_time());
    rc.keep_alive = to_steps(cfg.keep_alive_s);
    rc.scale_to_zero_after = cfg.scale_to_zero_after_s.map(to_steps);
    rc.eplb_window = cfg.eplb_window;
    rc.eplb_interval = cfg.eplb_interval;
    rc.stall_penalty = 0.0;
    let mut replayer = Replayer::new(layers, model.num_experts, k, policy, &rc)?
        .without_step_detail()
        .without_fractional_metric();

    let mut q = EventQueue::default();
    for (i, (_, r)) in reqs.iter().enumerate() {
        q.push(r.arrival_s, EventKind::Arrival(i));
    }
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<Live> = Vec::new();
    let mut kv_used = vec![0usize; attn_devices];
    let mut seqs = vec![0usize; attn_devices];
    let mut busy = false;
    let mut now = 0.0f64;
    let mut last_mem_t = 0.0f64;
    let mut next_sample = 0.0f64;
    let mut next_progress = 0.0f64;
    let mut step_index = 0usize;
    let hard_stop = duration_s + cfg.drain_limit_s;
    let expert_b = model.expert_bytes();
    let non_expert_total = model.non_expert_bytes() * attn_devices as f64;
    let kv_per_tok = model.kv_bytes_per_token();
    let held_instances = |r: &Replayer| (0..layers).map(|l| r.instances_held(l)).sum::<usize>();
    let mut instances_now = held_instances(&replayer);
    let mut sample_bal = (0.0f64, 0usize);
    // Cold starts (stalled expert layers) of the simulated layers.
    let mut stalls = 0u64;
    let mut routes: Vec<Vec<u32>> = vec![Vec::new(); layers];
    let mut counts: Vec<Vec<u32>> = vec![vec![0; model.num_experts]; layers];
    // Tokens of the step counted one by one (the rest come from whole passes over a query).
    let mut single: Vec<u32> = Vec::new();
    // Routes are built only for a predictor that reads them; otherwise counts straight from
    // the routing table (the same counts, without a per-layer copy of every token's choices).
    let need_routes = replayer.needs_routes();
    let fanout_every = cfg.fanout_sample_every;
    // Per layer and GPU, token copies received per routed choice at the last sampled step;
    // per layer, copies sent per routed choice. 1.0 (one copy per choice) until sampled.
    let mut recv_ratio: Vec<Vec<f64>> = vec![vec![1.0; g]; layers];
    let mut send_ratio: Vec<f64> = vec![1.0; layers];
    rep.arrived += reqs.len();

    while let Some(ev) = q.pop() {
        if ev.time > hard_stop {
            break;
        }
        // Integrate memory held since the last event.
        let dt = ev.time - now;
        if dt > 0.0 {
            let kv: usize = kv_used.iter().sum();
            rep.mem_expert_gb_s += instances_now as f64 * layer_scale * expert_b * dt / 1e9;
            rep.mem_non_expert_gb_s += non_expert_total * dt / 1e9;
            rep.mem_kv_gb_s += kv as f64 * kv_per_tok * dt / 1e9;
            last_mem_t = ev.time;
        }
        now = ev.time;
        while now >= next_sample {
            let b = if sample_bal.1 > 0 {
                sample_bal.0 / sample_bal.1 as f64
            } else {
                f64::NAN
            };
            rep.push_sample(next_sample, instances_now as f64 / layers as f64, b, running.len());
            sample_bal = (0.0, 0);
            next_sample += cfg.sample_every_s;
        }
        if now >= next_progress {
            progress(label, now.min(duration_s), duration_s);
            next_progress = now + duration_s / 20.0;
        }
        match ev.kind {
            EventKind::Arrival(i) => {
                let r = reqs[i].1;
                // A request that cannot fit on an empty GPU can never run: reject, and say so.
                if r.prompt_tokens + r.output_tokens.max(1) > lay.kv_tokens_per_gpu {
                    rep.rejected += 1;
                } else {
                    waiting.push_back(i);
                }
            }
            EventKind::StepDone => {
                busy = false;
                let mut i = 0;
                while i < running.len() {
                    let l = &mut running[i];
                    if l.decoding {
                        l.produced += 1;
                    } else if l.chunk > 0 {
                        l.prefilled += l.chunk;
                        if l.prefilled >= l.req.prompt_tokens {
                            l.produced = 1;
                            l.first_token_s = now;
                        }
                    }
                    l.chunk = 0;
                    l.decoding = false;
                    if l.produced >= l.req.output_tokens.max(1) {
                        let l = running.swap_remove(i);
                        kv_used[l.gpu] -= l.req.prompt_tokens + l.req.output_tokens.max(1);
                        seqs[l.gpu] -= 1;
                        let front = cost.request_overhead();
                        rep.record_request(&l.req, l.first_token_s + front, now + front);
                    } else {
                        i += 1;
                    }
                }
            }
        }
        if busy {
            continue;
        }
        // Admit waiting requests in order while the least-loaded GPU has room.
        while let Some(&i) = waiting.front() {
            let (id, r) = reqs[i];
            let need = r.prompt_tokens + r.output_tokens.max(1);
            let gpu = (0..attn_devices).min_by_key(|&x| (kv_used[x], x)).unwrap_or(0);
            if kv_used[gpu] + need > lay.kv_tokens_per_gpu || seqs[gpu] >= cfg.max_seqs_per_gpu {
                break;
            }
            waiting.pop_front();
            kv_used[gpu] += need;
            seqs[gpu] += 1;
            running.push(Live {
                req: r,

                query: routing.query_of(id, cfg.seed),
                gpu,
                prefilled: 0,
                produced: 0,
                first_token_s: f64::NAN,
                chunk: 0,
                decoding: false,
            });
        }
        if running.is_empty() {
            continue;
        }
        // Build the step: decode tokens first, then prefill chunks in admission order.
        let mut budget = vec![cfg.token_budget_per_gpu; attn_devices];
        let mut work = vec![AttentionWork::default(); attn_devices];
        for l in running.iter_mut().filter(|l| l.produced > 0) {
            if budget[l.gpu] > 0 {
                budget[l.gpu] -= 1;
                l.decoding = true;
                let w = &mut work[l.gpu];
                w.decode_tokens += 1;
                w.decode_context += l.req.prompt_tokens + l.produced;
            }
        }
        for l in running.iter_mut().filter(|l| l.produced == 0) {
            let c = (l.req.prompt_tokens - l.prefilled).min(budget[l.gpu]);
            if c == 0 && l.req.prompt_tokens > 0 {
                continue;
            }
            // An empty prompt still needs one forward pass to produce its first token.
            let c = c.max(1).min(l.req.prompt_tokens.max(1));
            budget[l.gpu] = budget[l.gpu].saturating_sub(c);
            l.chunk = c;
            let w = &mut work[l.gpu];
            w.prefill_tokens += c;
            w.prefill_context_products += c as f64 * (l.prefilled as f64 + c as f64 / 2.0);
        }
        for r in routes.iter_mut() {
            r.clear();
        }
        for c in counts.iter_mut() {
            c.iter_mut().for_each(|x| *x = 0);
        }
        let mut origin = vec![0usize; attn_devices];
        // Sequences with tokens in this step.
        let mut scheduled = 0usize;
        let sampled = fanout_every > 0 && step_index.is_multiple_of(fanout_every);
        let with_routes = need_routes || sampled;
        // A policy that reads routes gets them every step; its copies are still sampled.
        replayer.set_count_copies(sampled);
        for l in running.iter() {
            let (n, prefill, start) = if l.decoding {
                (1, false, l.produced - 1)
            } else {
                (l.chunk, true, l.prefilled)
            };
            origin[l.gpu] += n;
            scheduled += usize::from(n > 0);
            if with_routes {
                for p in start..start + n {
                    let tok = routing.token(l.query, prefill, p);
                    for (layer, r) in routes.iter_mut().enumerate() {
                        r.extend(routing.experts(tok, layer));
                    }
                }
            } else {
                routing.count_range(l.query, prefill, start, n, &mut counts, &mut single);
            }
        }
        routing.count_tokens(&single, &mut counts);
        single.clear();
        let step = if with_routes {
            Step::new(0, step_index, std::mem::take(&mut routes), model.num_experts)
        } else {
            Step {
                group: 0,
                index: step_index,
                routes: std::mem::take(&mut routes),
                counts: std::mem::take(&mut counts),
            }
        };
        replayer.step(&step)?;
        routes = step.routes;
        counts = step.counts;
        step_index += 1;
        instances_now = held_instances(&replayer);

        // Time of the step: every decoder layer's attention (slowest GPU), and per MoE layer
        // dispatch + slowest GPU's experts + combine (+ a cold start if an expert had none).
        let attn_moe = work.iter().map(|w| cost.attention_time(w, true)).fold(0.0, f64::max);
        let attn_dense = work.iter().map(|w| cost.attention_time(w, false)).fold(0.0, f64::max);
        let tokens: usize = origin.iter().sum();
        let lm = work.iter().map(|w| cost.lm_head_time(w.tokens())).fold(0.0, f64::max);
        // The fraction of a device's routed tokens that leave it (all of them from an engine).
        let remote = if cfg.central_attention {
            1.0
        } else {
            (g - 1) as f64 / g as f64
        };
        let mut t = (model.num_layers - moe_layers) as f64 * attn_dense + lm + cost.step_overhead(scheduled);
        let max_origin = *origin.iter().max().unwrap_or(&0) as f64 * k as f64;
        let cold = cost.cold_start_time();
        for (l, o) in replayer.last_step().iter().enumerate() {
            if fanout_every > 0 && !o.gpu_copies.is_empty() {
                let (mut copies, mut choices) = (0u64, 0u64);
                for ((r, &c), &n) in recv_ratio[l].iter_mut().zip(&o.gpu_copies).zip(&o.gpu_tokens) {
                    if n > 0 {
                        *r = f64::from(c) / f64::from(n);
                    }
                    copies += u64::from(c);
                    choices += u64::from(n);
                }
                if choices > 0 {
                    send_ratio[l] = copies as f64 / choices as f64;
                }
                rep.fanout_copies += copies;
                rep.fanout_token_layers += tokens as u64;
            }
            let mut expert_t = 0.0f64;
            let mut max_tok = 0u32;
            let mut max_recv = 0.0f64;
            let mut reached = 0usize;
            for (gi, (&n, &a)) in o.gpu_tokens.iter().zip(&o.gpu_active_instances).enumerate() {
                reached += usize::from(n > 0);
                max_tok = max_tok.max(n);
                max_recv = max_recv.max(f64::from(n) * recv_ratio[l][gi]);
                // The GPU's instances that received tokens run as one grouped GEMM: each
                // streams its weights; tokens split evenly among them.
                if n > 0 {
                    let a = a.max(1);
                    expert_t = expert_t.max(a as f64 * cost.expert_time((n as usize).div_ceil(a as usize)));
                }
            }
            // The combine returns what the dispatch sent: a device sums a token's expert
            // outputs before they travel back (workers answer one row per token).
            let dispatch = max_recv.max(max_origin * send_ratio[l]) * remote;
            let comm = 2.0 * cost.all_to_all_time(dispatch) + cost.fanout_time(reached);
            let stall = if o.stalls > 0 { cold } else { 0.0 };
            let layer_t = attn_moe + comm + expert_t + stall;
            t += layer_t * layer_scale;
            rep.moe_layer_s.push((comm + expert_t + stall) as f32);
            let total: u32 = o.gpu_tokens.iter().sum();
            let bal = if max_tok == 0 {
                1.0
            } else {
                total as f64 / g as f64 / max_tok as f64
            };
            rep.bal_sum += bal;
            rep.bal_n += 1;
            sample_bal.0 += bal;
            sample_bal.1 += 1;
            stalls += o.stalls;
        }
        rep.tokens_processed += tokens as u64;
        rep.steps += 1;
        rep.busy_s += t;
        busy = true;
        q.push(now + t, EventKind::StepDone);
    }
    let _ = last_mem_t;
    rep.cold_starts += (stalls as f64 * layer_scale).round() as u64;
    rep.instances_created += (replayer.instances_created() as f64 * layer_scale).round() as u64;
    rep.unfinished += waiting.len() + running.len();
    rep.sim_end_s = rep.sim_end_s.max(now);
    Ok(())
}

/// A decode step of 32 requests per GPU with 1,000 tokens of context, to convert the policy's
/// time knobs (cold start, keep-alive) into steps.
fn nominal_step_s(cost: &CostModel, g: usize, layers: usize) -> f64 {
    let w = AttentionWork {
        decode_tokens: 32,
        decode_context: 32_000,
        ..Default::default()
    };
    let k = cost.model.top_k;
    let per_gpu = 32 * k;
    let e = gpu_expert_time_uniform(cost, per_gpu, cost.model.num_experts.div_ceil(g));
    let m = &cost.model;
    let dense = m.num_layers - layers;
    dense as f64 * cost.attention_time(&w, false)
        + layers as f64 * (cost.attention_time(&w, true) + e + 2.0 * cost.all_to_all_time(per_gpu as f64))
}

fn gpu_expert_time_uniform(cost: &CostModel, n: usize, experts: usize) -> f64 {
    let active = experts.clamp(1, n.max(1));
    active as f64 * cost.expert_time(n.div_ceil(active))
}
