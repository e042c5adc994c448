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
        let fl = (exact.floor() as u32).min(count - given);
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

/// Shares that minimise the maximum GPU load for given `loads`: for each replicated expert,
/// water-fill its load into its instances' GPUs on top of the load that is fixed there
/// (single-instance experts). Replicated experts are processed heaviest first.
/// Returns shares aligned with `plan.instances`.
pub fn water_fill_shares(plan: &LayerPlan, loads: &[f64], gpus: usize) -> Vec<f64> {
    let n = plan.instances.len();
    let mut shares = vec![0.0; n];
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); loads.len()];
    for (i, inst) in plan.instances.iter().enumerate() {
        by_expert[inst.expert as usize].push(i);
    }
    let mut gpu = vec![0.0; gpus];
    let mut replicated = Vec::new();
    for (e, idx) in by_expert.iter().enumerate() {
        match idx.len() {
            0 => {}
            1 => {
                shares[idx[0]] = 1.0;
                gpu[plan.instances[idx[0]].gpu as usize] += loads[e];
            }
            _ => replicated.push(e),
        }
    }
    replicated.sort_by(|a, b| loads[*b].total_cmp(&loads[*a]).then(a.cmp(b)));
    let mut levels: Vec<(f64, usize)> = Vec::new();
    for e in replicated {
        let idx = &by_expert[e];
        let total = loads[e];
        if total <= 0.0 {
            for &i in idx {
                shares[i] = 1.0 / idx.len() as f64;
            }
            continue;
        }
        // Water level w: sum over instances of max(0, w - base) = total. Two instances of the
        // same expert on one GPU share that GPU's level.
        levels.clear();
        for &i in idx {
            levels.push((gpu[plan.instances[i].gpu as usize], i));
        }
        levels.sort_by(|a, b| a.0.total_cmp(&b.0));
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
            shares[i] = amount / total;
            sum += shares[i];
        }
        // Normalise rounding drift so the shares of the expert sum to exactly 1.
        for &(_, i) in levels.iter() {
            shares[i] /= sum;
            gpu[plan.instances[i].gpu as usize] += shares[i] * total;
        }
    }
    shares
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
