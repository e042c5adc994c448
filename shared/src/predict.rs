//! Layer-aware load predictors.
//!
//! A predictor observes routed layers as they execute and predicts the per-expert load of the
//! layer about to run from everything already known: earlier steps, and layers below it of the
//! current step. Predictions are scaled to the number of routed token-slots of the step.

use std::collections::VecDeque;

/// The common seam of all predictors.
pub trait LoadPredictor {
    fn name(&self) -> String;
    /// Called before the first layer of every step. `group` changes when a new batch starts.
    fn begin_step(&mut self, group: usize);
    /// Predict the load of `layer` into `out` (one value per expert, summing to `slots`, the
    /// tokens times top-k of the step). `current[l]` holds the routes of layers `l < layer` of
    /// the step being executed (token-major, `top_k` per token).
    fn predict(&self, layer: usize, current: &[Vec<u32>], slots: f64, out: &mut [f64]);
    /// Observe a layer of the current step after its router ran.
    fn observe(&mut self, layer: usize, routes: &[u32], counts: &[u32]);
}

fn normalise_into(src: &[f64], slots: f64, out: &mut [f64]) {
    let total: f64 = src.iter().sum();
    if total > 0.0 {
        for (o, s) in out.iter_mut().zip(src) {
            *o = s * slots / total;
        }
    } else {
        let u = slots / out.len() as f64;
        out.iter_mut().for_each(|o| *o = u);
    }
}

/// Exponentially decayed history of per-layer loads (what EPLB-style rebalancers use).
/// The current step is folded in when the next one begins.
#[derive(Debug, Clone)]
pub struct DecayedHistory {
    decay: f64,
    hist: Vec<Vec<f64>>,
    pending: Vec<Vec<u32>>,
    dirty: bool,
}

impl DecayedHistory {
    pub fn new(layers: usize, experts: usize, decay: f64) -> Self {
        Self {
            decay,
            hist: vec![vec![0.0; experts]; layers],
            pending: vec![vec![0; experts]; layers],
            dirty: false,
        }
    }
    pub fn loads(&self, layer: usize) -> &[f64] {
        &self.hist[layer]
    }
    fn fold(&mut self) {
        if !self.dirty {
            return;
        }
        for (h, p) in self.hist.iter_mut().zip(self.pending.iter_mut()) {
            for (hv, pv) in h.iter_mut().zip(p.iter_mut()) {
                *hv = *hv * self.decay + *pv as f64;
                *pv = 0;
            }
        }
        self.dirty = false;
    }
}

impl LoadPredictor for DecayedHistory {
    fn name(&self) -> String {
        format!("decayed(decay={})", self.decay)
    }
    fn begin_step(&mut self, _group: usize) {
        self.fold();
    }
    fn predict(&self, layer: usize, _current: &[Vec<u32>], slots: f64, out: &mut [f64]) {
        normalise_into(&self.hist[layer], slots, out);
    }
    fn observe(&mut self, layer: usize, _routes: &[u32], counts: &[u32]) {
        self.pending[layer].copy_from_slice(counts);
        self.dirty = true;
    }
}

/// Sum of the last `window` steps' loads.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    window: usize,
    ring: VecDeque<Vec<Vec<u32>>>,
    sum: Vec<Vec<f64>>,
    current: Vec<Vec<u32>>,
    started: bool,
}

impl SlidingWindow {
    pub fn new(layers: usize, experts: usize, window: usize) -> Self {
        Self {
            window: window.max(1),
            ring: VecDeque::new(),
            sum: vec![vec![0.0; experts]; layers],
            current: vec![vec![0; experts]; layers],
            started: false,
        }
    }
    pub fn loads(&self, layer: usize) -> &[f64] {
        &self.sum[layer]
    }
}

impl LoadPredictor for SlidingWindow {
    fn name(&self) -> String {
        format!("window(steps={})", self.window)
    }
    fn begin_step(&mut self, _group: usize) {
        if self.started {
            let step = std::mem::replace(&mut self.current, {
                let (l, e) = (self.sum.len(), self.sum[0].len());
                vec![vec![0; e]; l]
            });
            for (s, c) in self.sum.iter_mut().zip(&step) {
                for (sv, cv) in s.iter_mut().zip(c) {
                    *sv += *cv as f64;
                }
            }
            self.ring.push_back(step);
            if self.ring.len() > self.window {
                let old = self.ring.pop_front().expect("ring is non-empty");
                for (s, c) in self.sum.iter_mut().zip(&old) {
                    for (sv, cv) in s.iter_mut().zip(c) {
                        *sv -= *cv as f64;
                    }
                }
            }
        }
        self.started = true;
    }
    fn predict(&self, layer: usize, _current: &[Vec<u32>], slots: f64, out: &mut [f64]) {
        normalise_into(&self.sum[layer], slots, out);
    }
    fn observe(&mut self, layer: usize, _routes: &[u32], counts: &[u32]) {
        self.current[layer].copy_from_slice(counts);
    }
}

