//! Placement plans: which expert instances sit on which GPU, and how each expert's tokens are
//! split across its instances (dispatch shares).

use thiserror::Error;

/// Why a plan could not be made. Bad inputs are errors, never panics.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("load of layer {layer}, expert {expert} is {value}: loads must be finite and >= 0")]
    BadLoad { layer: usize, expert: usize, value: f64 },
    #[error("layer {layer} has {found} experts, expected {expected} (all layers must agree)")]
    RaggedLoads {
        layer: usize,
        expected: usize,
        found: usize,
    },
    #[error("no layers or no experts in the load matrix")]
    EmptyLoads,
    #[error("budget too small: {gpus} GPUs x {slots_per_gpu} slots = {total} slots cannot hold {experts} experts")]
    BudgetTooSmall {
        gpus: usize,
        slots_per_gpu: usize,
        total: usize,
        experts: usize,
    },
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// Per-layer, per-expert load (tokens, or any non-negative weight), validated on construction.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadMatrix {
    loads: Vec<Vec<f64>>,
}

impl LoadMatrix {
    pub fn new(loads: Vec<Vec<f64>>) -> Result<Self, PlanError> {
        let expected = loads.first().map(|l| l.len()).unwrap_or(0);
        if expected == 0 {
            return Err(PlanError::EmptyLoads);
        }
        for (layer, row) in loads.iter().enumerate() {
            if row.len() != expected {
                return Err(PlanError::RaggedLoads {
                    layer,
                    expected,
                    found: row.len(),
                });
            }
            check_loads(layer, row)?;
        }
        Ok(Self { loads })
    }
    pub fn num_layers(&self) -> usize {
        self.loads.len()
    }
    pub fn num_experts(&self) -> usize {
        self.loads[0].len()
    }
    pub fn layer(&self, l: usize) -> &[f64] {
        &self.loads[l]
    }
}

/// Check one layer's loads: finite and non-negative.
pub fn check_loads(layer: usize, loads: &[f64]) -> Result<(), PlanError> {
    match loads.iter().position(|v| !v.is_finite() || *v < 0.0) {
        Some(expert) => Err(PlanError::BadLoad {
            layer,
            expert,
            value: loads[expert],
        }),
        None => Ok(()),
    }
}

/// One instance of an expert on a GPU, with the fraction of that expert's tokens it receives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Instance {
    pub expert: u32,
    pub gpu: u32,
    pub share: f64,
}

/// The instances of one MoE layer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerPlan {
    pub instances: Vec<Instance>,
}

impl LayerPlan {
    /// Expected load per GPU if each expert's `loads` are split by the shares.
    pub fn gpu_loads(&self, loads: &[f64], gpus: usize) -> Vec<f64> {
        let mut g = vec![0.0; gpus];
        for i in &self.instances {
            g[i.gpu as usize] += loads[i.expert as usize] * i.share;
        }
        g
    }

    /// Shares from `tokens` per instance (aligned with `instances`) out of each expert's routed
    /// `counts`; an expert without tokens splits evenly over its instances.
    pub fn shares_of_tokens(&self, counts: &[u32], tokens: impl IntoIterator<Item = f64>) -> Vec<f64> {
        let rc = self.replica_counts(counts.len());
        self.instances
            .iter()
            .zip(tokens)
            .map(|(i, n)| match counts[i.expert as usize] {
                0 => 1.0 / f64::from(rc[i.expert as usize]),
                c => n / f64::from(c),
            })
            .collect()
    }

    /// Number of instances of each expert.
    pub fn replica_counts(&self, num_experts: usize) -> Vec<u32> {
        let mut c = vec![0u32; num_experts];
        for i in &self.instances {
            c[i.expert as usize] += 1;
        }
        c
    }
}

/// A full placement: one [`LayerPlan`] per MoE layer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub layers: Vec<LayerPlan>,
}

/// Static expert parallelism (Megatron-LM): expert `e` on GPU `e / (E/G)`, one instance each.
pub fn static_ep(num_experts: usize, gpus: usize) -> Result<LayerPlan, PlanError> {
    if gpus == 0 || !num_experts.is_multiple_of(gpus) {
        return Err(PlanError::Shape(format!(
            "static EP needs the {num_experts} experts to divide evenly over {gpus} GPUs"
        )));
    }
    let per = num_experts / gpus;
    Ok(LayerPlan {
        instances: (0..num_experts)
            .map(|e| Instance {
                expert: e as u32,
                gpu: (e / per) as u32,
                share: 1.0,
            })
            .collect(),
    })
}

/// Split `count` tokens of one expert across instances by `shares` (summing to 1), as integers:
/// floor of each share, then the remaining tokens to the largest remainders (lowest index first
/// on ties). The result always sums to `count`.
pub fn split_tokens(count: u32, shares: &[f64], out: &mut Vec<u32>) {
    split_tokens_with(count, shares, out, &mut Vec::new());
}

