//! Step-by-step replay of a routing trace under a placement policy.
//!
//! The simulator owns the instances of every layer (the "fleet"); policies create and remove
//! instances and set dispatch shares. An instance created at step `t` becomes usable at step
//! `t + creation_delay`. Tokens routed to an expert without a usable instance wait for one:
//! that is a cold-start stall, counted and charged to the layer-time proxy.

use crate::colocate::{Assignment, CoActivation, TokenAssigner, COACTIVATION_DECAY};
use crate::eplb::{rebalance_experts, EplbShape};
use crate::plan::{
    split_tokens_with, static_ep, water_fill_shares, Instance, LayerPlan, MinMaxDispatch, PlanError, ShareFill,
};
use crate::predict::{LoadPredictor, PredictorKind, PredictorParams, SlidingWindow};
use crate::trace::Step;

/// The placement policies replay can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Megatron-LM static expert parallelism, no replicas.
    Static,
    /// DeepSeek EPLB, rebalanced periodically from a load history (as vLLM does).
    Eplb,
    /// Layer-aware prediction, elastic replicas with creation delay and keep-alive.
    Moeless,
    /// EPLB given each step's true loads, no creation delay: the bound.
    Oracle,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Static,
        PolicyKind::Eplb,
        PolicyKind::Moeless,
        PolicyKind::Oracle,
    ];
    pub fn label(self) -> &'static str {
        match self {
            PolicyKind::Static => "static",
            PolicyKind::Eplb => "eplb",
            PolicyKind::Moeless => "moeless",
            PolicyKind::Oracle => "oracle",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.label() == s)
            .ok_or_else(|| format!("unknown policy `{s}` (static, eplb, moeless, oracle)"))
    }
}

/// How MoEless sets the per-step shares of a replicated expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchMode {
    /// From the layer's router output (known when the dispatch layout is built).
    Routed,
    /// From the layer-aware prediction made before the layer runs.
    Predicted,
}

impl std::str::FromStr for DispatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "routed" => Ok(DispatchMode::Routed),
            "predicted" => Ok(DispatchMode::Predicted),
            o => Err(format!("unknown dispatch mode `{o}` (routed, predicted)")),
        }
    }
}

/// Everything a replay run depends on besides the trace.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub gpus: usize,
    pub slots_per_gpu: usize,
    /// Steps between deciding an instance and it being usable (weights loading).
    pub creation_delay: usize,
    /// Steps an unneeded replica is kept warm before it is dropped.
    pub keep_alive: usize,
    /// Drop an expert's last instance after this many steps without tokens (`None`: never).
    pub scale_to_zero_after: Option<usize>,
    /// Token-equivalents added to the layer-time proxy per cold-start stall.
    pub stall_penalty: f64,
    pub eplb_window: usize,
    pub eplb_interval: usize,
    /// Use an exponentially decayed history (this factor per step) instead of a window.
    pub eplb_decay: Option<f64>,
    pub eplb_groups: usize,
    pub eplb_nodes: usize,
    pub predictor: PredictorKind,
    pub predictor_params: PredictorParams,
    pub dispatch: DispatchMode,
    /// Headroom: MoEless replicates until predicted per-GPU loads are within this factor of
    /// the mean.
    pub balance_tolerance: f64,
    /// Free slots are spent replicating experts whose predicted load per instance exceeds
    /// this many tokens (0 disables), so routed dispatch has load it can move.
    pub fluid_tokens: f64,
    /// Keep the plan used at every (step, layer) in the report.
    pub record_plans: bool,
    /// MoEless instances per layer at most (`None`: every slot of every GPU), e.g. experts plus
    /// redundant slots when that does not divide evenly over the GPUs.
    pub instance_budget: Option<usize>,
    /// Give static, EPLB and the oracle MoEless's min-max dispatch over routed counts instead of
    /// equal shares per replica (an ablation; the faithful baselines use equal shares).
    pub baseline_min_max_dispatch: bool,
    /// MoEless co-locates co-activated experts (top-k > 1, routes known): replicas go to the
    /// GPU whose instances share the most tokens with them among GPUs within
    /// `colocate_slack` of the least loaded, the instance at an expert's home GPU is never
    /// dropped as an idle replica, and each token is matched to instances on GPUs it already
    /// visits. Off: least loaded GPU, tokens in order (the baselines' way).
    pub colocate: bool,
    /// How far above the least loaded candidate GPU (as a fraction of the mean predicted GPU
    /// load) a co-located replica may go (default 0: ties only; more trades balance for
    /// fewer copies, see docs/PERFORMANCE.md).
    pub colocate_slack: f64,
    /// Steps between MoEless re-homing co-activated experts onto shared GPUs (0: never, the
    /// default: moving experts cuts copies further but costs balance and instance loads).
    pub rehome_interval: usize,
    /// Re-homing keeps each GPU's summed expert load (decayed picks) within this factor of
    /// the mean, or no worse than before a swap.
    pub rehome_tolerance: f64,
}

impl ReplayConfig {
    pub fn new(gpus: usize, slots_per_gpu: usize) -> Self {
        Self {
            gpus,
            slots_per_gpu,
            creation_delay: 1,
            keep_alive: 20,
            scale_to_zero_after: None,
            stall_penalty: 64.0,
            eplb_window: 1000,
            eplb_interval: 3000,
            eplb_decay: None,
            eplb_groups: 1,
            eplb_nodes: 1,
            predictor: PredictorKind::Temporal,
            predictor_params: PredictorParams::default(),
            dispatch: DispatchMode::Routed,
            balance_tolerance: 1.05,
            fluid_tokens: 1.0,
            record_plans: false,
            baseline_min_max_dispatch: false,
            instance_budget: None,
            colocate: true,
            colocate_slack: 0.0,
            rehome_interval: 0,
            rehome_tolerance: 1.0,
        }
    }
}

