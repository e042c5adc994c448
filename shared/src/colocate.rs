//! Co-location of co-activated experts.
//!
//! With top-k routing (k > 1) a token is sent to every GPU that runs one of its k experts:
//! the dispatch all-to-all moves one copy of the token's hidden state per *distinct* GPU, not
//! per expert (DeepEP and vLLM's all-to-all kernels deduplicate the same way). Experts that the
//! same tokens pick together are therefore cheaper on one GPU. Two pieces:
//!
//! * [`CoActivation`]: per layer, how often two experts were picked by the same token, learned
//!   online from routed batches with an exponential decay (the same kind of evidence as the
//!   co-activation counts in `../shared/data/routing/olmoe-mixtral-counts`, but same-layer).
//!   Placement asks it which GPU's instances a new replica would share most tokens with.
//! * [`TokenAssigner`]: once the per-step token split over an expert's instances is fixed (how
//!   many tokens each instance gets, which is what load balance depends on), *which* tokens go
//!   to which instance is still free. Sending each token to instances on GPUs it already
//!   visits lowers the number of copies without changing any GPU's token count.

/// Decay of co-activation evidence per step (slow: pairings are a property of the model).
pub const COACTIVATION_DECAY: f32 = 0.99;

/// Same-layer co-activation counts, decayed per step.
///
/// Memory: one `experts x experts` f32 matrix per layer that has seen routes with k > 1
/// (128 experts: 64 KiB per layer). Decay is lazy: each step's evidence is added with a
/// weight growing by `1 / decay` per step, and all counts are rescaled when it gets large, so
/// a step costs O(tokens x k^2), not O(experts^2).
#[derive(Debug, Clone)]
pub struct CoActivation {
    experts: usize,
    /// `pairs[layer][a * experts + b]`: decayed tokens that picked both `a` and `b` (a != b).
    pairs: Vec<Vec<f32>>,
    /// `picks[layer][a]`: decayed tokens that picked `a`.
    picks: Vec<Vec<f32>>,
    weight: f32,
    decay: f32,
}

const RESCALE_ABOVE: f32 = 1e20;

impl CoActivation {
    pub fn new(layers: usize, experts: usize, decay: f32) -> Self {
        Self {
            experts,
            pairs: vec![Vec::new(); layers],
            picks: vec![Vec::new(); layers],
            weight: 1.0,
            decay: if decay > 0.0 && decay <= 1.0 { decay } else { 1.0 },
        }
    }

    /// Start a new step: older evidence counts `decay` times less from now on.
    pub fn begin_step(&mut self) {
        self.weight /= self.decay;
        if self.weight > RESCALE_ABOVE {
            let s = 1.0 / self.weight;
            for v in self.pairs.iter_mut().chain(self.picks.iter_mut()) {
                v.iter_mut().for_each(|x| *x *= s);
            }
            self.weight = 1.0;
        }
    }

    /// Add the routes of `layer` (token-major, `k` experts per token). Routes with k < 2, ids
    /// out of range or a length that is not a multiple of `k` are ignored (no pairs to learn).
    pub fn observe(&mut self, layer: usize, routes: &[u32], k: usize) {
        let e = self.experts;
        if k < 2 || layer >= self.pairs.len() || routes.is_empty() || !routes.len().is_multiple_of(k) {
            return;
        }
        if routes.iter().any(|&x| x as usize >= e) {
            return;
        }
        if self.pairs[layer].is_empty() {
            self.pairs[layer] = vec![0.0; e * e];
            self.picks[layer] = vec![0.0; e];
        }
        let (pairs, picks, w) = (&mut self.pairs[layer], &mut self.picks[layer], self.weight);
        for tok in routes.chunks_exact(k) {
            for (i, &a) in tok.iter().enumerate() {
                picks[a as usize] += w;
                for &b in &tok[i + 1..] {
                    if a != b {
                        pairs[a as usize * e + b as usize] += w;
                        pairs[b as usize * e + a as usize] += w;
                    }
                }
            }
        }
    }

    /// Whether anything was learned for `layer` (false for top-1 routing).
    pub fn knows(&self, layer: usize) -> bool {
        self.picks.get(layer).is_some_and(|p| !p.is_empty())
    }