/// [`split_tokens`] with the remainders' working memory supplied by the caller (for hot loops).
pub fn split_tokens_with(count: u32, shares: &[f64], out: &mut Vec<u32>, rema: &mut Vec<(f64, usize)>) {
    out.clear();
    if shares.len() == 1 {
        out.push(count);
        return;
    }
    let mut given = 0u32;
    rema.clear();
    for (i, s) in shares.iter().enumerate() {
        let exact = count as f64 * s;
        // Shares recorded as `n / count` must give back `n` despite rounding.
        let fl = ((exact + 1e-9).floor() as u32).min(count - given);
        given += fl;
        out.push(fl);
        rema.push((exact - fl as f64, i));
    }
    rema.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = count - given;
    let mut j = 0;
    while left > 0 {
        out[rema[j % rema.len()].1] += 1;
        left -= 1;
        j += 1;
    }
}

/// Min-max dispatch of routed counts over a layer's instances, with its working memory kept
/// between calls (the replay and the simulator run it for every layer of every step).
///
/// The flow problem: experts held on several GPUs ("fluid") send their tokens to any GPU
/// holding them; everything else is a fixed load. All amounts are integers (tokens, possibly
/// scaled by a common factor) so that the result is exact. Fluid experts, their holders and
/// each GPU's holders are kept in flat arrays (offsets per expert and per GPU).
#[derive(Debug, Default, Clone)]
pub struct MinMaxDispatch {
    /// Per fluid expert `j`: its holders are `h_start[j]..h_start[j + 1]`.
    h_start: Vec<usize>,
    /// Per fluid expert: its unscaled count, and what is not yet placed (scaled).
    amount: Vec<u64>,
    left: Vec<u64>,
    /// Per holder (a distinct GPU of a fluid expert, its first instance there): GPU, instance,
    /// fluid expert, and the amount placed there.
    h_gpu: Vec<usize>,
    h_inst: Vec<usize>,
    h_fluid: Vec<usize>,
    flow: Vec<u64>,
    /// Per GPU: unscaled fixed load, current (scaled) load, and its holders
    /// `g_hold[g_start[g]..g_start[g + 1]]` in fluid order.
    fixed: Vec<u64>,
    load: Vec<u64>,
    g_start: Vec<usize>,
    g_hold: Vec<usize>,
    /// Experts held on one GPU with tokens: (first instance, count).
    single: Vec<(usize, u32)>,
    /// Unscaled tokens of experts that have an instance.
    total: u64,
    // Scratch.
    e_start: Vec<usize>,
    e_gpu: Vec<usize>,
    e_inst: Vec<usize>,
    e_len: Vec<usize>,
    /// Search marks: `gpu_from[g]` / `expert_via[j]` are valid only where `*_mark` equals the
    /// current search's stamp (so nothing is cleared between augmenting paths).
    gpu_from: Vec<usize>,
    gpu_mark: Vec<u32>,
    expert_via: Vec<usize>,
    expert_mark: Vec<u32>,
    stamp: u32,
    queue: Vec<usize>,
    order: Vec<(u64, usize, usize)>,
    best_flow: Vec<u64>,
    int_tokens: Vec<u32>,
}

const NONE: usize = usize::MAX;

impl MinMaxDispatch {
    /// Split the experts of `plan` with non-zero `counts` into fixed load and fluid experts
    /// (amounts unscaled; [`Self::rescale`] sets the scale).
    fn build(&mut self, plan: &LayerPlan, counts: &[u32], gpus: usize) {
        let e = counts.len();
        // Distinct GPUs of every expert, first instance on each, in plan order.
        self.e_start.clear();
        self.e_start.resize(e + 1, 0);
        for inst in &plan.instances {
            self.e_start[inst.expert as usize + 1] += 1;
        }
        for x in 0..e {
            self.e_start[x + 1] += self.e_start[x];
        }
        let n = plan.instances.len();
        self.e_gpu.clear();
        self.e_gpu.resize(n, 0);
        self.e_inst.clear();
        self.e_inst.resize(n, 0);
        self.e_len.clear();
        self.e_len.resize(e, 0);
        for (i, inst) in plan.instances.iter().enumerate() {
            let x = inst.expert as usize;
            let (s, len) = (self.e_start[x], self.e_len[x]);
            let g = inst.gpu as usize;
            if !self.e_gpu[s..s + len].contains(&g) {
                self.e_gpu[s + len] = g;
                self.e_inst[s + len] = i;
                self.e_len[x] += 1;
            }
        }
        self.h_start.clear();
        self.h_start.push(0);
        self.amount.clear();
        self.h_gpu.clear();
        self.h_inst.clear();
        self.h_fluid.clear();
        self.single.clear();
        self.fixed.clear();
        self.fixed.resize(gpus, 0);
        self.total = 0;
        for (x, &c) in counts.iter().enumerate() {
            let (s, len) = (self.e_start[x], self.e_len[x]);
            if c == 0 || len == 0 {
                continue;
            }
            self.total += u64::from(c);
            if len == 1 {
                self.fixed[self.e_gpu[s]] += u64::from(c);
                self.single.push((self.e_inst[s], c));
            } else {
                let j = self.amount.len();
                self.amount.push(u64::from(c));
                self.h_gpu.extend_from_slice(&self.e_gpu[s..s + len]);
                self.h_inst.extend_from_slice(&self.e_inst[s..s + len]);
                self.h_fluid.extend(std::iter::repeat_n(j, len));
                self.h_start.push(self.h_gpu.len());
            }
        }
        // Holders per GPU, in fluid order.
        self.g_start.clear();
        self.g_start.resize(gpus + 1, 0);
        for &g in &self.h_gpu {
            self.g_start[g + 1] += 1;
        }
        for g in 0..gpus {
            self.g_start[g + 1] += self.g_start[g];
        }
        self.g_hold.clear();
        self.g_hold.resize(self.h_gpu.len(), 0);
        // `e_len` is free again: reuse it as the per-GPU fill cursor.
        self.e_len.clear();
        self.e_len.extend_from_slice(&self.g_start[..gpus]);
        for (h, &g) in self.h_gpu.iter().enumerate() {
            self.g_hold[self.e_len[g]] = h;
            self.e_len[g] += 1;
        }
    }

