//! Seeded synthetic routing traces for model shapes without a per-token trace.
//!
//! # Method
//! Calibration comes from aggregate data: per-layer expert popularity `p[l][e]` (token counts
//! of OLMoE/Mixtral, or activation fractions of Qwen3, read by [`crate::trace_formats`]) and,
//! where available, cross-layer affinity `A[l][a][b] = P(b at layer l | a at layer l-1)`
//! (from co-activation counts). The generator then reproduces the three structures that matter
//! for placement:
//! 1. **Skew per layer**: choices are drawn from `p[l]`, so the hot/cold experts of the data stay
//!    hot/cold.
//! 2. **Domain shift between batches**: each group of `batch` queries draws its own popularity
//!    `p[l][e] * exp(domain_sigma * z[e])` (z standard normal, renormalised): history from one
//!    group only partly carries over to the next, as between MMLU subjects.
//! 3. **Temporal and cross-layer correlation**: at decode step s > 0 a query keeps its previous
//!    step's choice at a layer with probability `persistence` (0.33 measured on the Llama-4
//!    decode trace: the share of decode tokens choosing the same expert as the query's previous
//!    token at the same layer); otherwise its top-k is drawn without replacement from
//!    `(1 - affinity_weight) * p_group[l] + affinity_weight * mean_a A[l][a]` over the query's
//!    choices `a` at layer l-1 (the affinity term is skipped at layer 0 or without matrices).
//!
//! The random source is SplitMix64 seeded from `seed`, so a configuration always yields the
//! same steps.

use thiserror::Error;

use crate::plan::{LoadMatrix, PlanError};
use crate::trace::Step;

#[derive(Debug, Error, PartialEq)]
pub enum SynthError {
    #[error("synthetic trace popularity: {0}")]
    Loads(#[from] PlanError),
    #[error("synthetic trace: layer {layer} has zero total popularity")]
    ZeroLayer { layer: usize },
    #[error("synthetic trace: {0}")]
    Shape(String),
}

/// How to generate; see the module documentation for the method.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub top_k: usize,
    /// Queries per group (batch).
    pub batch: usize,
    pub groups: usize,
    pub steps_per_group: usize,
    pub domain_sigma: f64,
    pub persistence: f64,
    pub affinity_weight: f64,
    pub seed: u64,
}

impl SynthConfig {
    pub fn new(top_k: usize, batch: usize, groups: usize, steps_per_group: usize, seed: u64) -> Self {
        Self {
            top_k,
            batch,
            groups,
            steps_per_group,
            domain_sigma: 0.5,
            persistence: 0.33,
            affinity_weight: 0.5,
            seed,
        }
    }
}

pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Draw `k` distinct experts from weights `w` (sequentially, without replacement).
fn draw_top_k(w: &[f64], k: usize, rng: &mut SplitMix, taken: &mut [bool], out: &mut Vec<u32>) {
    out.clear();
    let mut total: f64 = w.iter().sum();
    for _ in 0..k {
        let mut x = rng.unit() * total;
        let mut pick = None;
        for (e, &v) in w.iter().enumerate() {
            if v <= 0.0 || taken[e] {
                continue;
            }
            pick = Some(e);
            if x < v {
                break;
            }
            x -= v;
        }
        let e = pick.unwrap_or_else(|| (0..w.len()).find(|&e| !taken[e]).unwrap_or(0));
        total -= w[e].max(0.0);
        taken[e] = true;
        out.push(e as u32);
    }
    for &e in out.iter() {
        taken[e as usize] = false;
    }
}