/// Totals and per-step detail of one replay.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    pub policy: String,
    pub steps: usize,
    pub layers: usize,
    /// Mean over steps and layers of (mean tokens per GPU) / (max tokens on a GPU).
    pub balancedness_mean: f64,
    /// The same with fractional token splits (an expert's load divided by its shares exactly),
    /// the way load-balancing papers usually count it.
    pub balancedness_fractional: f64,
    /// Sum over steps and layers of the max tokens on a GPU, plus stall penalties.
    pub layer_time_proxy: f64,
    /// Sum over steps of instances held (warm or loading) over all layers.
    pub instance_slot_steps: u64,
    pub instances_created: u64,
    pub cold_start_stalls: u64,
    /// Most instances (warm or loading) one GPU held for one layer at the end of any step.
    pub peak_gpu_slots: usize,
    /// Token copies the dispatch sends: per token and layer, the distinct GPUs running its
    /// experts (needs routes; 0 when steps carry counts only).
    pub dispatch_gpu_copies: u64,
    /// Token-layers behind `dispatch_gpu_copies`.
    pub dispatch_token_layers: u64,
    /// `gpu_tokens[step][layer][gpu]`.
    pub gpu_tokens: Vec<Vec<Vec<u32>>>,
    /// Balancedness of each step, averaged over layers.
    pub step_balancedness: Vec<f64>,
    /// `plans[step * layers + layer]` when recorded: the instances and shares actually used.
    pub plans: Vec<LayerPlan>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    expert: u32,
    gpu: u32,
    ready_at: usize,
    /// Last step at which this instance was needed (carried predicted or routed tokens).
    last_needed: usize,
    /// Its expert's home moved elsewhere: dropped once the instance at the new home is warm.
    retire: bool,
}

/// The instances of every layer, with their loading state.
struct Fleet {
    layers: Vec<Vec<Slot>>,
    gpus: usize,
    slots_per_gpu: usize,
    delay: usize,
    created: u64,
    /// Scratch of `reconcile`: per `expert * gpus + gpu`, the first unmatched old slot there
    /// (`NO_SLOT` when none), chained through `next_slot`.
    head: Vec<usize>,
    next_slot: Vec<usize>,
}

const NO_SLOT: usize = usize::MAX;

impl Fleet {
    fn set_warm(&mut self, layer: usize, plan: &LayerPlan, now: usize) {
        self.layers[layer] = plan
            .instances
            .iter()
            .map(|i| Slot {
                expert: i.expert,
                gpu: i.gpu,
                ready_at: 0,
                last_needed: now,
                retire: false,
            })
            .collect();
    }
    fn used_on(&self, layer: usize, gpu: usize) -> usize {
        self.layers[layer].iter().filter(|s| s.gpu as usize == gpu).count()
    }
    fn create(&mut self, layer: usize, expert: u32, gpu: u32, now: usize, delay: usize) {
        self.layers[layer].push(Slot {
            expert,
            gpu,
            ready_at: now + delay,
            last_needed: now,
            retire: false,
        });
        self.created += 1;
    }
    /// Replace a layer's instances by `target`, keeping matching (expert, gpu) instances and
    /// their state; new ones are created (usable after `delay`).
    fn reconcile(&mut self, layer: usize, target: &LayerPlan, now: usize, delay: usize) {
        let old = std::mem::take(&mut self.layers[layer]);
        let g = self.gpus;
        let key = |expert: u32, gpu: u32| expert as usize * g + gpu as usize;
        // Old slots by place, lowest index first: each target instance takes one there if any
        // is left (a slot kept where it is), otherwise a new one is created.
        let need = old.iter().map(|s| key(s.expert, s.gpu) + 1).max().unwrap_or(0);
        if self.head.len() < need {
            self.head.resize(need, NO_SLOT);
        }
        self.next_slot.clear();
        self.next_slot.resize(old.len(), NO_SLOT);
        for (i, s) in old.iter().enumerate().rev() {
            let k = key(s.expert, s.gpu);
            self.next_slot[i] = self.head[k];
            self.head[k] = i;
        }
        let mut next = Vec::with_capacity(target.instances.len());
        for i in &target.instances {
            let k = key(i.expert, i.gpu);
            let found = self.head.get(k).copied().unwrap_or(NO_SLOT);
            if found != NO_SLOT {
                self.head[k] = self.next_slot[found];
                next.push(old[found]);
            } else {
                next.push(Slot {
                    expert: i.expert,
                    gpu: i.gpu,
                    ready_at: now + delay,
                    last_needed: now,
                    retire: false,
                });
                self.created += 1;
            }
        }
        for s in &old {
            self.head[key(s.expert, s.gpu)] = NO_SLOT;
        }
        self.layers[layer] = next;
    }
}

/// Replay `steps` (each with `counts[layer][expert]`) under `policy`.
pub fn replay(
    steps: &[Step],
    num_experts: usize,
    top_k: usize,
    policy: PolicyKind,
    cfg: &ReplayConfig,
) -> Result<ReplayReport, PlanError> {
    let layers = steps.first().map(|s| s.counts.len()).unwrap_or(0);
    let mut r = Replayer::new(layers, num_experts, top_k, policy, cfg)?;
    r.report.gpu_tokens.reserve(steps.len());
    r.report.step_balancedness.reserve(steps.len());
    for step in steps {
        r.step(step)?;
    }
    Ok(r.finish())
}

/// What one layer of the last step did (see [`Replayer::last_step`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerOutcome {
    /// Tokens executed on each GPU (whole-token dispatch).
    pub gpu_tokens: Vec<u32>,
    /// Experts that had tokens but no usable instance (each waited for a cold start).
    pub stalls: u64,
    /// Instances on each GPU that received at least one token.
    pub gpu_active_instances: Vec<u32>,
    /// Token copies each GPU received from the dispatch: one per token with at least one of
    /// its experts executed there (what an all-to-all moves). Empty when the step carried no
    /// per-token routes.
    pub gpu_copies: Vec<u32>,
}