    /// Start over with every amount multiplied by `scale`.
    fn rescale(&mut self, scale: u64) {
        self.load.clear();
        self.load.extend(self.fixed.iter().map(|&f| f * scale));
        self.left.clear();
        self.left.extend(self.amount.iter().map(|&a| a * scale));
        self.flow.clear();
        self.flow.resize(self.h_gpu.len(), 0);
    }

    /// A stamp no mark holds yet: it forgets every mark of the previous search.
    fn new_stamp(&mut self) -> u32 {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.gpu_mark.iter_mut().for_each(|m| *m = 0);
            self.expert_mark.iter_mut().for_each(|m| *m = 0);
            self.stamp = 1;
        }
        self.stamp
    }

    /// Push as much as possible with every GPU capped at `cap` (augmenting paths, bottleneck
    /// amounts). Returns whether everything is placed; the flow stays valid for a larger cap.
    fn fill(&mut self, cap: u64) -> bool {
        let nf = self.amount.len();
        let gpus = self.load.len();
        self.gpu_from.resize(gpus, NONE);
        self.gpu_mark.resize(gpus, 0);
        self.expert_via.resize(nf, NONE);
        self.expert_mark.resize(nf, 0);
        loop {
            let mut progressed = false;
            for j0 in 0..nf {
                while self.left[j0] > 0 {
                    let stamp = self.new_stamp();
                    self.queue.clear();
                    self.queue.push(j0);
                    let mut found = None;
                    let mut qi = 0;
                    'bfs: while qi < self.queue.len() {
                        let j = self.queue[qi];
                        qi += 1;
                        // Least loaded holders first, so that ties fill evenly.
                        self.order.clear();
                        for h in self.h_start[j]..self.h_start[j + 1] {
                            let g = self.h_gpu[h];
                            self.order.push((self.load[g], g, h));
                        }
                        self.order.sort_unstable();
                        for oi in 0..self.order.len() {
                            let (_, g, h) = self.order[oi];
                            if self.gpu_mark[g] == stamp {
                                continue;
                            }
                            self.gpu_mark[g] = stamp;
                            self.gpu_from[g] = h;
                            if self.load[g] < cap {
                                found = Some(g);
                                break 'bfs;
                            }
                            for &h2 in &self.g_hold[self.g_start[g]..self.g_start[g + 1]] {
                                let j2 = self.h_fluid[h2];
                                if j2 != j0 && self.expert_mark[j2] != stamp && self.flow[h2] > 0 {
                                    self.expert_mark[j2] = stamp;
                                    self.expert_via[j2] = h2;
                                    self.queue.push(j2);
                                }
                            }
                        }
                    }
                    let Some(end) = found else { break };
                    // Bottleneck: what j0 has left, room on the last GPU, flow on backward edges.
                    let mut amount = self.left[j0].min(cap - self.load[end]);
                    let mut g = end;
                    loop {
                        let j = self.h_fluid[self.gpu_from[g]];
                        if j == j0 {
                            break;
                        }
                        let back = self.expert_via[j];
                        amount = amount.min(self.flow[back]);
                        g = self.h_gpu[back];
                    }
                    self.load[end] += amount;
                    let mut g = end;
                    loop {
                        let h = self.gpu_from[g];
                        self.flow[h] += amount;
                        let j = self.h_fluid[h];
                        if j == j0 {
                            break;
                        }
                        let back = self.expert_via[j];
                        self.flow[back] -= amount;
                        g = self.h_gpu[back];
                    }
                    self.left[j0] -= amount;
                    progressed = true;
                }
            }
            if self.left.iter().all(|&l| l == 0) {
                return true;
            }
            if !progressed {
                return false;
            }
        }
    }

    /// After `fill(cap)` failed: a cap the optimum cannot be below. Every GPU reachable (in the
    /// residual graph) from an expert with tokens left is at `cap`, and no flow can leave that
    /// set, so its GPUs must also absorb what is left: the optimum is at least
    /// `cap + ceil(left / |set|)`. Jumping there (instead of one token at a time) keeps the
    /// result exact.
    fn next_cap(&mut self, cap: u64) -> u64 {
        let stamp = self.new_stamp();
        self.queue.clear();
        let mut left = 0u64;
        for j in 0..self.amount.len() {
            if self.left[j] > 0 {
                left += self.left[j];
                self.expert_mark[j] = stamp;
                self.queue.push(j);
            }
        }
        let mut reached = 0u64;
        let mut qi = 0;
        while qi < self.queue.len() {
            let j = self.queue[qi];
            qi += 1;
            for h in self.h_start[j]..self.h_start[j + 1] {
                let g = self.h_gpu[h];
                if self.gpu_mark[g] == stamp {
                    continue;
                }
                self.gpu_mark[g] = stamp;
                reached += 1;
                for &h2 in &self.g_hold[self.g_start[g]..self.g_start[g + 1]] {
                    let j2 = self.h_fluid[h2];
                    if self.expert_mark[j2] != stamp && self.flow[h2] > 0 {
                        self.expert_mark[j2] = stamp;
                        self.queue.push(j2);
                    }
                }
            }
        }
        cap + left.div_ceil(reached.max(1)).max(1)
    }

    /// Integer dispatch of routed `counts` across the instances of `plan` that minimises the
    /// maximum tokens on a GPU, exactly: tokens of single-GPU experts are fixed, the rest is a
    /// bipartite flow (expert -> GPUs holding it) whose GPU capacity starts at the lower bound
    /// `max(ceil(total / gpus), max fixed load)` and grows to the next lower bound
    /// ([`Self::next_cap`]) whenever no augmenting path is left. Writes tokens per instance (aligned with `plan.instances`) into `out`;
    /// several instances of one expert on the same GPU: the first listed takes the GPU's tokens.
    pub fn token_split(&mut self, plan: &LayerPlan, counts: &[u32], gpus: usize, out: &mut Vec<u32>) {
        self.build(plan, counts, gpus);
        self.rescale(1);
        let mut cap = self.total.div_ceil(gpus.max(1) as u64);
        cap = cap.max(self.load.iter().copied().max().unwrap_or(0));
        while !self.fill(cap) {
            cap = self.next_cap(cap);
        }
        out.clear();
        out.resize(plan.instances.len(), 0);
        for &(i, c) in &self.single {
            out[i] = c;
        }
        for (&i, &f) in self.h_inst.iter().zip(&self.flow) {
            out[i] = f as u32;
        }
    }

    /// The smallest possible maximum GPU load when each expert's `counts` may be split across
    /// its instances in any real proportions, with shares that reach it (aligned with
    /// `plan.instances`). Exact: the optimum is `a / b` with `b` a number of GPUs (it is the load
    /// of some set of experts over the GPUs holding them), and lies within one token below the
    /// integer optimum, so a binary search over those fractions with integer flows (amounts
    /// scaled by `b`) finds it.
    pub fn fractional_split(&mut self, plan: &LayerPlan, counts: &[u32], gpus: usize) -> (f64, Vec<f64>) {
        let mut int_tokens = std::mem::take(&mut self.int_tokens);
        self.token_split(plan, counts, gpus, &mut int_tokens);
        let mut int_load = vec![0u64; gpus];
        for (inst, &n) in plan.instances.iter().zip(&int_tokens) {
            int_load[inst.gpu as usize] += u64::from(n);
        }
        let m_int = int_load.iter().copied().max().unwrap_or(0);
        let int_shares = plan.shares_of_tokens(counts, int_tokens.iter().map(|&n| f64::from(n)));
        self.int_tokens = int_tokens;
        if m_int == 0 {
            return (0.0, int_shares);
        }
        // Candidates a / b in (m_int - 1, m_int], ascending, deduplicated.
        let mut cand: Vec<(u64, u64)> = Vec::new();
        for b in 1..=gpus as u64 {
            for a in ((m_int - 1) * b + 1)..=(m_int * b) {
                cand.push((a, b));
            }
        }
        cand.sort_by(|x, y| (x.0 * y.1).cmp(&(y.0 * x.1)));
        cand.dedup_by(|x, y| x.0 * y.1 == y.0 * x.1);
        let (mut lo, mut hi) = (0usize, cand.len() - 1); // cand[hi] = m_int / 1 is feasible
                                                         // The fluid/fixed split does not depend on the scale: built once (by `token_split`).
        let mut best_scale = None;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (a, b) = cand[mid];
            self.rescale(b);
            let fixed_ok = self.load.iter().all(|&l| l <= a);
            if fixed_ok && self.fill(a) {
                hi = mid;
                best_scale = Some(b);
                self.best_flow.clear();
                self.best_flow.extend_from_slice(&self.flow);
            } else {
                lo = mid + 1;
            }
        }
        // `best_flow` is the flow found for `cand[hi]` whenever the search lowered `hi`.
        let (a, b) = cand[hi];
        let Some(scale) = best_scale else {
            return (m_int as f64, int_shares);
        };
        let mut tokens = vec![0.0; plan.instances.len()];
        for &(i, c) in &self.single {
            tokens[i] = f64::from(c);
        }
        for (&i, &f) in self.h_inst.iter().zip(&self.best_flow) {
            tokens[i] = f as f64 / scale as f64;
        }
        (a as f64 / b as f64, plan.shares_of_tokens(counts, tokens))
    }
}