    /// Fraction of `a`'s tokens that also picked `b` (0 when unknown).
    pub fn affinity(&self, layer: usize, a: usize, b: usize) -> f64 {
        let (Some(pairs), Some(picks)) = (self.pairs.get(layer), self.picks.get(layer)) else {
            return 0.0;
        };
        if picks.is_empty() || a >= self.experts || b >= self.experts || a == b || picks[a] <= 0.0 {
            return 0.0;
        }
        f64::from(pairs[a * self.experts + b]) / f64::from(picks[a])
    }

    /// Per GPU, the expected number of `expert`'s other choices per token that an instance on
    /// that GPU would find there: the sum over the layer's `instances` (expert, gpu) of
    /// `affinity(expert, x)` divided by `x`'s instance count (its tokens are split over them).
    pub fn gpu_affinity(&self, layer: usize, expert: u32, instances: &[(u32, u32)], out: &mut [f64]) {
        out.iter_mut().for_each(|x| *x = 0.0);
        if !self.knows(layer) {
            return;
        }
        let mut count = vec![0u32; self.experts];
        for &(x, _) in instances {
            if let Some(c) = count.get_mut(x as usize) {
                *c += 1;
            }
        }
        for &(x, gpu) in instances {
            let a = self.affinity(layer, expert as usize, x as usize);
            if a > 0.0 {
                if let Some(o) = out.get_mut(gpu as usize) {
                    *o += a / f64::from(count[x as usize]);
                }
            }
        }
    }
}

impl CoActivation {
    /// Home GPUs that keep co-activated experts together: a local search from `homes` (one GPU
    /// per expert) that swaps two experts' homes while that raises the tokens whose expert
    /// pairs share a GPU, and keeps every GPU's summed `load` within `tolerance` x the mean (or
    /// no worse than before the swap). Swaps keep the experts per GPU unchanged, so slot
    /// budgets hold. A swap must gain at least `min_gain` of the layer's pair weight (no churn
    /// for noise). Returns whether any home changed; `homes` is updated in place.
    pub fn cluster_homes(&self, layer: usize, homes: &mut [u32], load: &[f64], tolerance: f64, min_gain: f64) -> bool {
        let e = self.experts;
        if !self.knows(layer) || homes.len() != e || load.len() != e {
            return false;
        }
        let pairs = &self.pairs[layer];
        let gpus = homes.iter().map(|&h| h as usize + 1).max().unwrap_or(0);
        // together[x * gpus + g]: pair weight between x and the experts homed on g.
        let mut together = vec![0.0f64; e * gpus];
        for x in 0..e {
            for y in 0..e {
                together[x * gpus + homes[y] as usize] += f64::from(pairs[x * e + y]);
            }
        }
        let mut gpu_load = vec![0.0f64; gpus];
        for (x, &h) in homes.iter().enumerate() {
            gpu_load[h as usize] += load[x];
        }
        let bound = tolerance * gpu_load.iter().sum::<f64>() / gpus as f64;
        let total: f64 = pairs.iter().map(|&w| f64::from(w)).sum::<f64>() / 2.0;
        let threshold = (min_gain * total).max(f64::MIN_POSITIVE);
        let mut changed = false;
        for _pass in 0..8 {
            let mut swapped = false;
            for a in 0..e {
                for b in a + 1..e {
                    let (ga, gb) = (homes[a] as usize, homes[b] as usize);
                    if ga == gb {
                        continue;
                    }
                    let wab = f64::from(pairs[a * e + b]);
                    let gain = together[a * gpus + gb] - together[a * gpus + ga] + together[b * gpus + ga]
                        - together[b * gpus + gb]
                        - 2.0 * wab;
                    if gain < threshold {
                        continue;
                    }
                    let (la, lb) = (gpu_load[ga] - load[a] + load[b], gpu_load[gb] - load[b] + load[a]);
                    if la.max(lb) > bound.max(gpu_load[ga].max(gpu_load[gb])) {
                        continue;
                    }
                    gpu_load[ga] = la;
                    gpu_load[gb] = lb;
                    homes[a] = gb as u32;
                    homes[b] = ga as u32;
                    for x in 0..e {
                        let (wa, wb) = (f64::from(pairs[x * e + a]), f64::from(pairs[x * e + b]));
                        together[x * gpus + ga] += wb - wa;
                        together[x * gpus + gb] += wa - wb;
                    }
                    swapped = true;
                    changed = true;
                }
            }
            if !swapped {
                break;
            }
        }
        changed
    }

    /// Decayed tokens that picked each expert of `layer` (empty when unknown).
    pub fn picks(&self, layer: usize) -> &[f32] {
        self.picks.get(layer).map_or(&[], Vec::as_slice)
    }
}