/// The replay driven one step at a time, for callers that produce steps as they go (the
/// cluster simulator, whose batches depend on timing). [`replay`] is a loop over it.
pub struct Replayer {
    policy: PolicyKind,
    cfg: ReplayConfig,
    num_experts: usize,
    layers: usize,
    fleet: Fleet,
    eplb_shape: EplbShape,
    history: Box<dyn LoadPredictor + Send>,
    predictor: Box<dyn LoadPredictor + Send>,
    pending_eplb: Option<(usize, Vec<LayerPlan>)>,
    predicted: Vec<f64>,
    split: Vec<u32>,
    idx_by_expert: Vec<Vec<usize>>,
    share_fill: ShareFill,
    dispatch: MinMaxDispatch,
    int_tokens: Vec<u32>,
    sh_scratch: Vec<f64>,
    rema_scratch: Vec<(f64, usize)>,
    last_routed: Vec<Vec<usize>>,
    top_k: usize,
    coactivation: Option<CoActivation>,
    /// `homes[layer][expert]`: the GPU of the expert's last instance (MoEless co-location).
    homes: Vec<Vec<u32>>,
    assigner: TokenAssigner,
    inst_tokens: Vec<u32>,
    t: usize,
    bal_sum: f64,
    frac_sum: f64,
    keep_step_detail: bool,
    fractional_metric: bool,
    /// Whether [`Self::step`] counts dispatch copies when a step carries routes.
    count_copies: bool,
    last: Vec<LayerOutcome>,
    report: ReplayReport,
}

impl Replayer {
    /// A fleet of `layers` MoE layers of `num_experts` experts, loaded with the policy's initial
    /// placement (static EP, or EPLB of uniform loads).
    pub fn new(
        layers: usize,
        num_experts: usize,
        top_k: usize,
        policy: PolicyKind,
        cfg: &ReplayConfig,
    ) -> Result<Self, PlanError> {
        let g = cfg.gpus;
        if g == 0 || layers == 0 || num_experts == 0 {
            return Err(PlanError::Shape(
                "replay needs at least one GPU, one layer and one expert".into(),
            ));
        }
        if g * cfg.slots_per_gpu < num_experts {
            return Err(PlanError::BudgetTooSmall {
                gpus: g,
                slots_per_gpu: cfg.slots_per_gpu,
                total: g * cfg.slots_per_gpu,
                experts: num_experts,
            });
        }
        let mut fleet = Fleet {
            layers: vec![Vec::new(); layers],
            gpus: g,
            slots_per_gpu: cfg.slots_per_gpu,
            delay: cfg.creation_delay,
            created: 0,
            head: Vec::new(),
            next_slot: Vec::new(),
        };
        let eplb_shape = EplbShape {
            num_physical: g * cfg.slots_per_gpu,
            num_groups: cfg.eplb_groups,
            num_nodes: cfg.eplb_nodes,
            num_gpus: g,
        };
        // Every policy starts from a loaded model: static EP for static and MoEless, EPLB on
        // uniform loads for the EPLB family.
        let initial = match policy {
            PolicyKind::Static | PolicyKind::Moeless => static_ep(num_experts, g)?,
            PolicyKind::Eplb | PolicyKind::Oracle => {
                rebalance_experts(&vec![1.0; num_experts], eplb_shape)?.to_layer_plan()
            }
        };
        for l in 0..layers {
            fleet.set_warm(l, &initial, 0);
        }
        let history: Box<dyn LoadPredictor + Send> = match cfg.eplb_decay {
            Some(d) => Box::new(crate::predict::DecayedHistory::new(layers, num_experts, d)),
            None => Box::new(SlidingWindow::new(layers, num_experts, cfg.eplb_window)),
        };
        cfg.predictor_params.check().map_err(PlanError::Shape)?;
        if !(cfg.rehome_tolerance.is_finite() && cfg.rehome_tolerance >= 1.0) {
            return Err(PlanError::Shape(format!(
                "rehome tolerance must be finite and >= 1, got {}",
                cfg.rehome_tolerance
            )));
        }
        if !(cfg.colocate_slack.is_finite() && cfg.colocate_slack >= 0.0) {
            return Err(PlanError::Shape(format!(
                "colocate slack must be finite and >= 0, got {}",
                cfg.colocate_slack
            )));
        }
        let predictor = cfg.predictor.build(&cfg.predictor_params, layers, num_experts, top_k);
        Ok(Replayer {
            policy,
            cfg: cfg.clone(),
            num_experts,
            layers,
            fleet,
            eplb_shape,
            history,
            predictor,
            pending_eplb: None,
            predicted: vec![0.0; num_experts],
            split: Vec::new(),
            idx_by_expert: vec![Vec::new(); num_experts],
            share_fill: ShareFill::new(num_experts, g),
            dispatch: MinMaxDispatch::default(),
            int_tokens: Vec::new(),
            sh_scratch: Vec::new(),
            rema_scratch: Vec::new(),
            last_routed: vec![vec![0usize; num_experts]; layers],
            top_k,
            coactivation: (policy == PolicyKind::Moeless && cfg.colocate && top_k > 1)
                .then(|| CoActivation::new(layers, num_experts, COACTIVATION_DECAY)),
            homes: vec![initial.instances.iter().map(|i| i.gpu).collect(); layers],
            assigner: TokenAssigner::default(),
            inst_tokens: Vec::new(),
            t: 0,
            bal_sum: 0.0,
            frac_sum: 0.0,
            keep_step_detail: true,
            fractional_metric: true,
            count_copies: true,
            last: Vec::new(),
            report: ReplayReport {
                policy: policy.label().to_string(),
                steps: 0,
                layers,
                balancedness_mean: 0.0,
                balancedness_fractional: 0.0,
                layer_time_proxy: 0.0,
                instance_slot_steps: 0,
                instances_created: 0,
                cold_start_stalls: 0,
                peak_gpu_slots: 0,
                dispatch_gpu_copies: 0,
                dispatch_token_layers: 0,
                gpu_tokens: Vec::new(),
                step_balancedness: Vec::new(),
                plans: Vec::new(),
            },
        })
    }

    /// Do not keep per-step GPU token counts and balancedness in the report (long runs); the
    /// last step stays available through [`Replayer::last_step`].
    pub fn without_step_detail(mut self) -> Self {
        self.keep_step_detail = false;
        self
    }

    /// Skip the fractional balancedness metric (reported as NaN): it solves a second, exact
    /// fractional dispatch per layer and step that callers reading only what ran (the cluster
    /// simulator) do not need.
    pub fn without_fractional_metric(mut self) -> Self {
        self.fractional_metric = false;
        self
    }