/// One-off form of [`MinMaxDispatch::token_split`].
pub fn min_max_token_split(plan: &LayerPlan, counts: &[u32], gpus: usize) -> Vec<u32> {
    let mut out = Vec::new();
    MinMaxDispatch::default().token_split(plan, counts, gpus, &mut out);
    out
}

/// One-off form of [`MinMaxDispatch::fractional_split`].
pub fn min_max_fractional_split(plan: &LayerPlan, counts: &[u32], gpus: usize) -> (f64, Vec<f64>) {
    MinMaxDispatch::default().fractional_split(plan, counts, gpus)
}

/// Shares that minimise the maximum GPU load for given `loads`: for each replicated expert,
/// water-fill its load into its instances' GPUs on top of the load that is fixed there
/// (single-instance experts). Replicated experts are processed heaviest first.
/// Returns shares aligned with `plan.instances`. One-off form of [`ShareFill`].
pub fn water_fill_shares(plan: &LayerPlan, loads: &[f64], gpus: usize) -> Vec<f64> {
    let mut fill = ShareFill::new(loads.len(), gpus);
    fill.reset(plan.instances.iter().map(|i| (i.expert, i.gpu)));
    fill.fill(loads).to_vec()
}

/// The water-filling of [`water_fill_shares`] kept across calls, for planners that add
/// instances one at a time and re-fill after each: instances are grouped by expert as they are
/// pushed (no re-sort per fill), the load fixed on each GPU by single-instance experts is kept
/// and recomputed only for GPUs whose single-instance experts changed (or when the loads
/// change), and every buffer is reused. A re-fill after a push then costs a comparison of the
/// loads plus the replicated experts' instances. Results are bit-identical to
/// [`water_fill_shares`] on the same instances in the same order.
#[derive(Debug, Clone, Default)]
pub struct ShareFill {
    gpus: usize,
    /// `(expert, gpu)` per instance, in the caller's order.
    instances: Vec<(u32, u32)>,
    /// Per expert: its instance indices, ascending.
    by_expert: Vec<Vec<usize>>,
    /// Experts with two or more instances.
    replicated: Vec<usize>,
    /// Shares of the last fill; single-instance experts keep 1.0 between fills.
    shares: Vec<f64>,
    /// Per GPU: load of its single-instance experts, summed in expert order, for `fixed_for`.
    fixed: Vec<f64>,
    /// The loads `fixed` was computed from (empty: not computed).
    fixed_for: Vec<f64>,
    /// GPUs whose single-instance experts changed since `fixed` was computed.
    stale: Vec<usize>,
    /// Per GPU: load placed so far during a fill.
    level: Vec<f64>,
    levels: Vec<(f64, usize)>,
}

