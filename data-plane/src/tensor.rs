//! A dense row-major f32 tensor in host memory.
//!
//! Model code holds activations and weights in this type and does all arithmetic through a
//! [`crate::backend::Backend`]. Storage is host memory today; a device backend (issue 9) adds
//! device-resident storage behind the same backend calls.

use std::fmt;

#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

/// Why a tensor could not be built from the parts given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tensor of shape {shape:?} needs {expected} elements, got {actual}")]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub actual: usize,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ShapeError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ShapeError {
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// A `[rows, cols]` matrix; panics only on a programming error inside the engine
    /// (callers build `data` from `rows * cols` themselves).
    pub fn matrix(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(rows * cols, data.len(), "matrix({rows}, {cols}) data length");
        Self {
            shape: vec![rows, cols],
            data,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Number of rows when viewed as a matrix over the last dimension.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.cols()).unwrap_or(0)
    }

    /// Size of the last dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        let c = self.cols();
        &self.data[r * c..(r + 1) * c]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        let c = self.cols();
        &mut self.data[r * c..(r + 1) * c]
    }

    /// Gathers the given rows into a new `[rows.len(), cols]` matrix.
    pub fn gather_rows(&self, rows: &[usize]) -> Tensor {
        let c = self.cols();
        let mut data = Vec::with_capacity(rows.len() * c);
        for &r in rows {
            data.extend_from_slice(self.row(r));
        }
        Tensor::matrix(rows.len(), c, data)
    }

    /// Rows `start..end` as a new matrix.
    pub fn slice_rows(&self, start: usize, end: usize) -> Tensor {
        let c = self.cols();
        Tensor::matrix(end - start, c, self.data[start * c..end * c].to_vec())
    }

    /// Stacks matrices with equal column counts vertically.
    pub fn concat_rows(parts: &[Tensor]) -> Tensor {
        let c = parts.first().map(|p| p.cols()).unwrap_or(0);
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            debug_assert_eq!(p.cols(), c);
            data.extend_from_slice(&p.data);
        }
        let rows = data.len().checked_div(c).unwrap_or(0);
        Tensor::matrix(rows, c, data)
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Tensor, ShapeError> {
        Tensor::new(shape, self.data)
    }

    pub fn add_assign(&mut self, other: &Tensor) {
        debug_assert_eq!(self.data.len(), other.data.len());
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += *b;
        }
    }

    /// Maximum absolute element-wise difference (for tests and parity reports).
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}