    /// Whether the next steps count each GPU's dispatch copies (`LayerOutcome::gpu_copies`)
    /// when they carry routes (default). A caller that samples copies every n-th step turns it
    /// off in between, since a policy that reads routes gets them on every step.
    pub fn set_count_copies(&mut self, on: bool) {
        self.count_copies = on;
    }

    /// Whether [`Self::step`] reads `Step::routes` (MoEless with a predictor that uses the
    /// current step's routes); otherwise steps may carry counts only, with empty routes.
    pub fn needs_routes(&self) -> bool {
        self.policy == PolicyKind::Moeless && self.cfg.predictor.reads_routes()
    }

    /// Per layer, what the last step executed.
    pub fn last_step(&self) -> &[LayerOutcome] {
        &self.last
    }

    /// Instances held now (warm or loading) in `layer`.
    pub fn instances_held(&self, layer: usize) -> usize {
        self.fleet.layers.get(layer).map_or(0, Vec::len)
    }

    /// Instances created so far (initial placement excluded).
    pub fn instances_created(&self) -> u64 {
        self.fleet.created
    }

    /// The totals so far (`steps` counts the steps run).
    pub fn report(&self) -> &ReplayReport {
        &self.report
    }

    /// Run one step: rebalance or scale as the policy does, dispatch every layer's tokens.
    pub fn step(&mut self, step: &Step) -> Result<(), PlanError> {
        let (t, layers, num_experts, g) = (self.t, self.layers, self.num_experts, self.cfg.gpus);
        let (policy, cfg) = (self.policy, &self.cfg);
        let fleet = &mut self.fleet;
        let report = &mut self.report;
        let eplb_shape = self.eplb_shape;
        let history = &mut self.history;
        let predictor = &mut self.predictor;
        let pending_eplb = &mut self.pending_eplb;
        let predicted = &mut self.predicted;
        let split = &mut self.split;
        let idx_by_expert = &mut self.idx_by_expert;
        let share_fill = &mut self.share_fill;
        let frac_sum = &mut self.frac_sum;
        let dispatch = &mut self.dispatch;
        let int_tokens = &mut self.int_tokens;
        let (sh, rema) = (&mut self.sh_scratch, &mut self.rema_scratch);
        let fractional_metric = self.fractional_metric;
        let top_k = self.top_k;
        let coactivation = &mut self.coactivation;
        let homes = &mut self.homes;
        let assigner = &mut self.assigner;
        let count_copies = self.count_copies;
        let inst_tokens = &mut self.inst_tokens;
        if step.counts.len() != layers || step.counts.iter().any(|c| c.len() != num_experts) {
            return Err(PlanError::Shape(format!(
                "step {t} has a different number of layers or experts"
            )));
        }
        let slots_this_step: f64 = step.counts[0].iter().map(|&c| c as f64).sum();
        history.begin_step(step.group);
        predictor.begin_step(step.group);
        if let Some(c) = coactivation.as_mut() {
            c.begin_step();
            if cfg.rehome_interval > 0 && t > 0 && t % cfg.rehome_interval == 0 {
                for (l, h) in homes.iter_mut().enumerate() {
                    let before = h.clone();
                    let load: Vec<f64> = c.picks(l).iter().map(|&x| f64::from(x)).collect();
                    if c.cluster_homes(l, h, &load, cfg.rehome_tolerance, REHOME_MIN_GAIN) {
                        // The old homes' instances go once the new homes' are warm.
                        for s in fleet.layers[l].iter_mut() {
                            let e = s.expert as usize;
                            if h[e] != before[e] {
                                s.retire = s.gpu == before[e];
                            }
                        }
                    }
                }
            }
        }

        if policy == PolicyKind::Eplb {
            if let Some((ready, _)) = &pending_eplb {
                if t >= *ready {
                    let (_, plans) = pending_eplb.take().expect("checked above");
                    for (l, p) in plans.iter().enumerate() {
                        // The switch drops old instances; new ones finished loading.
                        fleet.reconcile(l, p, t, 0);
                    }
                }
            }
            if t > 0 && cfg.eplb_interval > 0 && t % cfg.eplb_interval == 0 {
                let mut plans = Vec::with_capacity(layers);
                let mut w = vec![0.0; num_experts];
                for (l, slots) in fleet.layers.iter_mut().enumerate() {
                    history.predict(l, &[], 1.0, &mut w);
                    let target = rebalance_experts(&w, eplb_shape)?.to_layer_plan();
                    // Start loading the instances the new plan adds, next to the old ones.
                    let mut have: Vec<(u32, u32)> = slots.iter().map(|s| (s.expert, s.gpu)).collect();
                    for i in &target.instances {
                        if let Some(pos) = have.iter().position(|h| *h == (i.expert, i.gpu)) {
                            have.swap_remove(pos);
                        } else {
                            slots.push(Slot {
                                expert: i.expert,
                                gpu: i.gpu,
                                ready_at: t + cfg.creation_delay,
                                last_needed: t,
                                retire: false,
                            });
                            fleet.created += 1;
                        }
                    }
                    plans.push(target);
                }
                if cfg.creation_delay == 0 {
                    for (l, p) in plans.iter().enumerate() {
                        fleet.reconcile(l, p, t, 0);
                    }
                } else {
                    *pending_eplb = Some((t + cfg.creation_delay, plans));
                }
            }
        }

        let mut step_tokens = Vec::with_capacity(layers);
        let mut step_bal = 0.0;
        for (l, last_routed) in self.last_routed.iter_mut().enumerate() {
            let counts = &step.counts[l];
            match policy {
                PolicyKind::Oracle => {
                    let w: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
                    let target = rebalance_experts(&w, eplb_shape)?.to_layer_plan();
                    fleet.reconcile(l, &target, t, 0);
                }
                PolicyKind::Moeless => {
                    predictor.predict(l, &step.routes[..l], slots_this_step, predicted);
                    if coactivation.as_ref().is_some_and(|c| c.knows(l)) {
                        rehome_layer(fleet, l, &homes[l], predicted, t, cfg);
                    }
                    let colocation = coactivation.as_ref().map(|c| (c, homes[l].as_slice()));
                    let signals = LayerSignals {
                        predicted,
                        last_routed,
                        colocation,
                    };
                    scale_layer(fleet, l, &signals, t, cfg, share_fill);
                }
                _ => {}
            }

            // The instances usable now. During an EPLB transition only the old plan serves.
            let usable: Vec<usize> = fleet.layers[l]
                .iter()
                .enumerate()
                .filter(|(_, s)| s.ready_at <= t)
                .map(|(i, _)| i)
                .collect();
            let mut plan = LayerPlan {
                instances: usable
                    .iter()
                    .map(|&i| Instance {
                        expert: fleet.layers[l][i].expert,
                        gpu: fleet.layers[l][i].gpu,
                        share: 0.0,
                    })
                    .collect(),
            };
            // `frac_shares`: the same instances with exactly divisible tokens (the fractional
            // metric); `shares`: what integer dispatch actually used.
            let mut frac_shares: Option<Vec<f64>> = None;
            let min_max = match policy {
                PolicyKind::Moeless => cfg.dispatch == DispatchMode::Routed,
                _ => cfg.baseline_min_max_dispatch,
            };
            let shares: Vec<f64> = match policy {
                _ if min_max => {
                    if fractional_metric {
                        frac_shares = Some(dispatch.fractional_split(&plan, counts, g).1);
                    }
                    dispatch.token_split(&plan, counts, g, int_tokens);
                    plan.shares_of_tokens(counts, int_tokens.iter().map(|&n| f64::from(n)))
                }
                PolicyKind::Moeless => water_fill_shares(&plan, predicted, g),
                _ => {
                    let rc = plan.replica_counts(num_experts);
                    plan.instances
                        .iter()
                        .map(|i| 1.0 / rc[i.expert as usize] as f64)
                        .collect()
                }
            };
            for (inst, s) in plan.instances.iter_mut().zip(&shares) {
                inst.share = *s;
            }
            let frac_shares: &[f64] = frac_shares.as_deref().unwrap_or(&shares);
            for v in idx_by_expert.iter_mut() {
                v.clear();
            }
            for (i, inst) in plan.instances.iter().enumerate() {
                idx_by_expert[inst.expert as usize].push(i);
            }
            let mut gpu_tok = vec![0u32; g];
            let mut gpu_active = vec![0u32; g];
            let mut gpu_frac = vec![0.0f64; g];
            let mut stalls = 0u64;
            inst_tokens.clear();
            inst_tokens.resize(plan.instances.len(), 0);
            for (e, &c) in counts.iter().enumerate() {
                if c == 0 {
                    continue;
                }
                last_routed[e] = t;
                if idx_by_expert[e].is_empty() {
                    // Cold start: wait for a loading instance, or create one now.
                    stalls += 1;
                    let gpu = match fleet.layers[l].iter().find(|s| s.expert as usize == e) {
                        Some(s) => s.gpu,
                        None => {
                            let gpu = least_loaded_free_gpu(fleet, l, &gpu_tok)
                                .unwrap_or_else(|| evict_replica(fleet, l, &gpu_tok));
                            fleet.create(l, e as u32, gpu as u32, t, 0);
                            gpu as u32
                        }
                    };
                    gpu_tok[gpu as usize] += c;
                    gpu_active[gpu as usize] += 1;
                    gpu_frac[gpu as usize] += c as f64;
                    plan.instances.push(Instance {
                        expert: e as u32,
                        gpu,
                        share: 1.0,
                    });
                    idx_by_expert[e].push(plan.instances.len() - 1);
                    inst_tokens.push(c);
                    continue;
                }
                let idx = &idx_by_expert[e];
                sh.clear();
                sh.extend(idx.iter().map(|&i| plan.instances[i].share));
                split_tokens_with(c, sh, split, rema);
                for (&i, &n) in idx.iter().zip(split.iter()) {
                    inst_tokens[i] = n;
                    let gpu = plan.instances[i].gpu as usize;
                    gpu_tok[gpu] += n;
                    gpu_active[gpu] += u32::from(n > 0);
                    gpu_frac[gpu] += c as f64 * frac_shares[i];
                }
            }
            let routes = &step.routes[l];
            let token_choices: u32 = counts.iter().sum();
            let mut gpu_copies = Vec::new();
            if count_copies && top_k > 0 && !routes.is_empty() && routes.len() == token_choices as usize {
                let gpu_of: Vec<u32> = plan.instances.iter().map(|i| i.gpu).collect();
                let mode = if policy == PolicyKind::Moeless && cfg.colocate {
                    Assignment::Colocated
                } else {
                    Assignment::Sequential
                };
                report.dispatch_gpu_copies +=
                    assigner.gpu_copies(routes, top_k, &gpu_of, inst_tokens, idx_by_expert, mode);
                report.dispatch_token_layers += (routes.len() / top_k) as u64;
                gpu_copies = vec![0u32; g];
                for (c, &r) in gpu_copies.iter_mut().zip(assigner.received()) {
                    *c = r;
                }
            }
            let total: u32 = gpu_tok.iter().sum();
            let max = *gpu_tok.iter().max().expect("at least one GPU");
            let bal = if max == 0 {
                1.0
            } else {
                total as f64 / g as f64 / max as f64
            };
            step_bal += bal;
            let fmax = gpu_frac.iter().fold(0.0f64, |a, &b| a.max(b));
            *frac_sum += if fmax > 0.0 {
                total as f64 / g as f64 / fmax
            } else {
                1.0
            };
            report.layer_time_proxy += max as f64 + stalls as f64 * cfg.stall_penalty;
            report.cold_start_stalls += stalls;
            if cfg.record_plans {
                report.plans.push(plan);
            }
            step_tokens.push(LayerOutcome {
                gpu_tokens: gpu_tok,
                stalls,
                gpu_active_instances: gpu_active,
                gpu_copies,
            });
            history.observe(l, &step.routes[l], counts);
            predictor.observe(l, &step.routes[l], counts);
            if let Some(c) = coactivation.as_mut() {
                c.observe(l, &step.routes[l], top_k);
            }
        }
        let sb = step_bal / layers as f64;
        self.bal_sum += sb;
        if self.keep_step_detail {
            report.step_balancedness.push(sb);
            report.gpu_tokens.push(
                step_tokens
                    .iter()
                    .map(|o: &LayerOutcome| o.gpu_tokens.clone())
                    .collect(),
            );
        }
        report.steps += 1;
        report.instance_slot_steps += fleet.layers.iter().map(|s| s.len() as u64).sum::<u64>();
        let mut used = vec![0usize; g];
        for slots in &fleet.layers {
            used.iter_mut().for_each(|u| *u = 0);
            for s in slots {
                used[s.gpu as usize] += 1;
            }
            report.peak_gpu_slots = report.peak_gpu_slots.max(used.iter().copied().max().unwrap_or(0));
        }
        self.last = step_tokens;
        self.t += 1;
        Ok(())
    }

