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
    out.clear();
    if shares.len() == 1 {
        out.push(count);
        return;
    }
    let mut given = 0u32;
    let mut rema: Vec<(f64, usize)> = Vec::with_capacity(shares.len());
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

/// The flow problem behind min-max dispatch: experts held on several GPUs ("fluid") send their
/// tokens to any GPU holding them; everything else is a fixed load. All amounts are integers
/// (tokens, possibly scaled) so that the result is exact.
struct DispatchFlow {
    /// Per fluid expert: its distinct GPUs and the first instance on each.
    holders: Vec<Vec<(usize, usize)>>,
    /// Per fluid expert: amount not yet placed.
    left: Vec<u64>,
    /// Per fluid expert and holder: amount placed there.
    flow: Vec<Vec<u64>>,
    load: Vec<u64>,
    /// GPU -> (fluid expert, holder index) pairs.
    on_gpu: Vec<Vec<(usize, usize)>>,
}

impl DispatchFlow {
    /// Split the experts of `plan` with non-zero `counts` into fixed load (scaled by `scale`)
    /// and fluid experts. Returns the problem, the fluid experts' ids and the unscaled total.
    fn new(plan: &LayerPlan, counts: &[u32], gpus: usize, scale: u64) -> (Self, Vec<usize>, u64) {
        let mut by_expert: Vec<Vec<(usize, usize)>> = vec![Vec::new(); counts.len()];
        for (i, inst) in plan.instances.iter().enumerate() {
            let h = &mut by_expert[inst.expert as usize];
            if !h.iter().any(|&(g, _)| g == inst.gpu as usize) {
                h.push((inst.gpu as usize, i));
            }
        }
        let mut f = DispatchFlow {
            holders: Vec::new(),
            left: Vec::new(),
            flow: Vec::new(),
            load: vec![0; gpus],
            on_gpu: vec![Vec::new(); gpus],
        };
        let mut ids = Vec::new();
        let mut total = 0u64;
        for (e, &c) in counts.iter().enumerate() {
            let h = &by_expert[e];
            if c == 0 || h.is_empty() {
                continue;
            }
            total += u64::from(c);
            if h.len() == 1 {
                f.load[h[0].0] += u64::from(c) * scale;
            } else {
                let j = f.holders.len();
                for (k, &(g, _)) in h.iter().enumerate() {
                    f.on_gpu[g].push((j, k));
                }
                f.flow.push(vec![0; h.len()]);
                f.holders.push(h.clone());
                f.left.push(u64::from(c) * scale);
                ids.push(e);
            }
        }
        (f, ids, total)
    }