impl ShareFill {
    /// Empty state for layers of `num_experts` experts on `gpus` GPUs.
    pub fn new(num_experts: usize, gpus: usize) -> Self {
        Self {
            gpus,
            by_expert: vec![Vec::new(); num_experts],
            fixed: vec![0.0; gpus],
            level: vec![0.0; gpus],
            ..Self::default()
        }
    }

    /// Replace the instances by `(expert, gpu)` pairs, in order.
    pub fn reset(&mut self, instances: impl IntoIterator<Item = (u32, u32)>) {
        self.instances.clear();
        self.shares.clear();
        self.replicated.clear();
        self.by_expert.iter_mut().for_each(Vec::clear);
        self.fixed_for.clear();
        self.stale.clear();
        for (expert, gpu) in instances {
            self.push(expert, gpu);
        }
    }

    /// Append one instance (last in order).
    pub fn push(&mut self, expert: u32, gpu: u32) {
        let e = expert as usize;
        if e >= self.by_expert.len() {
            self.by_expert.resize(e + 1, Vec::new());
        }
        let n = self.by_expert[e].len();
        match n {
            // A new single-instance expert on `gpu`.
            0 => self.stale.push(gpu as usize),
            // The expert stops being fixed load on its first GPU.
            1 => {
                self.stale.push(self.instances[self.by_expert[e][0]].1 as usize);
                self.replicated.push(e);
            }
            _ => {}
        }
        self.by_expert[e].push(self.instances.len());
        self.instances.push((expert, gpu));
        self.shares.push(1.0);
    }