/// Temporal: the previous step of the same batch, smoothed with a decayed history (which is also
/// the whole prediction on the first step of a batch).
#[derive(Debug, Clone)]
pub struct Temporal {
    prev: Vec<Vec<f64>>,
    cur: Vec<Vec<f64>>,
    have_prev: bool,
    group: Option<usize>,
    history: DecayedHistory,
    /// Weight of the history in the mix (the previous step gets `1 - history_weight`).
    history_weight: f64,
}

impl Temporal {
    pub fn new(layers: usize, experts: usize, decay: f64, history_weight: f64) -> Self {
        Self {
            prev: vec![vec![0.0; experts]; layers],
            cur: vec![vec![0.0; experts]; layers],
            have_prev: false,
            group: None,
            history: DecayedHistory::new(layers, experts, decay),
            history_weight,
        }
    }
}

impl LoadPredictor for Temporal {
    fn name(&self) -> String {
        format!("temporal(history_weight={})", self.history_weight)
    }
    fn begin_step(&mut self, group: usize) {
        self.history.begin_step(group);
        if self.group == Some(group) {
            std::mem::swap(&mut self.prev, &mut self.cur);
            self.have_prev = true;
        } else {
            self.have_prev = false;
        }
        self.group = Some(group);
    }
    fn predict(&self, layer: usize, current: &[Vec<u32>], slots: f64, out: &mut [f64]) {
        self.history.predict(layer, current, slots, out);
        if self.have_prev {
            let total: f64 = self.prev[layer].iter().sum();
            if total > 0.0 {
                let w = self.history_weight;
                for (o, p) in out.iter_mut().zip(&self.prev[layer]) {
                    *o = w * *o + (1.0 - w) * p * slots / total;
                }
            }
        }
    }
    fn observe(&mut self, layer: usize, routes: &[u32], counts: &[u32]) {
        self.history.observe(layer, routes, counts);
        for (c, &v) in self.cur[layer].iter_mut().zip(counts) {
            *c = v as f64;
        }
    }
}

/// Cross-layer affinity learned online: how often a token that chose expert `a` at MoE layer
/// `l-1` chooses expert `b` at layer `l`. The prediction for layer `l` sums, over the current
/// step's tokens, the learned distribution given their choice at `l-1` (smoothed toward that
/// layer's decayed marginal). Layer 0 falls back to the marginal.
#[derive(Debug, Clone)]
pub struct CrossLayerAffinity {
    experts: usize,
    top_k: usize,
    /// `aff[l][a * experts + b]` for `l >= 1`.
    aff: Vec<Vec<f32>>,
    row_sum: Vec<Vec<f32>>,
    marginal: DecayedHistory,
    prior: f64,
    prev_routes: Vec<u32>,
}

impl CrossLayerAffinity {
    pub fn new(layers: usize, experts: usize, top_k: usize, decay: f64, prior: f64) -> Self {
        Self {
            experts,
            top_k: top_k.max(1),
            aff: vec![vec![0.0; experts * experts]; layers],
            row_sum: vec![vec![0.0; experts]; layers],
            marginal: DecayedHistory::new(layers, experts, decay),
            prior,
            prev_routes: Vec::new(),
        }
    }
}

