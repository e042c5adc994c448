//! Tensor math behind one trait, so one model definition serves every device.
//!
//! The model code ([`crate::model`]) and the expert functions ([`crate::expert`]) call only
//! these operations. [`CpuBackend`] implements them with `gemm` (the pure-Rust BLAS that
//! candle uses on CPU) for matrix products and rayon-parallel loops for the rest. A CUDA
//! backend (issue 9) implements the same trait.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// Geometry of one attention call over a single sequence.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at position `p` sees keys at `p - window < j <= p`.
    pub window: Option<usize>,
}

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// `y[N, out] = x[N, in] @ w[out, in]^T (+ bias[out])`, the `nn.Linear` convention.
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor;

    /// RMSNorm over the last dimension: `w * x / sqrt(mean(x^2) + eps)`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Tensor;

    /// LayerNorm over the last dimension with affine weight and bias.
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor;

    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Tensor;

    /// GPT-OSS's clamped gated activation: `(clamp(up) + 1) * g * sigmoid(alpha * g)` with
    /// `g = min(gate, limit)`, `up` clamped to `[-limit, limit]`.
    fn clamped_swiglu(&self, gate: &Tensor, up: &Tensor, limit: f32, alpha: f32) -> Tensor;

    /// Causal scaled-dot-product attention of `t` new queries of one sequence.
    ///
    /// `q`: `[t, heads, qk_dim]` at positions `q_start..q_start+t`; `k`: `[P, kv_heads, qk_dim]`
    /// and `v`: `[P, kv_heads, v_dim]` for positions `0..P` with `P >= q_start + t`.
    /// `sinks`: one learned logit per head that joins each softmax and is then dropped.
    /// Returns `[t, heads * v_dim]`.
    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        q_start: usize,
        sinks: Option<&[f32]>,
        shape: &AttentionShape,
    ) -> Tensor;
}