    /// `(expert, gpu)` of every instance, in order.
    pub fn instances(&self) -> &[(u32, u32)] {
        &self.instances
    }

    /// Whether `expert` has an instance on `gpu`.
    pub fn holds(&self, expert: u32, gpu: u32) -> bool {
        self.by_expert
            .get(expert as usize)
            .is_some_and(|idx| idx.iter().any(|&i| self.instances[i].1 == gpu))
    }

    /// The shares of the last [`ShareFill::fill`], aligned with [`ShareFill::instances`].
    pub fn shares(&self) -> &[f64] {
        &self.shares
    }

    /// Bring `fixed` up to date for `loads`, summing each GPU's single-instance experts in
    /// expert order (the summation order of the one-off form, so results match bit for bit).
    fn update_fixed(&mut self, loads: &[f64]) {
        if self.fixed_for.as_slice() != loads {
            self.fixed.clear();
            self.fixed.resize(self.gpus, 0.0);
            for (e, idx) in self.by_expert.iter().enumerate() {
                if idx.len() == 1 {
                    self.fixed[self.instances[idx[0]].1 as usize] += loads[e];
                }
            }
            self.fixed_for.clear();
            self.fixed_for.extend_from_slice(loads);
        } else if !self.stale.is_empty() {
            self.stale.sort_unstable();
            self.stale.dedup();
            for &g in &self.stale {
                let mut sum = 0.0;
                for (e, idx) in self.by_expert.iter().enumerate() {
                    if idx.len() == 1 && self.instances[idx[0]].1 as usize == g {
                        sum += loads[e];
                    }
                }
                self.fixed[g] = sum;
            }
        }
        self.stale.clear();
    }