    /// Push as much as possible with every GPU capped at `cap` (augmenting paths, bottleneck
    /// amounts). Returns whether everything is placed; the flow stays valid for a larger cap.
    fn fill(&mut self, cap: u64) -> bool {
        let nf = self.holders.len();
        let gpus = self.load.len();
        let mut gpu_from: Vec<Option<(usize, usize)>> = vec![None; gpus];
        let mut expert_via: Vec<Option<(usize, usize)>> = vec![None; nf];
        let mut queue: Vec<usize> = Vec::with_capacity(nf);
        let mut order: Vec<(usize, usize)> = Vec::new();
        loop {
            let mut progressed = false;
            for j0 in 0..nf {
                while self.left[j0] > 0 {
                    gpu_from.iter_mut().for_each(|p| *p = None);
                    expert_via.iter_mut().for_each(|p| *p = None);
                    queue.clear();
                    queue.push(j0);
                    let mut found = None;
                    let mut qi = 0;
                    'bfs: while qi < queue.len() {
                        let j = queue[qi];
                        qi += 1;
                        // Least loaded holders first, so that ties fill evenly.
                        order.clear();
                        order.extend(self.holders[j].iter().enumerate().map(|(k, h)| (h.0, k)));
                        order.sort_by_key(|&(g, _)| (self.load[g], g));
                        for &(g, k) in &order {
                            if gpu_from[g].is_some() {
                                continue;
                            }
                            gpu_from[g] = Some((j, k));
                            if self.load[g] < cap {
                                found = Some(g);
                                break 'bfs;
                            }
                            for &(j2, k2) in &self.on_gpu[g] {
                                if j2 != j0 && expert_via[j2].is_none() && self.flow[j2][k2] > 0 {
                                    expert_via[j2] = Some((g, k2));
                                    queue.push(j2);
                                }
                            }
                        }
                    }
                    let Some(end) = found else { break };
                    // Bottleneck: what j0 has left, room on the last GPU, flow on backward edges.
                    let mut amount = self.left[j0].min(cap - self.load[end]);
                    let mut g = end;
                    loop {
                        let (j, _) = gpu_from[g].expect("GPU on the augmenting path");
                        if j == j0 {
                            break;
                        }
                        let (back, kb) = expert_via[j].expect("expert on the augmenting path");
                        amount = amount.min(self.flow[j][kb]);
                        g = back;
                    }
                    self.load[end] += amount;
                    let mut g = end;
                    loop {
                        let (j, k) = gpu_from[g].expect("GPU on the augmenting path");
                        self.flow[j][k] += amount;
                        if j == j0 {
                            break;
                        }
                        let (back, kb) = expert_via[j].expect("expert on the augmenting path");
                        self.flow[j][kb] -= amount;
                        g = back;
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
}

/// Integer dispatch of routed `counts` across the instances of `plan` that minimises the
/// maximum tokens on a GPU, exactly: tokens of single-GPU experts are fixed, the rest is a
/// bipartite flow (expert -> GPUs holding it) whose GPU capacity starts at the lower bound
/// `max(ceil(total / gpus), max fixed load)` and grows by one token whenever no augmenting path
/// is left. Returns tokens per instance (aligned with `plan.instances`); several instances of
/// one expert on the same GPU: the first listed takes the GPU's tokens.
pub fn min_max_token_split(plan: &LayerPlan, counts: &[u32], gpus: usize) -> Vec<u32> {
    let mut out = vec![0u32; plan.instances.len()];
    let (mut f, ids, total) = DispatchFlow::new(plan, counts, gpus, 1);
    let mut cap = total.div_ceil(gpus.max(1) as u64);
    cap = cap.max(f.load.iter().copied().max().unwrap_or(0));
    while !f.fill(cap) {
        cap += 1;
    }
    fill_single_gpu_experts(plan, counts, &mut out);
    for (j, holders) in f.holders.iter().enumerate() {
        for (k, &(_, i)) in holders.iter().enumerate() {
            out[i] = f.flow[j][k] as u32;
        }
    }
    debug_assert_eq!(ids.len(), f.holders.len());
    out
}

/// Tokens of experts held on one GPU only go to their first instance.
fn fill_single_gpu_experts(plan: &LayerPlan, counts: &[u32], out: &mut [u32]) {
    let mut first: Vec<Option<(u32, usize)>> = vec![None; counts.len()];
    let mut multi = vec![false; counts.len()];
    for (i, inst) in plan.instances.iter().enumerate() {
        let e = inst.expert as usize;
        match first[e] {
            None => first[e] = Some((inst.gpu, i)),
            Some((g, _)) if g != inst.gpu => multi[e] = true,
            _ => {}
        }
    }
    for (e, f) in first.iter().enumerate() {
        if let (Some((_, i)), false) = (f, multi[e]) {
            out[*i] = counts[e];
        }
    }
}

/// The smallest possible maximum GPU load when each expert's `counts` may be split across its
/// instances in any real proportions, with shares that reach it (aligned with `plan.instances`).
/// Exact: the optimum is `a / b` with `b` a number of GPUs (it is the load of some set of
/// experts over the GPUs holding them), and lies within one token below the integer optimum,
/// so a binary search over those fractions with integer flows (amounts scaled by `b`) finds it.
pub fn min_max_fractional_split(plan: &LayerPlan, counts: &[u32], gpus: usize) -> (f64, Vec<f64>) {
    let int_tokens = min_max_token_split(plan, counts, gpus);
    let mut int_load = vec![0u64; gpus];
    for (inst, &n) in plan.instances.iter().zip(&int_tokens) {
        int_load[inst.gpu as usize] += u64::from(n);
    }
    let m_int = int_load.iter().copied().max().unwrap_or(0);
    let share_of = |tokens: &[f64]| -> Vec<f64> {
        let rc = plan.replica_counts(counts.len());
        plan.instances
            .iter()
            .zip(tokens)
            .map(|(i, &n)| match counts[i.expert as usize] {
                0 => 1.0 / f64::from(rc[i.expert as usize]),
                c => n / f64::from(c),
            })
            .collect()
    };
    let int_shares = || share_of(&int_tokens.iter().map(|&n| f64::from(n)).collect::<Vec<_>>());
    if m_int == 0 {
        return (0.0, int_shares());
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
    let mut best: Option<(DispatchFlow, Vec<usize>, u64)> = None;
    while lo < hi {
        let mid = (lo + hi) / 2;
        let (a, b) = cand[mid];
        let (mut f, ids, _) = DispatchFlow::new(plan, counts, gpus, b);
        let fixed_ok = f.load.iter().all(|&l| l <= a);
        if fixed_ok && f.fill(a) {
            hi = mid;
            best = Some((f, ids, b));
        } else {
            lo = mid + 1;
        }
    }
    // `best` is the flow found for `cand[hi]` whenever the search lowered `hi`.
    let (a, b) = cand[hi];
    let Some((f, ids, scale)) = best else {
        return (m_int as f64, int_shares());
    };
    let mut tokens = vec![0.0; plan.instances.len()];
    let mut whole = vec![0u32; plan.instances.len()];
    fill_single_gpu_experts(plan, counts, &mut whole);
    for (t, &w) in tokens.iter_mut().zip(&whole) {
        *t = f64::from(w);
    }
    debug_assert_eq!(ids.len(), f.holders.len());
    for (j, holders) in f.holders.iter().enumerate() {
        for (k, &(_, i)) in holders.iter().enumerate() {
            tokens[i] = f.flow[j][k] as f64 / scale as f64;
        }
    }
    (a as f64 / b as f64, share_of(&tokens))
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
