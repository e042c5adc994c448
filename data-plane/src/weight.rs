//! Matrix weights as stored in memory: f32, or bf16 kept as loaded from a bf16 checkpoint.
//!
//! Decoding reads every weight once per token, so its speed is set by memory bandwidth;
//! keeping bf16 checkpoints in bf16 halves the bytes read. Products still accumulate in f32,
//! and bf16 -> f32 is exact, so results equal converting at load time.

use crate::tensor::Tensor;

#[derive(Clone, PartialEq)]
pub enum Weight {
    F32(Tensor),
    /// Row-major `[rows, cols]` bf16 bit patterns.
    Bf16 {
        rows: usize,
        cols: usize,
        data: Vec<u16>,
    },
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Weight::F32(t) => write!(f, "Weight::F32{:?}", t.shape()),
            Weight::Bf16 { rows, cols, .. } => write!(f, "Weight::Bf16[{rows}, {cols}]"),
        }
    }
}

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl Weight {
    /// Output features (rows of the `[out, in]` matrix).
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(t) => t.shape()[0],
            Weight::Bf16 { rows, .. } => *rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(t) => t.cols(),
            Weight::Bf16 { cols, .. } => *cols,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(t) => t.len() * 4,
            Weight::Bf16 { data, .. } => data.len() * 2,
        }
    }

    /// Rows `start..end` converted to f32, row-major.
    pub fn rows_f32(&self, start: usize, end: usize) -> Vec<f32> {
        match self {
            Weight::F32(t) => t.data()[start * t.cols()..end * t.cols()].to_vec(),
            Weight::Bf16 { cols, data, .. } => data[start * cols..end * cols].iter().map(|&b| bf16_to_f32(b)).collect(),
        }
    }

    pub fn to_f32(&self) -> Tensor {
        match self {
            Weight::F32(t) => t.clone(),
            Weight::Bf16 { rows, cols, .. } => Tensor::matrix(*rows, *cols, self.rows_f32(0, *rows)),
        }
    }
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::F32(t)
    }
}
