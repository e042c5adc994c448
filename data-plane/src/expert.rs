//! The expert-function seam: every routed expert of every MoE layer runs through
//! [`ExpertFunction`], addressed by [`InstanceId`] (an `(layer, expert)` key plus a replica).
//!
//! The engine groups a layer's tokens per expert, splits each expert's tokens across that
//! expert's instances by dispatch shares ([`ShareSource`]), hands all of the layer's work to
//! the expert function in one call (so a remote transport can send one message per worker
//! and layer), and combines the outputs. Outputs never depend on how tokens were split.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;
use shared::{ExpertKey, InstanceId};

use crate::backend::Backend;
use crate::checkpoint::TensorSource;
use crate::config::{ExpertLayout, FfnKind, ModelConfig};
use crate::error::LoadError;
use crate::tensor::Tensor;
use crate::weight::Weight;

/// GPT-OSS's hard-coded activation constants (`limit`, `alpha` in transformers).
pub const GPT_OSS_LIMIT: f32 = 7.0;
pub const GPT_OSS_ALPHA: f32 = 1.702;

/// The weights of one routed expert, in `nn.Linear` orientation (`[out, in]`).
#[derive(Debug, Clone)]
pub enum ExpertWeights {
    /// `down(silu(gate x) * up x)`.
    SwiGlu { gate: Weight, up: Weight, down: Weight },
    /// GPT-OSS: biased projections and a clamped activation.
    Clamped {
        gate: Weight,
        gate_bias: Tensor,
        up: Weight,
        up_bias: Tensor,
        down: Weight,
        down_bias: Tensor,
    },
}

/// Transposes a `[rows, cols]` row-major matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = data[r * cols + c];
        }
    }
    t
}

impl ExpertWeights {
    /// Reads one expert's tensors from a checkpoint (only that expert's bytes).
    pub fn load(ckpt: &dyn TensorSource, cfg: &ModelConfig, key: ExpertKey) -> Result<Self, LoadError> {
        let (layer, e) = (key.layer as usize, key.expert as usize);
        let (h, i) = (cfg.hidden_size, cfg.moe.expert_intermediate);
        if layer >= cfg.num_layers || cfg.layer_ffn[layer] != FfnKind::Moe || e >= cfg.moe.num_experts {
            return Err(LoadError::config(
                "expert",
                format!("{key} is not a routed expert of this model"),
            ));
        }
        match cfg.moe.layout {
            ExpertLayout::SwiGlu => {
                let [g, u, d] = cfg.expert_tensor_names(layer, e);
                Ok(ExpertWeights::SwiGlu {
                    gate: ckpt.weight(&g, &[i, h])?,
                    up: ckpt.weight(&u, &[i, h])?,
                    down: ckpt.weight(&d, &[h, i])?,
                })
            }
            ExpertLayout::GptOssFused => {
                let p = format!("{}.experts", cfg.moe_prefix(layer));
                let n = cfg.moe.num_experts;
                // gate_up_proj is [E, H, 2I] ([in, out]) with gate and up interleaved on the last dim.
                let gu = ckpt.tensor_slab(&format!("{p}.gate_up_proj"), &[n, h, 2 * i], e)?;
                let gu_t = transpose(gu.data(), h, 2 * i); // [2I, H]
                let gub = ckpt.tensor_slab(&format!("{p}.gate_up_proj_bias"), &[n, 2 * i], e)?;
                let (mut gate, mut up) = (Vec::with_capacity(i * h), Vec::with_capacity(i * h));
                let (mut gate_b, mut up_b) = (Vec::with_capacity(i), Vec::with_capacity(i));
                for j in 0..i {
                    gate.extend_from_slice(&gu_t[(2 * j) * h..(2 * j + 1) * h]);
                    up.extend_from_slice(&gu_t[(2 * j + 1) * h..(2 * j + 2) * h]);
                    gate_b.push(gub.data()[2 * j]);
                    up_b.push(gub.data()[2 * j + 1]);
                }
                let down = ckpt.tensor_slab(&format!("{p}.down_proj"), &[n, i, h], e)?; // [I, H]
                let down_bias = ckpt.tensor_slab(&format!("{p}.down_proj_bias"), &[n, h], e)?;
                Ok(ExpertWeights::Clamped {
                    gate: Tensor::matrix(i, h, gate).into(),
                    gate_bias: Tensor::matrix(1, i, gate_b),
                    up: Tensor::matrix(i, h, up).into(),
                    up_bias: Tensor::matrix(1, i, up_b),
                    down: Tensor::matrix(h, i, transpose(down.data(), i, h)).into(),
                    down_bias: Tensor::matrix(1, h, down_bias.into_data()),
                })
            }
        }
    }