    /// The report of all steps run.
    pub fn finish(mut self) -> ReplayReport {
        let steps = self.report.steps;
        self.report.balancedness_mean = if steps == 0 { 0.0 } else { self.bal_sum / steps as f64 };
        self.report.balancedness_fractional = if steps == 0 {
            0.0
        } else {
            self.frac_sum / (steps * self.layers) as f64
        };
        if !self.fractional_metric {
            self.report.balancedness_fractional = f64::NAN;
        }
        self.report.instances_created = self.fleet.created;
        self.report
    }
}

/// One MoEless plan from scratch for per-layer `loads` (predicted): start from static EP, run
/// the scaling step of replay once per layer (no creation delay, nothing idle yet), then
/// water-fill each expert's shares over its instances. What `moeless plan` times.
///
/// Layers are planned independently, so they are split over the machine's cores (scoped
/// threads, contiguous runs of layers); the plan is the same for any thread count.
pub fn moeless_plan(loads: &crate::plan::LoadMatrix, cfg: &ReplayConfig) -> Result<crate::plan::Plan, PlanError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    moeless_plan_with_threads(loads, cfg, threads)
}

/// [`moeless_plan`] on at most `threads` threads (1: on the caller's thread).
pub fn moeless_plan_with_threads(
    loads: &crate::plan::LoadMatrix,
    cfg: &ReplayConfig,
    threads: usize,
) -> Result<crate::plan::Plan, PlanError> {
    let (g, e) = (cfg.gpus, loads.num_experts());
    let budget = cfg.instance_budget.unwrap_or(usize::MAX).min(g * cfg.slots_per_gpu);
    if g == 0 || budget < e {
        return Err(PlanError::BudgetTooSmall {
            gpus: g,
            slots_per_gpu: cfg.slots_per_gpu,
            total: budget,
            experts: e,
        });
    }
    let initial = static_ep(e, g)?;
    let layers = loads.num_layers();
    let threads = threads.clamp(1, layers.max(1));
    let per = layers.div_ceil(threads).max(1);
    let plan_run = |from: usize| plan_layers(loads, from..(from + per).min(layers), cfg, &initial);
    let mut plan = crate::plan::Plan::default();
    if threads == 1 {
        plan.layers = plan_run(0);
        return Ok(plan);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..layers)
            .step_by(per)
            .map(|from| scope.spawn(move || plan_run(from)))
            .collect();
        for h in handles {
            // A panic in a planning thread is a bug; surface it rather than return part of a plan.
            plan.layers
                .extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    Ok(plan)
}

/// The MoEless plans of `range`'s layers, each scaled from `initial`.
fn plan_layers(
    loads: &crate::plan::LoadMatrix,
    range: std::ops::Range<usize>,
    cfg: &ReplayConfig,
    initial: &LayerPlan,
) -> Vec<LayerPlan> {
    let (g, e) = (cfg.gpus, loads.num_experts());
    let mut fleet = Fleet {
        layers: vec![Vec::new()],
        gpus: g,
        slots_per_gpu: cfg.slots_per_gpu,
        delay: 0,
        created: 0,
        head: Vec::new(),
        next_slot: Vec::new(),
    };
    let never_idle = vec![0usize; e];
    let mut fill = ShareFill::new(e, g);
    let mut out = Vec::with_capacity(range.len());
    for l in range {
        fleet.set_warm(0, initial, 0);
        let signals = LayerSignals {
            predicted: loads.layer(l),
            last_routed: &never_idle,
            colocation: None,
        };
        scale_layer(&mut fleet, 0, &signals, 0, cfg, &mut fill);
        // `fill` mirrors the layer's instances when scaling returns.
        let shares = fill.fill(loads.layer(l));
        out.push(LayerPlan {
            instances: fleet.layers[0]
                .iter()
                .zip(shares)
                .map(|(s, &share)| Instance {
                    expert: s.expert,
                    gpu: s.gpu,
                    share,
                })
                .collect(),
        });
    }
    out
}

/// Free a slot for a cold start when every slot is taken: drop one replica (some expert must
/// hold two, since there are at least as many slots as experts and this one holds none),
/// preferring the least loaded GPU. Returns the GPU whose slot was freed.
fn evict_replica(fleet: &mut Fleet, layer: usize, load: &[u32]) -> usize {
    let slots = &mut fleet.layers[layer];
    let mut count = std::collections::HashMap::new();
    for s in slots.iter() {
        *count.entry(s.expert).or_insert(0u32) += 1;
    }
    let victim = (0..slots.len())
        .filter(|&i| count[&slots[i].expert] > 1)
        .min_by_key(|&i| (load[slots[i].gpu as usize], slots[i].last_needed, i));
    match victim {
        Some(i) => slots.swap_remove(i).gpu as usize,
        None => (0..load.len()).min_by_key(|&i| (load[i], i)).unwrap_or(0),
    }
}

fn least_loaded_free_gpu(fleet: &Fleet, layer: usize, load: &[u32]) -> Option<usize> {
    (0..fleet.gpus)
        .filter(|&gp| fleet.used_on(layer, gp) < fleet.slots_per_gpu)
        .min_by_key(|&gp| (load[gp], gp))
}

/// A home swap must raise same-GPU pair weight by this fraction of the layer's total.
const REHOME_MIN_GAIN: f64 = 1e-3;

/// Move experts towards their homes (see [`CoActivation::cluster_homes`]): an expert without
/// an instance at home gets one there (a cold start with the creation delay; a GPU without a
/// free slot gives up its least useful replica, or the move waits), and once that instance is
/// warm the instances marked `retire` are dropped. Tokens never wait: the old instance serves
/// until the new one is warm.
fn rehome_layer(fleet: &mut Fleet, layer: usize, homes: &[u32], predicted: &[f64], now: usize, cfg: &ReplayConfig) {
    let g = fleet.gpus;
    let e = predicted.len();
    if homes.len() != e {
        return;
    }
    let budget = cfg.instance_budget.unwrap_or(usize::MAX).min(g * fleet.slots_per_gpu);
    // Per expert: 1 = an instance at home, 2 = a warm one.
    let mut at_home = vec![0u8; e];
    let mut count = vec![0u32; e];
    let mut ready = vec![0u32; e];
    let mut used = vec![0usize; g];
    for s in &fleet.layers[layer] {
        let x = s.expert as usize;
        count[x] += 1;
        ready[x] += u32::from(s.ready_at <= now);
        used[s.gpu as usize] += 1;
        if s.gpu == homes[x] {
            at_home[x] = at_home[x].max(if s.ready_at <= now { 2 } else { 1 });
        }
    }
    for x in 0..e {
        if at_home[x] != 0 || count[x] == 0 {
            continue;
        }
        let h = homes[x] as usize;
        if h >= g {
            continue;
        }
        if used[h] >= fleet.slots_per_gpu || fleet.layers[layer].len() >= budget {
            // Give up the replica on the home GPU that carries the least predicted load per
            // instance, if it is not its expert's home or last instance.
            let victim = (0..fleet.layers[layer].len())
                .filter(|&i| {
                    let s = fleet.layers[layer][i];
                    let x = s.expert as usize;
                    s.gpu as usize == h && homes[x] != s.gpu && (s.ready_at > now || ready[x] > 1)
                })
                .min_by(|&a, &b| {
                    let p = |i: usize| {
                        let s = fleet.layers[layer][i];
                        predicted[s.expert as usize] / f64::from(count[s.expert as usize])
                    };
                    p(a).total_cmp(&p(b)).then(a.cmp(&b))
                });
            let Some(v) = victim else { continue };
            let s = fleet.layers[layer].swap_remove(v);
            count[s.expert as usize] -= 1;
            ready[s.expert as usize] -= u32::from(s.ready_at <= now);
            used[s.gpu as usize] -= 1;
        }
        fleet.create(layer, x as u32, h as u32, now, fleet.delay);
        count[x] += 1;
        used[h] += 1;
    }
    fleet.layers[layer].retain(|s| !(s.retire && at_home[s.expert as usize] == 2 && s.gpu != homes[s.expert as usize]));
}

/// What co-located replica placement needs: the learned pairings, how much load it may trade
/// for them, and scratch.
struct Colocation<'a> {
    coactivation: &'a CoActivation,
    slack: f64,
    affinity: Vec<f64>,
}