/// How tokens of a replicated expert are matched to its instances, given how many each gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// In token order: the first instance takes the first tokens (a plain permute layout).
    Sequential,
    /// Each token prefers an instance on a GPU it already visits for another of its experts.
    Colocated,
}

/// Matches tokens to instances and counts the copies the dispatch sends (one per distinct GPU
/// of each token). Scratch buffers are reused across calls.
#[derive(Debug, Default, Clone)]
pub struct TokenAssigner {
    remaining: Vec<u32>,
    seen: Vec<u32>,
    stamp: u32,
    gpus_of_token: Vec<u32>,
    received: Vec<u32>,
    /// Per expert: the GPU of its only instance, or [`SEVERAL`] / [`NOWHERE`].
    fixed: Vec<u32>,
}

/// [`TokenAssigner::assign`]: the route entry's expert has no instance.
pub const NO_INSTANCE: u32 = u32::MAX;

/// `TokenAssigner::fixed`: the expert has several instances (a per-token choice).
const SEVERAL: u32 = u32::MAX;
/// `TokenAssigner::fixed`: the expert has no instance with a GPU (its tokens are not counted).
const NOWHERE: u32 = u32::MAX - 1;

impl TokenAssigner {
    /// Copies dispatched for one layer: `routes` token-major with `k` experts per token,
    /// `gpu[i]` and `tokens[i]` the GPU and token count of instance `i`, `by_expert[e]` the
    /// instances of expert `e`. Token counts should sum to each expert's routed tokens; where
    /// they do not (or an expert has no instance) the token is counted on the expert's first
    /// instance, or not at all, and never panics.
    pub fn gpu_copies(
        &mut self,
        routes: &[u32],
        k: usize,
        gpu: &[u32],
        tokens: &[u32],
        by_expert: &[Vec<usize>],
        mode: Assignment,
    ) -> u64 {
        self.run(routes, k, gpu, tokens, by_expert, mode, None)
    }