    /// Runs the expert on `x: [n, hidden]`.
    pub fn forward(&self, backend: &dyn Backend, x: &Tensor) -> Tensor {
        match self {
            ExpertWeights::SwiGlu { gate, up, down } => {
                let g = backend.linear(x, gate, None);
                let u = backend.linear(x, up, None);
                backend.linear(&backend.silu_mul(&g, &u), down, None)
            }
            ExpertWeights::Clamped {
                gate,
                gate_bias,
                up,
                up_bias,
                down,
                down_bias,
            } => {
                let g = backend.linear(x, gate, Some(gate_bias));
                let u = backend.linear(x, up, Some(up_bias));
                let a = backend.clamped_swiglu(&g, &u, GPT_OSS_LIMIT, GPT_OSS_ALPHA);
                backend.linear(&a, down, Some(down_bias))
            }
        }
    }

    /// Bytes the weights occupy as loaded (f32).
    pub fn bytes(&self) -> usize {
        match self {
            ExpertWeights::SwiGlu { gate, up, down } => gate.bytes() + up.bytes() + down.bytes(),
            ExpertWeights::Clamped {
                gate,
                gate_bias,
                up,
                up_bias,
                down,
                down_bias,
            } => gate.bytes() + up.bytes() + down.bytes() + 4 * (gate_bias.len() + up_bias.len() + down_bias.len()),
        }
    }
}

/// One unit of work for an expert instance: the activations of the tokens sent to it.
#[derive(Debug, Clone)]
pub struct ExpertTask {
    pub instance: InstanceId,
    /// `[tokens, hidden]`.
    pub input: Tensor,
}

#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("no instance {0:?} of this expert is held here")]
    NoInstance(InstanceId),
    #[error("expert {key} got input of shape {shape:?}, expected [n, {hidden}]")]
    BadInput {
        key: ExpertKey,
        shape: Vec<usize>,
        hidden: usize,
    },
    #[error("transport: {0}")]
    Transport(String),
}

/// Executes expert functions. One call carries all of one layer's work.
pub trait ExpertFunction: Send + Sync {
    /// Runs every task (all of them belong to MoE layer `layer`) and returns one `[n, hidden]`
    /// output per task, in task order.
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError>;
}

/// Every expert in this process, all replicas served by the same weights.
pub struct LocalExperts {
    backend: Arc<dyn Backend>,
    hidden: usize,
    weights: HashMap<ExpertKey, Arc<ExpertWeights>>,
}

impl LocalExperts {
    pub fn new(backend: Arc<dyn Backend>, hidden: usize) -> Self {
        Self {
            backend,
            hidden,
            weights: HashMap::new(),
        }
    }

    /// Loads every routed expert of the model.
    pub fn load_all(ckpt: &dyn TensorSource, cfg: &ModelConfig, backend: Arc<dyn Backend>) -> Result<Self, LoadError> {
        let mut me = Self::new(backend, cfg.hidden_size);
        for layer in cfg.moe_layers() {
            for e in 0..cfg.moe.num_experts {
                let key = ExpertKey::new(layer, e);
                me.insert(key, ExpertWeights::load(ckpt, cfg, key)?);
            }
        }
        Ok(me)
    }

    pub fn insert(&mut self, key: ExpertKey, w: ExpertWeights) {
        self.weights.insert(key, Arc::new(w));
    }