/// The GPU for a new replica among `candidates`: the least loaded (lowest index on ties), or,
/// with co-location, the one whose instances share the most tokens with `expert` among the
/// candidates within the slack of the least loaded and at most `cap`.
fn replica_destination(
    candidates: impl Iterator<Item = usize> + Clone,
    load: &[f64],
    cap: f64,
    colocation: Option<&mut Colocation>,
    (layer, expert, instances): (usize, u32, &[(u32, u32)]),
) -> Option<usize> {
    let least = candidates
        .clone()
        .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))?;
    let Some(c) = colocation else {
        return Some(least);
    };
    c.coactivation.gpu_affinity(layer, expert, instances, &mut c.affinity);
    let limit = (load[least] + c.slack).min(cap);
    let best = candidates
        .filter(|&gp| load[gp] <= limit && c.affinity[gp] > c.affinity[least])
        .max_by(|&a, &b| {
            c.affinity[a]
                .total_cmp(&c.affinity[b])
                .then(load[b].total_cmp(&load[a]))
                .then(b.cmp(&a))
        });
    Some(best.unwrap_or(least))
}

/// What MoEless knows about a layer when it scales it.
struct LayerSignals<'a> {
    /// Predicted tokens per expert.
    predicted: &'a [f64],
    /// Last step at which each expert was routed tokens.
    last_routed: &'a [usize],
    /// Learned pairings and the experts' home GPUs, when co-locating.
    colocation: Option<(&'a CoActivation, &'a [u32])>,
}