    /// [`TokenAssigner::gpu_copies`], also writing into `chosen` the instance each route entry
    /// goes to (one per entry of `routes`; [`NO_INSTANCE`] where its expert has none). Each
    /// instance receives exactly its `tokens` count when the counts sum to the expert's
    /// routed entries: the engine uses this to split a replicated expert's tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &mut self,
        routes: &[u32],
        k: usize,
        gpu: &[u32],
        tokens: &[u32],
        by_expert: &[Vec<usize>],
        mode: Assignment,
        chosen: &mut Vec<u32>,
    ) -> u64 {
        chosen.clear();
        let copies = self.run(routes, k, gpu, tokens, by_expert, mode, Some(chosen));
        chosen.resize(routes.len(), NO_INSTANCE);
        copies
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        routes: &[u32],
        k: usize,
        gpu: &[u32],
        tokens: &[u32],
        by_expert: &[Vec<usize>],
        mode: Assignment,
        mut chosen: Option<&mut Vec<u32>>,
    ) -> u64 {
        self.received.iter_mut().for_each(|r| *r = 0);
        if k == 0 {
            return 0;
        }
        self.remaining.clear();
        self.remaining.extend_from_slice(tokens);
        // Every GPU index fits the scratch.
        let gpus = gpu.iter().map(|&g| g as usize + 1).max().unwrap_or(0);
        if gpus > self.seen.len() {
            self.seen.resize(gpus, 0);
        }
        if gpus > self.received.len() {
            self.received.resize(gpus, 0);
        }
        self.fixed.clear();
        self.fixed.extend(by_expert.iter().map(|idx| match idx.as_slice() {
            [] => NOWHERE,
            [i] => gpu.get(*i).copied().unwrap_or(NOWHERE),
            _ => SEVERAL,
        }));
        let mut copies = 0u64;
        for tok in routes.chunks(k) {
            self.stamp = self.stamp.wrapping_add(1);
            if self.stamp == 0 {
                self.seen.iter_mut().for_each(|s| *s = 0);
                self.stamp = 1;
            }
            self.gpus_of_token.clear();
            // Experts with one instance first: their GPUs are fixed.
            let mut several = false;
            for &e in tok {
                match self.fixed.get(e as usize).copied() {
                    Some(SEVERAL) => several = true,
                    Some(NOWHERE) | None => {}
                    Some(g) => self.visit(g),
                }
            }
            if let Some(out) = chosen.as_deref_mut() {
                let at = out.len();
                out.extend(tok.iter().map(|&e| match by_expert.get(e as usize).map(Vec::as_slice) {
                    Some([i]) => *i as u32,
                    _ => NO_INSTANCE,
                }));
                if several {
                    for (j, &e) in tok.iter().enumerate() {
                        if self.fixed.get(e as usize) == Some(&SEVERAL) {
                            out[at + j] = self.pick(&by_expert[e as usize], gpu, mode) as u32;
                        }
                    }
                }
            } else if several {
                for &e in tok {
                    if self.fixed.get(e as usize) == Some(&SEVERAL) {
                        self.pick(&by_expert[e as usize], gpu, mode);
                    }
                }
            }
            copies += self.gpus_of_token.len() as u64;
            for &g in &self.gpus_of_token {
                if let Some(r) = self.received.get_mut(g as usize) {
                    *r += 1;
                }
            }
        }
        copies
    }

    /// Per GPU, the copies the last [`TokenAssigner::gpu_copies`] call sent to it (distinct
    /// tokens it received), indexed by GPU up to the highest index given so far.
    pub fn received(&self) -> &[u32] {
        &self.received
    }

    /// One token of a replicated expert: take an instance with tokens left (preferring, when
    /// colocating, one on a GPU the token already visits), or the first when none has any.
    fn pick(&mut self, idx: &[usize], gpu: &[u32], mode: Assignment) -> usize {
        let left = |i: usize| self.remaining.get(i).copied().unwrap_or(0);
        let pick = match mode {
            Assignment::Sequential => idx.iter().copied().find(|&i| left(i) > 0),
            Assignment::Colocated => {
                let visited = |i: usize| {
                    let g = gpu.get(i).map_or(usize::MAX, |&g| g as usize);
                    g < self.seen.len() && self.seen[g] == self.stamp
                };
                let best = |only_visited: bool| {
                    idx.iter()
                        .copied()
                        .filter(|&i| left(i) > 0 && (!only_visited || visited(i)))
                        .max_by(|&a, &b| left(a).cmp(&left(b)).then(b.cmp(&a)))
                };
                best(true).or_else(|| best(false))
            }
        };
        let i = pick.unwrap_or(idx[0]);
        if let Some(r) = self.remaining.get_mut(i) {
            *r = r.saturating_sub(1);
        }
        if let Some(&g) = gpu.get(i) {
            self.visit(g);
        }
        i
    }

    /// Count GPU `g` once for this token.
    fn visit(&mut self, g: u32) {
        if let Some(s) = self.seen.get_mut(g as usize) {
            if *s != self.stamp {
                *s = self.stamp;
                self.gpus_of_token.push(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_is_the_fraction_of_shared_tokens() {
        let mut c = CoActivation::new(1, 4, 1.0);
        c.begin_step();
        // Tokens (0,1), (0,1), (0,2), (3,2).
        c.observe(0, &[0, 1, 0, 1, 0, 2, 3, 2], 2);
        assert!((c.affinity(0, 0, 1) - 2.0 / 3.0).abs() < 1e-6);
        assert!((c.affinity(0, 1, 0) - 1.0).abs() < 1e-6);
        assert_eq!(c.affinity(0, 0, 3), 0.0);
        assert_eq!(c.affinity(0, 0, 0), 0.0);
        let mut out = vec![0.0; 2];
        // Expert 1 alone on GPU 0, expert 2 on GPUs 0 and 1.
        c.gpu_affinity(0, 0, &[(1, 0), (2, 0), (2, 1)], &mut out);
        assert!((out[0] - (2.0 / 3.0 + 1.0 / 6.0)).abs() < 1e-6, "{out:?}");
        assert!((out[1] - 1.0 / 6.0).abs() < 1e-6);
    }

    #[test]
    fn decay_forgets_old_pairings_and_survives_rescaling() {
        let mut c = CoActivation::new(1, 3, 0.5);
        c.begin_step();
        c.observe(0, &[0, 1], 2);
        for _ in 0..200 {
            c.begin_step();
            c.observe(0, &[0, 2], 2);
        }
        assert!(c.affinity(0, 0, 2) > 0.99);
        assert!(c.affinity(0, 0, 1) < 1e-6);
        assert!(c.affinity(0, 0, 2).is_finite());
    }

    #[test]
    fn top1_and_bad_routes_teach_nothing() {
        let mut c = CoActivation::new(2, 4, 0.9);
        c.observe(0, &[0, 1, 2], 1);
        c.observe(1, &[0, 1, 2], 2);
        c.observe(1, &[0, 9], 2);
        c.observe(5, &[0, 1], 2);
        assert!(!c.knows(0) && !c.knows(1));
    }

    #[test]
    fn clustering_groups_pairs_and_keeps_balance() {
        // Experts 0..4 on 2 GPUs (0, 1 | 2, 3); tokens pick (0, 2) and (1, 3).
        let mut c = CoActivation::new(1, 4, 1.0);
        c.observe(0, &[0, 2, 1, 3, 0, 2, 1, 3], 2);
        let mut homes = vec![0, 0, 1, 1];
        let load = [1.0; 4];
        assert!(c.cluster_homes(0, &mut homes, &load, 1.1, 0.01));
        assert_eq!(homes[0], homes[2]);
        assert_eq!(homes[1], homes[3]);
        assert_ne!(homes[0], homes[1]);
        // Already clustered: nothing to do.
        assert!(!c.cluster_homes(0, &mut homes, &load, 1.1, 0.01));
        // Pairing the two hot experts would overload one GPU: refused.
        let mut homes = vec![0, 0, 1, 1];
        let hot = [10.0, 1.0, 10.0, 1.0];
        assert!(!c.cluster_homes(0, &mut homes, &hot, 1.1, 0.01));
        assert_eq!(homes, vec![0, 0, 1, 1]);
    }

    #[test]
    fn colocated_assignment_saves_copies_without_changing_counts() {
        // Expert 0 on GPU 0 only; expert 1 on GPUs 0 and 1 with 2 tokens each. Tokens 0, 1
        // pick (2, 1) and tokens 2, 3 pick (0, 1): sequential sends tokens 0, 1 to expert 1's
        // GPU-0 instance and tokens 2, 3 to GPU 1; colocated matches expert 1 with expert 0.
        let gpu = [0, 0, 1, 1];
        let tokens = [2, 2, 2, 2];
        let by_expert = vec![vec![0], vec![1, 2], vec![3]];
        let routes = [2, 1, 2, 1, 0, 1, 0, 1];
        let mut a = TokenAssigner::default();
        let seq = a.gpu_copies(&routes, 2, &gpu, &tokens, &by_expert, Assignment::Sequential);
        assert_eq!(a.received(), &[4, 4]);
        let col = a.gpu_copies(&routes, 2, &gpu, &tokens, &by_expert, Assignment::Colocated);
        assert_eq!(a.received(), &[2, 2]);
        assert_eq!(seq, 8);
        assert_eq!(col, 4);
        // The same matching, instance by instance: each gets its 2 tokens.
        let mut chosen = Vec::new();
        let n = a.assign(
            &routes,
            2,
            &gpu,
            &tokens,
            &by_expert,
            Assignment::Colocated,
            &mut chosen,
        );
        assert_eq!((n, chosen.as_slice()), (4, &[3, 2, 3, 2, 0, 1, 0, 1][..]));
        a.assign(
            &routes,
            2,
            &gpu,
            &tokens,
            &by_expert,
            Assignment::Sequential,
            &mut chosen,
        );
        assert_eq!(chosen, vec![3, 1, 3, 1, 0, 2, 0, 2]);
        // An expert without instances, an entry past the experts.
        a.assign(
            &[0, 9],
            2,
            &gpu,
            &tokens,
            &[vec![0], vec![]],
            Assignment::Colocated,
            &mut chosen,
        );
        assert_eq!(chosen, vec![0, NO_INSTANCE]);
    }

    #[test]
    fn inconsistent_counts_do_not_panic() {
        let mut a = TokenAssigner::default();
        let by_expert = vec![vec![0, 1], vec![]];
        // Instance indices past the token counts and GPU lists are skipped, not indexed.
        let past = vec![vec![5, 6]];
        assert_eq!(a.gpu_copies(&[0, 0], 1, &[0], &[1], &past, Assignment::Colocated), 0);
        assert_eq!(a.gpu_copies(&[0, 0], 1, &[0], &[1], &past, Assignment::Sequential), 0);
        let n = a.gpu_copies(
            &[0, 1, 0, 0, 7, 0],
            2,
            &[0, 3],
            &[0, 0],
            &by_expert,
            Assignment::Colocated,
        );
        assert_eq!(n, 3);
        assert_eq!(a.received(), &[3, 0, 0, 0]);
        assert_eq!(a.gpu_copies(&[0], 0, &[0], &[1], &by_expert, Assignment::Sequential), 0);
    }
}