/// Generate `groups x steps_per_group` decode steps from per-layer popularity `popularity`
/// (`[layer][expert]`, any non-negative scale) and optional `affinity[l]` (row-stochastic
/// `experts x experts`, for layer `l` given layer `l - 1`; index 0 unused).
pub fn generate(
    popularity: &[Vec<f64>],
    affinity: Option<&[Vec<Vec<f64>>]>,
    cfg: &SynthConfig,
) -> Result<Vec<Step>, SynthError> {
    let pop = LoadMatrix::new(popularity.to_vec())?;
    let (layers, experts) = (pop.num_layers(), pop.num_experts());
    if cfg.top_k == 0 || cfg.top_k > experts || cfg.batch == 0 {
        return Err(SynthError::Shape(format!(
            "need 1 <= top_k ({}) <= experts ({experts}) and batch >= 1",
            cfg.top_k
        )));
    }
    for (name, v) in [
        ("domain_sigma", cfg.domain_sigma),
        ("persistence", cfg.persistence),
        ("affinity_weight", cfg.affinity_weight),
    ] {
        if !v.is_finite() || v < 0.0 || (name != "domain_sigma" && v > 1.0) {
            return Err(SynthError::Shape(format!("{name} = {v} is out of range")));
        }
    }
    if let Some(a) = affinity {
        let ok = a.len() == layers
            && a.iter()
                .skip(1)
                .all(|m| m.len() == experts && m.iter().all(|r| r.len() == experts));
        if !ok {
            return Err(SynthError::Shape(format!(
                "affinity must hold {layers} matrices of {experts}x{experts}"
            )));
        }
    }
    for l in 0..layers {
        if pop.layer(l).iter().sum::<f64>() <= 0.0 {
            return Err(SynthError::ZeroLayer { layer: l });
        }
    }
    let mut rng = SplitMix(cfg.seed);
    let k = cfg.top_k;
    let mut steps = Vec::with_capacity(cfg.groups * cfg.steps_per_group);
    let mut w = vec![0.0; experts];
    let mut pick = Vec::with_capacity(k);
    let mut taken = vec![false; experts];
    for g in 0..cfg.groups {
        let group_pop: Vec<Vec<f64>> = (0..layers)
            .map(|l| {
                let row = pop.layer(l);
                let total: f64 = row.iter().sum();
                let mut r: Vec<f64> = row
                    .iter()
                    .map(|p| p / total * (cfg.domain_sigma * rng.normal()).exp())
                    .collect();
                let s: f64 = r.iter().sum();
                r.iter_mut().for_each(|v| *v /= s);
                r
            })
            .collect();
        let mut prev: Option<Vec<Vec<u32>>> = None;
        for s in 0..cfg.steps_per_group {
            let mut routes = vec![Vec::with_capacity(cfg.batch * k); layers];
            for q in 0..cfg.batch {
                for l in 0..layers {
                    let keep = prev.is_some() && rng.unit() < cfg.persistence;
                    if let (true, Some(p)) = (keep, &prev) {
                        let old = p[l][q * k..(q + 1) * k].to_vec();
                        routes[l].extend(old);
                        continue;
                    }
                    w.copy_from_slice(&group_pop[l]);
                    if let (Some(a), true) = (affinity, l > 0 && cfg.affinity_weight > 0.0) {
                        let before: Vec<u32> = routes[l - 1][q * k..(q + 1) * k].to_vec();
                        let aw = cfg.affinity_weight;
                        for (e, v) in w.iter_mut().enumerate() {
                            let cond: f64 = before.iter().map(|&b| a[l][b as usize][e]).sum::<f64>() / k as f64;
                            *v = (1.0 - aw) * *v + aw * cond;
                        }
                    }
                    draw_top_k(&w, k, &mut rng, &mut taken, &mut pick);
                    routes[l].extend_from_slice(&pick);
                }
            }
            prev = Some(routes.clone());
            steps.push(Step::new(g, s, routes, experts));
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skewed(layers: usize, experts: usize) -> Vec<Vec<f64>> {
        (0..layers)
            .map(|l| (0..experts).map(|e| 1.0 / (1.0 + ((e + l) % experts) as f64)).collect())
            .collect()
    }

    #[test]
    fn deterministic_shaped_and_skewed() {
        let pop = skewed(3, 16);
        let cfg = SynthConfig::new(2, 32, 2, 20, 7);
        let a = generate(&pop, None, &cfg).unwrap();
        assert_eq!(a, generate(&pop, None, &cfg).unwrap());
        assert_ne!(
            a,
            generate(&pop, None, &SynthConfig { seed: 8, ..cfg.clone() }).unwrap()
        );
        assert_eq!(a.len(), 40);
        let mut totals = vec![0u64; 16];
        for s in &a {
            assert_eq!(s.routes[0].len(), 64);
            for tok in s.routes[1].chunks(2) {
                assert_ne!(tok[0], tok[1], "top-k choices are distinct");
            }
            for (t, &c) in totals.iter_mut().zip(&s.counts[0]) {
                *t += u64::from(c);
            }
        }
        // Expert 0 has popularity 1, expert 15 has 1/16: the hot one must dominate.
        assert!(totals[0] > 4 * totals[15], "{totals:?}");
    }

    #[test]
    fn persistence_repeats_previous_choices() {
        let pop = vec![vec![1.0; 64]];
        let mut cfg = SynthConfig::new(1, 64, 1, 30, 1);
        cfg.persistence = 0.9;
        let steps = generate(&pop, None, &cfg).unwrap();
        let same: usize = steps
            .windows(2)
            .map(|w| {
                w[0].routes[0]
                    .iter()
                    .zip(&w[1].routes[0])
                    .filter(|(a, b)| a == b)
                    .count()
            })
            .sum();
        let frac = same as f64 / (29 * 64) as f64;
        assert!(frac > 0.85, "{frac}");
    }

    #[test]
    fn affinity_steers_the_next_layer() {
        let pop = vec![vec![1.0; 4]; 2];
        // Layer 1 copies layer 0's choice.
        let ident: Vec<Vec<f64>> = (0..4).map(|a| (0..4).map(|b| f64::from(a == b)).collect()).collect();
        let aff = vec![vec![], ident];
        let mut cfg = SynthConfig::new(1, 16, 1, 5, 3);
        cfg.affinity_weight = 1.0;
        cfg.persistence = 0.0;
        for s in generate(&pop, Some(&aff), &cfg).unwrap() {
            assert_eq!(s.routes[0], s.routes[1]);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = SynthConfig::new(2, 4, 1, 1, 0);
        assert!(matches!(
            generate(&[vec![1.0, f64::NAN]], None, &cfg),
            Err(SynthError::Loads(PlanError::BadLoad { expert: 1, .. }))
        ));
        assert_eq!(
            generate(&[vec![0.0, 0.0]], None, &cfg),
            Err(SynthError::ZeroLayer { layer: 0 })
        );
        assert!(generate(&[vec![1.0]], None, &cfg).is_err());
        let mut c = cfg.clone();
        c.persistence = 1.5;
        assert!(generate(&[vec![1.0, 1.0]], None, &c).is_err());
        assert!(generate(
            &[vec![1.0, 1.0], vec![1.0, 1.0]],
            Some(&[vec![], vec![vec![1.0]]]),
            &cfg
        )
        .is_err());
    }
}