/// MoEless scaling for one layer before it runs: drop replicas unneeded for `keep_alive`
/// steps (and, if enabled, idle experts' last instances), then add replicas of the experts
/// that load the most loaded GPU (by predicted load) onto the least loaded GPU with a free
/// slot, until predicted GPU loads are within tolerance or the slot budget is used.
///
/// `fill` is scratch state reused across calls; it mirrors the layer's instances while this
/// runs, so each added replica costs one incremental re-fill rather than a rebuilt plan.
fn scale_layer(
    fleet: &mut Fleet,
    layer: usize,
    signals: &LayerSignals,
    now: usize,
    cfg: &ReplayConfig,
    fill: &mut ShareFill,
) {
    let g = fleet.gpus;
    let (predicted, last_routed) = (signals.predicted, signals.last_routed);
    let (coactivation, homes) = signals.colocation.unzip();
    let e = predicted.len();
    let total: f64 = predicted.iter().sum();
    let mut colocation = coactivation.filter(|c| c.knows(layer)).map(|c| Colocation {
        coactivation: c,
        slack: cfg.colocate_slack * total / g as f64,
        affinity: vec![0.0; g],
    });
    let target = total / g as f64 * cfg.balance_tolerance;
    let sync = |fill: &mut ShareFill, slots: &[Slot]| fill.reset(slots.iter().map(|s| (s.expert, s.gpu)));

    // Which instances the prediction needs now: at least half a token by the predicted shares,
    // or a replica of an expert hot enough to be kept fluid (see `fluid_tokens`).
    sync(fill, &fleet.layers[layer]);
    fill.fill(predicted);
    let mut count = vec![0u32; e];
    for s in &fleet.layers[layer] {
        count[s.expert as usize] += 1;
    }
    for (s, sh) in fleet.layers[layer].iter_mut().zip(fill.shares()) {
        let p = predicted[s.expert as usize];
        let fluid = cfg.fluid_tokens > 0.0 && p / f64::from(count[s.expert as usize]) >= cfg.fluid_tokens / 2.0;
        if sh * p >= 0.5 || fluid {
            s.last_needed = now;
        }
    }
    // Keep-alive: drop idle replicas (only while another instance of the expert is warm);
    // scale idle experts to zero if enabled.
    let mut ready = vec![0u32; e];
    for s in fleet.layers[layer].iter().filter(|s| s.ready_at <= now) {
        ready[s.expert as usize] += 1;
    }
    let mut dropped = false;
    let mut i = 0;
    while i < fleet.layers[layer].len() {
        let s = fleet.layers[layer][i];
        let idle = now.saturating_sub(s.last_needed);
        let ex = s.expert as usize;
        // An expert's instance at its home (co-location) is never dropped as an idle replica.
        let home = homes.is_some_and(|h| h.get(ex) == Some(&s.gpu));
        let drop = if count[ex] > 1 {
            idle > cfg.keep_alive && s.ready_at <= now && ready[ex] > 1 && !home
        } else {
            cfg.scale_to_zero_after
                .is_some_and(|z| now.saturating_sub(last_routed[ex].max(s.last_needed)) > z)
                && predicted[ex] < 0.5
        };
        if drop {
            fleet.layers[layer].swap_remove(i);
            dropped = true;
            count[ex] -= 1;
            if s.ready_at <= now {
                ready[ex] -= 1;
            }
        } else {
            i += 1;
        }
    }
    if dropped {
        sync(fill, &fleet.layers[layer]);
    }

    // Add replicas greedily where the predicted max is.
    let budget = cfg.instance_budget.unwrap_or(usize::MAX).min(g * fleet.slots_per_gpu);
    let mut used = vec![0usize; g];
    for s in &fleet.layers[layer] {
        used[s.gpu as usize] += 1;
    }
    let mut load = vec![0.0; g];
    // Bound the work per layer: at most one new replica per free slot.
    for _ in 0..budget {
        fill.fill(predicted);
        let (instances, shares) = (fill.instances(), fill.shares());
        load.iter_mut().for_each(|x| *x = 0.0);
        for (&(ex, gp), sh) in instances.iter().zip(shares) {
            load[gp as usize] += sh * predicted[ex as usize];
        }
        let hot_gpu = (0..g)
            .max_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)))
            .expect("at least one GPU");
        if load[hot_gpu] <= target {
            break;
        }
        // The expert contributing most to the hottest GPU.
        let mut best: Option<(f64, u32)> = None;
        for (&(ex, gp), sh) in instances.iter().zip(shares) {
            if gp as usize == hot_gpu {
                let c = sh * predicted[ex as usize];
                if best.is_none_or(|b| c > b.0) {
                    best = Some((c, ex));
                }
            }
        }
        let Some((contrib, expert)) = best else { break };
        if contrib < 1.0 {
            break;
        }
        let dest = replica_destination(
            (0..g).filter(|&gp| !fill.holds(expert, gp as u32)),
            &load,
            load[hot_gpu] - 1.0,
            colocation.as_mut(),
            (layer, expert, fill.instances()),
        );
        let Some(dest) = dest else { break };
        // Only worth it if the destination has room below the hot GPU's load.
        if load[dest] + 1.0 > load[hot_gpu] {
            break;
        }
        if fleet.layers[layer].len() >= budget && used[dest] < fleet.slots_per_gpu {
            // The instance budget, not this GPU, is full: stop rather than churn replicas.
            break;
        }
        if used[dest] >= fleet.slots_per_gpu {
            // Full: reuse the slot of the replica there that carries the least predicted load,
            // if it carries less than half a token (never an expert's last instance).
            let mut counts = vec![0u32; e];
            for s in fleet.layers[layer].iter().filter(|s| s.ready_at <= now) {
                counts[s.expert as usize] += 1;
            }
            let victim = instances
                .iter()
                .zip(shares)
                .enumerate()
                .filter(|(i, (&(ex, gp), _))| {
                    gp as usize == dest && counts[ex as usize] > 1 && fleet.layers[layer][*i].ready_at <= now
                })
                .map(|(i, (&(ex, _), sh))| (i, sh * predicted[ex as usize]))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            match victim {
                Some((i, c)) if c < 0.5 => {
                    fleet.layers[layer].swap_remove(i);
                }
                _ => break,
            }
            fleet.create(layer, expert, dest as u32, now, fleet.delay);
            sync(fill, &fleet.layers[layer]);
        } else {
            used[dest] += 1;
            fleet.create(layer, expert, dest as u32, now, fleet.delay);
            fill.push(expert, dest as u32);
        }
    }

    // Spend the free slots left on spreading the hottest experts, so that the per-step
    // dispatch can move their tokens around and absorb what the prediction missed.
    if cfg.fluid_tokens <= 0.0 {
        return;
    }
    let mut count = vec![0u32; e];
    for s in &fleet.layers[layer] {
        count[s.expert as usize] += 1;
    }
    load.iter_mut().for_each(|x| *x = 0.0);
    for s in &fleet.layers[layer] {
        load[s.gpu as usize] += predicted[s.expert as usize] / f64::from(count[s.expert as usize]);
    }
    while let Some(expert) = (0..e)
        .filter(|&x| count[x] > 0 && (count[x] as usize) < g)
        .max_by(|&a, &b| {
            (predicted[a] / f64::from(count[a]))
                .total_cmp(&(predicted[b] / f64::from(count[b])))
                .then(b.cmp(&a))
        })
    {
        if predicted[expert] / f64::from(count[expert]) <= cfg.fluid_tokens {
            break;
        }
        let dest = replica_destination(
            (0..g).filter(|&gp| used[gp] < fleet.slots_per_gpu && !fill.holds(expert as u32, gp as u32)),
            &load,
            f64::INFINITY,
            colocation.as_mut(),
            (layer, expert as u32, fill.instances()),
        );
        let Some(dest) = dest else { break };
        if fleet.layers[layer].len() >= budget {
            break;
        }
        fleet.create(layer, expert as u32, dest as u32, now, fleet.delay);
        fill.push(expert as u32, dest as u32);
        used[dest] += 1;
        count[expert] += 1;
        load[dest] += predicted[expert] / f64::from(count[expert]);
    }
}