/// Host CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Below this many rows a matrix product is a few matrix-vector products; a plain
/// rayon-parallel dot-product loop beats gemm's packing there.
const GEMV_MAX_ROWS: usize = 4;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler keep the loop in vector registers.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn gemv_into(x: &[f32], w: &[f32], inp: usize, out: &mut [f32]) {
    const BLOCK: usize = 64;
    if out.len() * inp < 1 << 16 {
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot(x, &w[j * inp..(j + 1) * inp]);
        }
        return;
    }
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            for (jj, o) in chunk.iter_mut().enumerate() {
                let j = b * BLOCK + jj;
                *o = dot(x, &w[j * inp..(j + 1) * inp]);
            }
        });
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let n = x.rows();
        let inp = x.cols();
        let out = w.shape()[0];
        assert_eq!(
            w.cols(),
            inp,
            "linear: weight {:?} vs input {:?}",
            w.shape(),
            x.shape()
        );
        let mut y = vec![0.0f32; n * out];
        if n == 0 || out == 0 {
        } else if n <= GEMV_MAX_ROWS {
            for r in 0..n {
                gemv_into(x.row(r), w.data(), inp, &mut y[r * out..(r + 1) * out]);
            }
        } else {
            let par = if n * out * inp >= 1 << 18 {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the pointers and strides describe the row-major buffers above:
            // dst [n,out], lhs = x [n,inp], rhs = w^T viewed as [inp,out] (w is [out,inp]).
            unsafe {
                gemm::gemm(
                    n,
                    out,
                    inp,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    false,
                    x.data().as_ptr(),
                    1,
                    inp as isize,
                    w.data().as_ptr(),
                    inp as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        if let Some(b) = bias {
            for r in 0..n {
                for (o, bv) in y[r * out..(r + 1) * out].iter_mut().zip(b.data()) {
                    *o += *bv;
                }
            }
        }
        Tensor::matrix(n, out, y)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
        let d = x.cols();
        let mut y = x.clone();
        for row in y.data_mut().chunks_mut(d) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, g) in row.iter_mut().zip(w.data()) {
                *v = g * (*v * inv);
            }
        }
        y
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
        let d = x.cols();
        let mut y = x.clone();
        for row in y.data_mut().chunks_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), bb) in row.iter_mut().zip(w.data()).zip(b.data()) {
                *v = (*v - mean) * inv * g + bb;
            }
        }
        y
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        let data = gate
            .data()
            .iter()
            .zip(up.data())
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        Tensor::matrix(gate.rows(), gate.cols(), data)
    }

    fn clamped_swiglu(&self, gate: &Tensor, up: &Tensor, limit: f32, alpha: f32) -> Tensor {
        let data = gate
            .data()
            .iter()
            .zip(up.data())
            .map(|(g, u)| {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                let glu = g / (1.0 + (-(g * alpha)).exp());
                (u + 1.0) * glu
            })
            .collect();
        Tensor::matrix(gate.rows(), gate.cols(), data)
    }

    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        q_start: usize,
        sinks: Option<&[f32]>,
        s: &AttentionShape,
    ) -> Tensor {
        let t = q.len() / (s.heads * s.qk_dim);
        let group = s.heads / s.kv_heads;
        let mut out = vec![0.0f32; t * s.heads * s.v_dim];
        // One task per (query, head): each writes its own v_dim slice of the output.
        let work = |(idx, o): (usize, &mut [f32])| {
            let (i, h) = (idx / s.heads, idx % s.heads);
            let kvh = h / group;
            let pos = q_start + i;
            let lo = s.window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
            let qv = &q[(i * s.heads + h) * s.qk_dim..(i * s.heads + h + 1) * s.qk_dim];
            let mut scores: Vec<f32> = (lo..=pos)
                .map(|j| {
                    let kv = &k
                        [(j * s.kv_heads + kvh) * s.qk_dim..(j * s.kv_heads + kvh + 1) * s.qk_dim];
                    dot(qv, kv) * s.scale
                })
                .collect();
            let sink = sinks.map(|sk| sk[h]);
            let mut max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if let Some(sv) = sink {
                max = max.max(sv);
            }
            let mut denom = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                denom += *sc;
            }
            if let Some(sv) = sink {
                denom += (sv - max).exp();
            }
            for (jj, p) in scores.iter().enumerate() {
                let j = lo + jj;
                let w = p / denom;
                let vv = &v[(j * s.kv_heads + kvh) * s.v_dim..(j * s.kv_heads + kvh + 1) * s.v_dim];
                for (a, b) in o.iter_mut().zip(vv) {
                    *a += w * b;
                }
            }
        };
        if t * s.heads * (q_start + t) * s.qk_dim >= 1 << 16 {
            out.par_chunks_mut(s.v_dim).enumerate().for_each(work);
        } else {
            out.chunks_mut(s.v_dim).enumerate().for_each(work);
        }
        Tensor::matrix(t, s.heads * s.v_dim, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_linear(x: &Tensor, w: &Tensor) -> Vec<f32> {
        let (n, inp, out) = (x.rows(), x.cols(), w.shape()[0]);
        let mut y = vec![0.0; n * out];
        for r in 0..n {
            for j in 0..out {
                y[r * out + j] = (0..inp).map(|k| x.row(r)[k] * w.row(j)[k]).sum();
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive_on_both_paths() {
        for n in [1, 3, 9, 33] {
            let (inp, out) = (37, 129);
            let x = Tensor::matrix(
                n,
                inp,
                (0..n * inp)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                    .collect(),
            );
            let w = Tensor::matrix(
                out,
                inp,
                (0..out * inp)
                    .map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0)
                    .collect(),
            );
            let y = CpuBackend.linear(&x, &w, None);
            let want = naive_linear(&x, &w);
            for (a, b) in y.data().iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn attention_with_window_and_sink() {
        // One head, dim 1: scores are q*k; check against a hand-written softmax.
        let s = AttentionShape {
            heads: 1,
            kv_heads: 1,
            qk_dim: 1,
            v_dim: 1,
            scale: 1.0,
            window: Some(2),
        };
        let q = [1.0f32];
        let k = [5.0f32, 1.0, 2.0];
        let v = [100.0f32, 10.0, 20.0];
        let out = CpuBackend.attention(&q, &k, &v, 2, Some(&[0.5]), &s);
        // window 2 at position 2 sees keys 1 and 2 only.
        let e = [1.0f32.exp(), 2.0f32.exp(), 0.5f32.exp()];
        let want = (10.0 * e[0] + 20.0 * e[1]) / (e[0] + e[1] + e[2]);
        assert!((out.data()[0] - want).abs() < 1e-4);
    }
}