    pub fn remove(&mut self, key: ExpertKey) -> Option<Arc<ExpertWeights>> {
        self.weights.remove(&key)
    }

    pub fn get(&self, key: ExpertKey) -> Option<&Arc<ExpertWeights>> {
        self.weights.get(&key)
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    fn run(&self, task: &ExpertTask) -> Result<Tensor, ExpertError> {
        let key = task.instance.key;
        let w = self.weights.get(&key).ok_or(ExpertError::NoInstance(task.instance))?;
        if task.input.cols() != self.hidden || task.input.shape().len() != 2 {
            return Err(ExpertError::BadInput {
                key,
                shape: task.input.shape().to_vec(),
                hidden: self.hidden,
            });
        }
        Ok(w.forward(self.backend.as_ref(), &task.input))
    }
}

impl ExpertFunction for LocalExperts {
    fn execute(&self, _layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        let rows: usize = tasks.iter().map(|t| t.input.rows()).sum();
        // Few tokens per expert (decode): run experts side by side; many tokens (prefill):
        // one expert at a time, each matrix product parallel inside.
        if tasks.len() > 1 && rows <= 4 * tasks.len() {
            tasks.par_iter().map(|t| self.run(t)).collect()
        } else {
            tasks.iter().map(|t| self.run(t)).collect()
        }
    }
}

/// Where an expert's tokens go: its instances and the share of tokens each receives.
pub trait ShareSource: Send + Sync {
    /// Instances of `key` with their shares (non-negative, summing to 1).
    fn shares(&self, key: ExpertKey) -> Vec<(InstanceId, f32)>;
}

/// One instance per expert, all tokens to it.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleInstance;

impl ShareSource for SingleInstance {
    fn shares(&self, key: ExpertKey) -> Vec<(InstanceId, f32)> {
        vec![(InstanceId { key, replica: 0 }, 1.0)]
    }
}

/// Every expert split over `k` instances with deterministic, uneven shares (instance `r`
/// gets a weight of `1 + ((r + layer + expert) mod k)`), to exercise the seam.
#[derive(Debug, Clone, Copy)]
pub struct UnevenSplit {
    pub k: u32,
}

impl ShareSource for UnevenSplit {
    fn shares(&self, key: ExpertKey) -> Vec<(InstanceId, f32)> {
        let k = self.k.max(1);
        let w: Vec<f32> = (0..k)
            .map(|r| 1.0 + ((r + key.layer + key.expert) % k) as f32)
            .collect();
        let total: f32 = w.iter().sum();
        (0..k)
            .map(|r| (InstanceId { key, replica: r }, w[r as usize] / total))
            .collect()
    }
}

/// Splits `n` tokens into per-instance counts proportional to `shares` (largest remainder;
/// ties to the lower index), so counts always sum to `n`.
pub fn split_counts(n: usize, shares: &[f32]) -> Vec<usize> {
    let total: f64 = shares.iter().map(|&s| s.max(0.0) as f64).sum();
    if shares.is_empty() {
        return vec![];
    }
    if total <= 0.0 {
        let mut c = vec![0; shares.len()];
        c[0] = n;
        return c;
    }
    let exact: Vec<f64> = shares.iter().map(|&s| s.max(0.0) as f64 / total * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = n - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_counts_sum_and_proportion() {
        assert_eq!(split_counts(10, &[0.5, 0.5]), vec![5, 5]);
        assert_eq!(split_counts(3, &[1.0 / 3.0; 3]), vec![1, 1, 1]);
        assert_eq!(split_counts(1, &[0.2, 0.8]), vec![0, 1]);
        assert_eq!(split_counts(7, &[0.0, 0.0]), vec![7, 0]);
        for n in 0..50 {
            let c = split_counts(n, &[0.1, 0.3, 0.6]);
            assert_eq!(c.iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn uneven_split_shares_sum_to_one_and_differ() {
        let s = UnevenSplit { k: 3 }.shares(ExpertKey::new(1, 2));
        let total: f32 = s.iter().map(|x| x.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(s[0].1 != s[1].1);
    }
}
