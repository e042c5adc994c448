//! Rotary position embeddings as transformers computes them (default and YaRN scaling).

use crate::config::{RopeConfig, Yarn};

#[derive(Debug, Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
    pub dim: usize,
    pub interleave: bool,
}

/// YaRN's magnitude correction `0.1 * m * ln(scale) + 1`.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Rope {
    pub fn new(cfg: &RopeConfig) -> Self {
        let dim = cfg.dim;
        let half = dim / 2;
        // transformers computes base ** (arange(0, dim, 2) / dim) in float32.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| (cfg.theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match &cfg.yarn {
            None => Rope {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_scaling: 1.0,
                dim,
                interleave: cfg.interleave,
            },
            Some(y) => Self::yarn(cfg, y, &pos_freqs),
        }
    }

    fn yarn(cfg: &RopeConfig, y: &Yarn, pos_freqs: &[f32]) -> Self {
        let dim = cfg.dim as f64;
        let base = cfg.theta;
        let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(mad)) if m != 0.0 && mad != 0.0 => {
                yarn_mscale(y.factor, m) / yarn_mscale(y.factor, mad)
            }
            _ => yarn_mscale(y.factor, 1.0),
        };
        let correction_dim = |rot: f64| {
            (dim * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = (((i as f32) - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extrap = 1.0 / p;
                let interp = 1.0 / (y.factor as f32 * p);
                interp * (1.0 - extrapolation_factor) + extrap * extrapolation_factor
            })
            .collect();
        Rope {
            inv_freq,
            attention_scaling: attention_factor as f32,
            dim: cfg.dim,
            interleave: cfg.interleave,
        }
    }

    /// `(cos, sin)` of each frequency at `pos`, scaled by the attention factor.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|f| {
                let a = p * f;
                (a.cos() * self.attention_scaling, a.sin() * self.attention_scaling)
            })
            .unzip()
    }

    /// Rotates the first `dim` values of `x` (one head) in place, rotate-half convention.
    pub fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.dim / 2;
        if self.interleave {
            // [x0, x1, x2, x3, ..] -> [x0, x2, .., x1, x3, ..]
            let tmp: Vec<f32> = (0..half)
                .map(|i| x[2 * i])
                .chain((0..half).map(|i| x[2 * i + 1]))
                .collect();
            x[..self.dim].copy_from_slice(&tmp);
        }
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i] + a * sin[i];
        }
    }
}