impl LoadPredictor for CrossLayerAffinity {
    fn name(&self) -> String {
        format!("affinity(prior={})", self.prior)
    }
    fn begin_step(&mut self, group: usize) {
        self.marginal.begin_step(group);
    }
    fn predict(&self, layer: usize, current: &[Vec<u32>], slots: f64, out: &mut [f64]) {
        let e = self.experts;
        let mut marg = vec![0.0; e];
        self.marginal.predict(layer, current, 1.0, &mut marg);
        if layer == 0 || current.len() < layer || current[layer - 1].is_empty() {
            normalise_into(&marg, slots, out);
            return;
        }
        out.iter_mut().for_each(|o| *o = 0.0);
        let prev = &current[layer - 1];
        let k = self.top_k;
        let aff = &self.aff[layer];
        let rows = &self.row_sum[layer];
        // Each token contributes its distribution once, spread over its k previous choices.
        for tok in prev.chunks(k) {
            for &a in tok {
                let a = a as usize;
                let denom = rows[a] as f64 + self.prior;
                let row = &aff[a * e..(a + 1) * e];
                for b in 0..e {
                    out[b] += (row[b] as f64 + self.prior * marg[b]) / denom / k as f64;
                }
            }
        }
        let tmp: Vec<f64> = out.to_vec();
        normalise_into(&tmp, slots, out);
    }
    fn observe(&mut self, layer: usize, routes: &[u32], counts: &[u32]) {
        self.marginal.observe(layer, routes, counts);
        if layer > 0 && self.prev_routes.len() == routes.len() {
            let e = self.experts;
            let k = self.top_k;
            for (pt, ct) in self.prev_routes.chunks(k).zip(routes.chunks(k)) {
                for &a in pt {
                    for &b in ct {
                        self.aff[layer][a as usize * e + b as usize] += 1.0;
                        self.row_sum[layer][a as usize] += 1.0;
                    }
                }
            }
        }
        self.prev_routes.clear();
        self.prev_routes.extend_from_slice(routes);
    }
}

/// A fixed convex combination of predictors (weights normalised to sum to 1).
pub struct Combined {
    parts: Vec<(f64, Box<dyn LoadPredictor + Send>)>,
}

impl Combined {
    pub fn new(parts: Vec<(f64, Box<dyn LoadPredictor + Send>)>) -> Self {
        let total: f64 = parts.iter().map(|p| p.0).sum();
        Self {
            parts: parts.into_iter().map(|(w, p)| (w / total, p)).collect(),
        }
    }
}

impl LoadPredictor for Combined {
    fn name(&self) -> String {
        let parts: Vec<String> = self.parts.iter().map(|(w, p)| format!("{w:.2}*{}", p.name())).collect();
        format!("combined({})", parts.join(" + "))
    }
    fn begin_step(&mut self, group: usize) {
        self.parts.iter_mut().for_each(|p| p.1.begin_step(group));
    }
    fn predict(&self, layer: usize, current: &[Vec<u32>], slots: f64, out: &mut [f64]) {
        let mut tmp = vec![0.0; out.len()];
        out.iter_mut().for_each(|o| *o = 0.0);
        for (w, p) in &self.parts {
            p.predict(layer, current, slots, &mut tmp);
            for (o, t) in out.iter_mut().zip(&tmp) {
                *o += w * t;
            }
        }
    }
    fn observe(&mut self, layer: usize, routes: &[u32], counts: &[u32]) {
        self.parts.iter_mut().for_each(|p| p.1.observe(layer, routes, counts));
    }
}

/// Experts whose predicted load exceeds what one instance can serve in the layer's time budget
/// (`capacity` tokens per instance), hottest first.
pub fn stragglers(predicted: &[f64], capacity: f64) -> Vec<usize> {
    let mut s: Vec<usize> = (0..predicted.len()).filter(|&e| predicted[e] > capacity).collect();
    s.sort_by(|&a, &b| predicted[b].total_cmp(&predicted[a]).then(a.cmp(&b)));
    s
}

/// Knobs of the temporal predictor (also the temporal part of `combined`). `Default` is what
/// the reports use; `moeless replay --split first-half` tunes them on one half of a trace's
/// batches and `--split second-half` checks them on the other (docs/PERFORMANCE.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictorParams {
    /// Per-step factor of the temporal predictor's decayed history, in (0, 1].
    pub temporal_decay: f64,
    /// Weight of that history in the mix, in [0, 1] (the previous step gets the rest).
    pub temporal_history: f64,
}

impl Default for PredictorParams {
    fn default() -> Self {
        Self {
            temporal_decay: 0.9,
            temporal_history: 0.3,
        }
    }
}

impl PredictorParams {
    /// A message naming the first knob out of range.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temporal_decay > 0.0 && self.temporal_decay <= 1.0) {
            return Err(format!("temporal decay {} must be within (0, 1]", self.temporal_decay));
        }
        if !(0.0..=1.0).contains(&self.temporal_history) {
            return Err(format!(
                "temporal history weight {} must be within [0, 1]",
                self.temporal_history
            ));
        }
        Ok(())
    }
}