    /// Water-fill `loads` (one per expert) into the instances; returns the shares.
    pub fn fill(&mut self, loads: &[f64]) -> &[f64] {
        self.update_fixed(loads);
        self.level.clear();
        self.level.extend_from_slice(&self.fixed);
        self.replicated
            .sort_by(|&x, &y| loads[y].total_cmp(&loads[x]).then(x.cmp(&y)));
        for &e in &self.replicated {
            let idx = &self.by_expert[e];
            let total = loads[e];
            if total <= 0.0 {
                for &i in idx {
                    self.shares[i] = 1.0 / idx.len() as f64;
                }
                continue;
            }
            // Water level w: sum over instances of max(0, w - base) = total. Two instances of
            // the same expert on one GPU share that GPU's level.
            self.levels.clear();
            for &i in idx {
                self.levels.push((self.level[self.instances[i].1 as usize], i));
            }
            self.levels.sort_by(|a, b| a.0.total_cmp(&b.0));
            let levels = &self.levels;
            let mut w = levels[0].0;
            let mut remaining = total;
            let mut k = 0;
            while k < levels.len() {
                let cnt = k + 1;
                let next = if cnt < levels.len() {
                    levels[cnt].0
                } else {
                    f64::INFINITY
                };
                let need = (next - w) * cnt as f64;
                if need >= remaining {
                    w += remaining / cnt as f64;
                    break;
                }
                remaining -= need;
                w = next;
                k += 1;
            }
            let mut sum = 0.0;
            for &(base, i) in levels.iter() {
                let amount = (w - base).max(0.0);
                self.shares[i] = amount / total;
                sum += self.shares[i];
            }
            // Normalise rounding drift so the shares of the expert sum to exactly 1.
            for &(_, i) in levels.iter() {
                self.shares[i] /= sum;
                self.level[self.instances[i].1 as usize] += self.shares[i] * total;
            }
        }
        &self.shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ep_is_contiguous() {
        let p = static_ep(8, 4).unwrap();
        let gpus: Vec<u32> = p.instances.iter().map(|i| i.gpu).collect();
        assert_eq!(gpus, vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert!(static_ep(10, 4).is_err());
    }

    #[test]
    fn split_tokens_sums_and_follows_shares() {
        let mut out = Vec::new();
        split_tokens(10, &[0.5, 0.25, 0.25], &mut out);
        assert_eq!(out, vec![5, 3, 2]);
        split_tokens(7, &[1.0 / 3.0; 3], &mut out);
        assert_eq!(out.iter().sum::<u32>(), 7);
        assert_eq!(out, vec![3, 2, 2]);
    }

    #[test]
    fn water_fill_balances_replicas() {
        // expert 0 alone on gpu 0 (load 4), expert 1 (load 6) replicated on gpus 0 and 1.
        let plan = LayerPlan {
            instances: vec![
                Instance {
                    expert: 0,
                    gpu: 0,
                    share: 1.0,
                },
                Instance {
                    expert: 1,
                    gpu: 0,
                    share: 0.0,
                },
                Instance {
                    expert: 1,
                    gpu: 1,
                    share: 0.0,
                },
            ],
        };
        let s = water_fill_shares(&plan, &[4.0, 6.0], 2);
        assert!(
            (s[1] - 1.0 / 6.0).abs() < 1e-12 && (s[2] - 5.0 / 6.0).abs() < 1e-12,
            "{s:?}"
        );
    }

    #[test]
    fn bad_loads_are_errors() {
        assert!(matches!(
            LoadMatrix::new(vec![vec![1.0, f64::NAN]]),
            Err(PlanError::BadLoad {
                layer: 0,
                expert: 1,
                ..
            })
        ));
        assert!(LoadMatrix::new(vec![vec![1.0], vec![-1.0]]).is_err());
        assert!(LoadMatrix::new(vec![vec![1.0], vec![1.0, 2.0]]).is_err());
        assert!(LoadMatrix::new(vec![]).is_err());
    }
}

#[cfg(test)]
mod dispatch_props {
    use super::*;
    use proptest::prelude::*;

    fn plan_of(pairs: &[(u32, u32)]) -> LayerPlan {
        LayerPlan {
            instances: pairs
                .iter()
                .map(|&(expert, gpu)| Instance {
                    expert,
                    gpu,
                    share: 0.0,
                })
                .collect(),
        }
    }

    /// Smallest max GPU load over every integer split, by enumeration.
    fn brute_force(plan: &LayerPlan, counts: &[u32], gpus: usize) -> u32 {
        fn go(e: usize, holders: &[Vec<usize>], counts: &[u32], load: &mut Vec<u32>, best: &mut u32) {
            if e == counts.len() {
                *best = (*best).min(*load.iter().max().unwrap());
                return;
            }
            if counts[e] == 0 || holders[e].is_empty() {
                return go(e + 1, holders, counts, load, best);
            }
            // Every way to put counts[e] tokens on the holder GPUs.
            fn spread(
                k: usize,
                left: u32,
                e: usize,
                holders: &[Vec<usize>],
                counts: &[u32],
                load: &mut Vec<u32>,
                best: &mut u32,
            ) {
                let h = &holders[e];
                if k + 1 == h.len() {
                    load[h[k]] += left;
                    go(e + 1, holders, counts, load, best);
                    load[h[k]] -= left;
                    return;
                }
                for n in 0..=left {
                    load[h[k]] += n;
                    spread(k + 1, left - n, e, holders, counts, load, best);
                    load[h[k]] -= n;
                }
            }
            spread(0, counts[e], e, holders, counts, load, best);
        }
        let mut holders = vec![Vec::new(); counts.len()];
        for i in &plan.instances {
            if !holders[i.expert as usize].contains(&(i.gpu as usize)) {
                holders[i.expert as usize].push(i.gpu as usize);
            }
        }
        let mut best = u32::MAX;
        go(0, &holders, counts, &mut vec![0; gpus], &mut best);
        best
    }

    fn case() -> impl Strategy<Value = (usize, Vec<(u32, u32)>, Vec<u32>)> {
        (1usize..4, 1usize..5).prop_flat_map(|(gpus, experts)| {
            (
                Just(gpus),
                prop::collection::vec((0..experts as u32, 0..gpus as u32), experts..experts + 5).prop_map(
                    move |mut v| {
                        // Every expert keeps at least one instance.
                        for (e, pair) in v.iter_mut().enumerate().take(experts) {
                            pair.0 = e as u32;
                        }
                        v
                    },
                ),
                prop::collection::vec(0u32..6, experts),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn integer_split_is_optimal_and_complete((gpus, pairs, counts) in case()) {
            let plan = plan_of(&pairs);
            let tok = min_max_token_split(&plan, &counts, gpus);
            let mut per_expert = vec![0u32; counts.len()];
            let mut load = vec![0u32; gpus];
            for (i, &n) in plan.instances.iter().zip(&tok) {
                per_expert[i.expert as usize] += n;
                load[i.gpu as usize] += n;
            }
            prop_assert_eq!(&per_expert, &counts);
            prop_assert_eq!(*load.iter().max().unwrap(), brute_force(&plan, &counts, gpus));
        }

        #[test]
        fn fractional_split_is_feasible_and_tight((gpus, pairs, counts) in case()) {
            let plan = plan_of(&pairs);
            let (m, shares) = min_max_fractional_split(&plan, &counts, gpus);
            let rc = plan.replica_counts(counts.len());
            let mut sum = vec![0.0; counts.len()];
            let mut load = vec![0.0; gpus];
            for (i, &s) in plan.instances.iter().zip(&shares) {
                prop_assert!(s >= 0.0);
                sum[i.expert as usize] += s;
                load[i.gpu as usize] += s * f64::from(counts[i.expert as usize]);
            }
            for (e, s) in sum.iter().enumerate() {
                prop_assert!(rc[e] == 0 || (s - 1.0).abs() < 1e-9, "expert {} shares sum {}", e, s);
            }
            let max = load.iter().fold(0.0f64, |a, &b| a.max(b));
            prop_assert!((max - m).abs() < 1e-9, "claimed {} reached {}", m, max);
            let total: u32 = counts.iter().sum();
            prop_assert!(m + 1e-9 >= f64::from(total) / gpus as f64);
            // Integrality of bipartite flows: the integer optimum is the fractional one rounded up.
            let int = f64::from(brute_force(&plan, &counts, gpus));
            prop_assert!((m - 1e-9).ceil() == int, "fractional {} integer {}", m, int);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]

        /// On layers too large for brute force, the integer split is still optimal: complete,
        /// and no flow fits under one token less (a max-flow check at a fixed cap, independent
        /// of how the cap was found).
        #[test]
        fn integer_split_is_optimal_on_larger_layers(
            gpus in 2usize..9,
            extra in prop::collection::vec((0u32..16, 0u32..8), 0..24),
            counts in prop::collection::vec(0u32..60, 16),
        ) {
            let mut pairs: Vec<(u32, u32)> = (0..16u32).map(|e| (e, e % gpus as u32)).collect();
            pairs.extend(extra.iter().map(|&(e, g)| (e, g % gpus as u32)));
            let plan = plan_of(&pairs);
            let tok = min_max_token_split(&plan, &counts, gpus);
            let mut per_expert = vec![0u32; counts.len()];
            let mut load = vec![0u64; gpus];
            for (i, &n) in plan.instances.iter().zip(&tok) {
                per_expert[i.expert as usize] += n;
                load[i.gpu as usize] += u64::from(n);
            }
            prop_assert_eq!(&per_expert, &counts);
            let m = *load.iter().max().unwrap();
            if m > 0 {
                let mut d = MinMaxDispatch::default();
                d.build(&plan, &counts, gpus);
                d.rescale(1);
                let fixed_ok = d.load.iter().all(|&l| l < m);
                prop_assert!(!(fixed_ok && d.fill(m - 1)), "a split with max {} exists", m - 1);
            }
        }

        /// One dispatcher reused across layers of different shapes answers exactly what fresh
        /// ones do (its working memory carries nothing over).
        #[test]
        fn reused_dispatcher_matches_fresh_ones(a in case(), b in case()) {
            let mut d = MinMaxDispatch::default();
            let mut out = Vec::new();
            for (gpus, pairs, counts) in [&a, &b, &a] {
                let plan = plan_of(pairs);
                d.token_split(&plan, counts, *gpus, &mut out);
                prop_assert_eq!(&out, &min_max_token_split(&plan, counts, *gpus));
                let (m, s) = d.fractional_split(&plan, counts, *gpus);
                let (m2, s2) = min_max_fractional_split(&plan, counts, *gpus);
                prop_assert_eq!(m.to_bits(), m2.to_bits());
                prop_assert_eq!(s, s2);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Incremental fills (pushes between fills, loads that change) give exactly the shares
        /// of the one-off water-fill on the same instances.
        #[test]
        fn share_fill_matches_one_off_water_fill(
            gpus in 1usize..5,
            experts in 1usize..6,
            pushes in prop::collection::vec((0u32..6, 0u32..5), 0..12),
            loads_a in prop::collection::vec(0.0f64..10.0, 6),
            loads_b in prop::collection::vec(0.0f64..10.0, 6),
        ) {
            let loads_a = &loads_a[..experts];
            let loads_b = &loads_b[..experts];
            let mut pairs: Vec<(u32, u32)> = (0..experts as u32).map(|e| (e, e % gpus as u32)).collect();
            let mut fill = ShareFill::new(experts, gpus);
            fill.reset(pairs.iter().copied());
            for (k, &(e, g)) in pushes.iter().enumerate() {
                let (e, g) = (e % experts as u32, g % gpus as u32);
                pairs.push((e, g));
                fill.push(e, g);
                let loads = if k % 3 == 2 { loads_b } else { loads_a };
                let got = fill.fill(loads).to_vec();
                let want = water_fill_shares(&plan_of(&pairs), loads, gpus);
                prop_assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn replicas_absorb_a_hot_expert() {
        // Expert 0 (9 tokens) on GPUs 0 and 1, expert 1 (3 tokens) alone on GPU 0.
        let plan = plan_of(&[(0, 0), (0, 1), (1, 0)]);
        let tok = min_max_token_split(&plan, &[9, 3], 2);
        assert_eq!(tok, vec![3, 6, 3]);
        let (m, _) = min_max_fractional_split(&plan, &[9, 3], 2);
        assert_eq!(m, 6.0);
        let (m, _) = min_max_fractional_split(&plan, &[8, 3], 2);
        assert_eq!(m, 5.5);
    }
}