/// Which predictor to build, by name (used by the CLI and replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictorKind {
    Decayed,
    Window,
    Temporal,
    Affinity,
    Combined,
}

impl PredictorKind {
    pub const ALL: [PredictorKind; 5] = [
        PredictorKind::Decayed,
        PredictorKind::Window,
        PredictorKind::Temporal,
        PredictorKind::Affinity,
        PredictorKind::Combined,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PredictorKind::Decayed => "decayed",
            PredictorKind::Window => "window",
            PredictorKind::Temporal => "temporal",
            PredictorKind::Affinity => "affinity",
            PredictorKind::Combined => "combined",
        }
    }

    /// Whether the predictor reads the routes of the current step's earlier layers (and not
    /// only per-expert counts): callers that only have counts can skip building routes.
    pub fn reads_routes(self) -> bool {
        matches!(self, PredictorKind::Affinity | PredictorKind::Combined)
    }

    /// Build with `params` (the other predictors' knobs are the defaults used in the reports).
    pub fn build(
        self,
        params: &PredictorParams,
        layers: usize,
        experts: usize,
        top_k: usize,
    ) -> Box<dyn LoadPredictor + Send> {
        let temporal = || Temporal::new(layers, experts, params.temporal_decay, params.temporal_history);
        match self {
            PredictorKind::Decayed => Box::new(DecayedHistory::new(layers, experts, 0.95)),
            PredictorKind::Window => Box::new(SlidingWindow::new(layers, experts, 50)),
            PredictorKind::Temporal => Box::new(temporal()),
            PredictorKind::Affinity => Box::new(CrossLayerAffinity::new(layers, experts, top_k, 0.95, 4.0)),
            PredictorKind::Combined => Box::new(Combined::new(vec![
                (0.6, Box::new(temporal())),
                (
                    0.4,
                    Box::new(CrossLayerAffinity::new(layers, experts, top_k, 0.95, 4.0)),
                ),
            ])),
        }
    }
}

impl std::str::FromStr for PredictorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PredictorKind::ALL
            .into_iter()
            .find(|k| k.label() == s)
            .ok_or_else(|| format!("unknown predictor `{s}`"))
    }
}

/// Accuracy of a predictor over a replayed trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictionEval {
    /// Mean over steps and layers of the total-variation distance between the predicted and
    /// the actual load distribution (0 = perfect, 1 = disjoint).
    pub tv_error_mean: f64,
    /// Fraction of hot experts (actual load above 4x the mean expert load) that were also
    /// predicted above 4x the mean.
    pub hot_recall: f64,
    pub hot_total: u64,
}

/// Run predictor `kind` over `steps` exactly as replay does (predict a layer, then observe it).
pub fn evaluate(
    kind: PredictorKind,
    params: &PredictorParams,
    steps: &[crate::trace::Step],
    layers: usize,
    experts: usize,
    top_k: usize,
) -> PredictionEval {
    let mut p = kind.build(params, layers, experts, top_k);
    let mut pred = vec![0.0; experts];
    let (mut tv_sum, mut n) = (0.0, 0u64);
    let (mut hot, mut hit) = (0u64, 0u64);
    for step in steps {
        p.begin_step(step.group);
        for l in 0..layers {
            let counts = &step.counts[l];
            let slots: f64 = counts.iter().map(|&c| c as f64).sum();
            if slots > 0.0 {
                p.predict(l, &step.routes[..l], slots, &mut pred);
                let tv: f64 = pred.iter().zip(counts).map(|(a, &b)| (a - b as f64).abs()).sum::<f64>() / (2.0 * slots);
                tv_sum += tv;
                n += 1;
                let thresh = 4.0 * slots / experts as f64;
                for (a, &b) in pred.iter().zip(counts) {
                    if b as f64 > thresh {
                        hot += 1;
                        if *a > thresh {
                            hit += 1;
                        }
                    }
                }
            }
            p.observe(l, &step.routes[l], counts);
        }
    }
    PredictionEval {
        tv_error_mean: if n > 0 { tv_sum / n as f64 } else { 0.0 },
        hot_recall: if hot > 0 { hit as f64 / hot as f64 } else { 1.0 },
        hot_total: hot,
    }
}
