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
#[derive(Debug, Clone, PartialEq)]
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

/// Tile edge of the blocked transposes: a tile of source and destination stays in L1, so
/// the strided side does not miss the cache on every element (expert cold starts).
const TILE: usize = 32;

/// Transposes a `[rows, cols]` row-major matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    t
}

/// Splits a `[rows, 2 * half]` matrix whose columns interleave two matrices (even, odd) and
/// transposes each: returns `([half, rows], [half, rows])`.
fn split_transpose(data: &[f32], rows: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut even, mut odd) = (vec![0.0; rows * half], vec![0.0; rows * half]);
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..half).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &data[r * 2 * half..(r + 1) * 2 * half];
                for c in c0..(c0 + TILE).min(half) {
                    even[c * rows + r] = row[2 * c];
                    odd[c * rows + r] = row[2 * c + 1];
                }
            }
        }
    }
    (even, odd)
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
                let (gate, up) = split_transpose(gu.data(), h, i); // [I, H] each
                let gub = ckpt.tensor_slab(&format!("{p}.gate_up_proj_bias"), &[n, 2 * i], e)?;
                let (mut gate_b, mut up_b) = (Vec::with_capacity(i), Vec::with_capacity(i));
                for j in 0..i {
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
            ExpertWeights::SwiGlu { gate, up, down } => backend.swiglu_ffn(x, gate, up, down),
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

/// Why bytes are not a valid encoding of one expert's weights ([`ExpertWeights::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes are too few for the {needed}-byte header")]
    Truncated { len: usize, needed: usize },
    #[error("bad magic (not an encoded expert, or another format version)")]
    BadMagic,
    #[error("header checksum mismatch (corrupted header)")]
    BadChecksum,
    #[error("{key} is not a routed expert of this model")]
    NotARoutedExpert { key: ExpertKey },
    #[error("layout tag {found}, the model's experts use tag {expected}")]
    WrongLayout { expected: u8, found: u8 },
    #[error("tensor {index}: dtype tag {tag} is not allowed there")]
    BadDtype { index: usize, tag: u8 },
    #[error("tensor {index} has shape [{rows}, {cols}], expected [{expected_rows}, {expected_cols}]")]
    WrongShape {
        index: usize,
        rows: u32,
        cols: u32,
        expected_rows: usize,
        expected_cols: usize,
    },
    #[error("{len} bytes, expected exactly {expected}")]
    WrongLength { len: usize, expected: usize },
}

/// Format version 1 of the expert encoding.
const ENCODING_MAGIC: [u8; 8] = *b"MOEXPW\x00\x01";
const DTYPE_F32: u8 = 0;
const DTYPE_BF16: u8 = 1;
const LAYOUT_SWIGLU: u8 = 0;
const LAYOUT_CLAMPED: u8 = 1;
/// Per tensor: dtype tag, rows, cols.
const DESCRIPTOR_LEN: usize = 1 + 4 + 4;

/// FNV-1a over the header: catches a corrupted header; the payload's integrity is left to the
/// transport (QUIC/TLS authenticates every byte) so loading stays at memory speed.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// One tensor of the encoding: a matrix weight (f32 or bf16) or an f32 bias row.
enum Part<'a> {
    Weight(&'a Weight),
    Bias(&'a Tensor),
}

impl Part<'_> {
    fn descriptor(&self) -> (u8, u32, u32) {
        match self {
            Part::Weight(Weight::F32(t)) => (DTYPE_F32, t.rows() as u32, t.cols() as u32),
            Part::Weight(Weight::Bf16 { rows, cols, .. }) => (DTYPE_BF16, *rows as u32, *cols as u32),
            Part::Bias(t) => (DTYPE_F32, 1, t.len() as u32),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Part::Weight(Weight::F32(t)) => out.extend(t.data().iter().flat_map(|v| v.to_le_bytes())),
            Part::Bias(t) => out.extend(t.data().iter().flat_map(|v| v.to_le_bytes())),
            Part::Weight(Weight::Bf16 { data, .. }) => out.extend(data.iter().flat_map(|v| v.to_le_bytes())),
        }
    }
}

/// Reads little-endian integers from a byte slice whose length was checked beforehand.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl ExpertWeights {
    fn parts(&self) -> Vec<Part<'_>> {
        match self {
            ExpertWeights::SwiGlu { gate, up, down } => vec![Part::Weight(gate), Part::Weight(up), Part::Weight(down)],
            ExpertWeights::Clamped {
                gate,
                gate_bias,
                up,
                up_bias,
                down,
                down_bias,
            } => vec![
                Part::Weight(gate),
                Part::Bias(gate_bias),
                Part::Weight(up),
                Part::Bias(up_bias),
                Part::Weight(down),
                Part::Bias(down_bias),
            ],
        }
    }

    /// A canonical binary encoding of these weights for shipping a warm instance to a peer:
    /// dtype-preserving (bf16 stays bf16), little-endian. Layout: magic, layout tag (u8),
    /// tensor count (u8), per tensor (dtype u8, rows u32, cols u32), FNV-1a of all that (u64),
    /// then the tensors' elements in order. The key travels beside it (the receiver asked for
    /// it), and `decode` checks the shapes against that key's place in the model.
    pub fn encode(&self) -> Vec<u8> {
        let parts = self.parts();
        let layout = match self {
            ExpertWeights::SwiGlu { .. } => LAYOUT_SWIGLU,
            ExpertWeights::Clamped { .. } => LAYOUT_CLAMPED,
        };
        let mut out = Vec::with_capacity(Self::header_len(parts.len()) + self.bytes());
        out.extend_from_slice(&ENCODING_MAGIC);
        out.push(layout);
        out.push(parts.len() as u8);
        for p in &parts {
            let (dtype, rows, cols) = p.descriptor();
            out.push(dtype);
            out.extend_from_slice(&rows.to_le_bytes());
            out.extend_from_slice(&cols.to_le_bytes());
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        for p in &parts {
            p.write(&mut out);
        }
        out
    }

    fn header_len(tensors: usize) -> usize {
        ENCODING_MAGIC.len() + 1 + 1 + tensors * DESCRIPTOR_LEN + 8
    }

    /// Decodes [`ExpertWeights::encode`]'s bytes, checking everything against the model: the
    /// magic, the header checksum, that `key` is a routed expert, the layout, every shape
    /// against the config and the exact length. Garbage gives a [`LoadError::Decode`], never a panic, and nothing is
    /// allocated before the sizes are known to match the config.
    pub fn decode(bytes: &[u8], cfg: &ModelConfig, key: ExpertKey) -> Result<ExpertWeights, LoadError> {
        Self::decode_inner(bytes, cfg, key).map_err(|source| LoadError::Decode { key, source })
    }

    fn decode_inner(bytes: &[u8], cfg: &ModelConfig, key: ExpertKey) -> Result<ExpertWeights, DecodeError> {
        let (layer, e) = (key.layer as usize, key.expert as usize);
        if layer >= cfg.num_layers || cfg.layer_ffn[layer] != FfnKind::Moe || e >= cfg.moe.num_experts {
            return Err(DecodeError::NotARoutedExpert { key });
        }
        let (h, i) = (cfg.hidden_size, cfg.moe.expert_intermediate);
        // (rows, cols, is a bias) per tensor, in encoding order.
        let (layout, expected): (u8, Vec<(usize, usize, bool)>) = match cfg.moe.layout {
            ExpertLayout::SwiGlu => (LAYOUT_SWIGLU, vec![(i, h, false), (i, h, false), (h, i, false)]),
            ExpertLayout::GptOssFused => (
                LAYOUT_CLAMPED,
                vec![
                    (i, h, false),
                    (1, i, true),
                    (i, h, false),
                    (1, i, true),
                    (h, i, false),
                    (1, h, true),
                ],
            ),
        };
        let header = Self::header_len(expected.len());
        if bytes.len() < header {
            return Err(DecodeError::Truncated {
                len: bytes.len(),
                needed: header,
            });
        }
        let mut c = Cursor { bytes, pos: 0 };
        if c.take(ENCODING_MAGIC.len()) != ENCODING_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let found_layout = c.u8();
        if found_layout != layout {
            return Err(DecodeError::WrongLayout {
                expected: layout,
                found: found_layout,
            });
        }
        let count = c.u8() as usize;
        if count != expected.len() {
            // The header length depends on the count; a wrong count is a corrupt header.
            return Err(DecodeError::BadChecksum);
        }
        let mut descriptors = Vec::with_capacity(count);
        for _ in 0..count {
            descriptors.push((c.u8(), c.u32(), c.u32()));
        }
        let stored = u64::from_le_bytes(c.take(8).try_into().map_err(|_| DecodeError::BadChecksum)?);
        if stored != fnv1a(&bytes[..header - 8]) {
            return Err(DecodeError::BadChecksum);
        }
        let mut total = header;
        for (index, (&(dtype, rows, cols), &(er, ec, bias))) in descriptors.iter().zip(&expected).enumerate() {
            let width = match dtype {
                DTYPE_F32 => 4,
                DTYPE_BF16 if !bias => 2,
                tag => return Err(DecodeError::BadDtype { index, tag }),
            };
            if rows as usize != er || cols as usize != ec {
                return Err(DecodeError::WrongShape {
                    index,
                    rows,
                    cols,
                    expected_rows: er,
                    expected_cols: ec,
                });
            }
            total += er * ec * width;
        }
        if bytes.len() != total {
            return Err(DecodeError::WrongLength {
                len: bytes.len(),
                expected: total,
            });
        }
        let mut weights = Vec::with_capacity(count);
        let mut biases = Vec::with_capacity(count);
        for (&(dtype, ..), &(rows, cols, bias)) in descriptors.iter().zip(&expected) {
            let n = rows * cols;
            if dtype == DTYPE_BF16 {
                let data = c
                    .take(2 * n)
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                weights.push(Weight::Bf16 { rows, cols, data });
                continue;
            }
            let data: Vec<f32> = c
                .take(4 * n)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if bias {
                biases.push(Tensor::matrix(1, cols, data));
            } else {
                weights.push(Weight::F32(Tensor::matrix(rows, cols, data)));
            }
        }
        // Counts were checked against `expected` above, so these arrays are full.
        match (<[Weight; 3]>::try_from(weights), biases.len()) {
            (Ok([gate, up, down]), 0) => Ok(ExpertWeights::SwiGlu { gate, up, down }),
            (Ok([gate, up, down]), 3) => {
                let [gate_bias, up_bias, down_bias] =
                    <[Tensor; 3]>::try_from(biases).map_err(|_| DecodeError::BadChecksum)?;
                Ok(ExpertWeights::Clamped {
                    gate,
                    gate_bias,
                    up,
                    up_bias,
                    down,
                    down_bias,
                })
            }
            _ => Err(DecodeError::BadChecksum),
        }
    }
}

/// One unit of work for an expert instance: the activations of the tokens sent to it.
#[derive(Debug, Clone)]
pub struct ExpertTask {
    pub instance: InstanceId,
    /// `[tokens, hidden]`.
    pub input: Tensor,
    /// Per input row, which token of the layer's batch it is (rows of different tasks with
    /// the same id are the same activation, so a transport may carry them once); empty when
    /// unknown.
    pub tokens: Vec<u32>,
    /// Per input row, the weight its output carries in the token's combine (the router's
    /// weight for this expert); used by [`ExpertFunction::execute_into`], may be empty for
    /// [`ExpertFunction::execute`].
    pub weights: Vec<f32>,
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
    #[error("cannot combine: {0}")]
    BadCombine(String),
}

/// Executes expert functions. One call carries all of one layer's work.
pub trait ExpertFunction: Send + Sync {
    /// Runs every task (all of them belong to MoE layer `layer`) and returns one `[n, hidden]`
    /// output per task, in task order.
    fn execute(&self, layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError>;

    /// Runs every task and combines: each output row `j` of a task, times `weights[j]`, is
    /// added into row `tokens[j]` of `out`. The default runs [`ExpertFunction::execute`] and
    /// adds in task order, row by row; an implementation may instead sum a token's rows where
    /// they run (a worker answers one row per token, not one per expert it ran), which can
    /// change the order of the additions but not which terms are added.
    fn execute_into(&self, layer: usize, tasks: Vec<ExpertTask>, out: &mut Tensor) -> Result<(), ExpertError> {
        let meta: Vec<(Vec<u32>, Vec<f32>)> = tasks.iter().map(|t| (t.tokens.clone(), t.weights.clone())).collect();
        let outputs = self.execute(layer, tasks)?;
        for (y, (tokens, weights)) in outputs.iter().zip(&meta) {
            add_weighted_rows(out, y, tokens, weights)?;
        }
        Ok(())
    }
}

/// `out[tokens[j]] += weights[j] * y[j]` for every row `j` of `y`, in order; a typed error
/// (nothing added) when the lengths, widths or token rows do not fit.
pub fn add_weighted_rows(out: &mut Tensor, y: &Tensor, tokens: &[u32], weights: &[f32]) -> Result<(), ExpertError> {
    if tokens.len() != y.rows() || weights.len() != y.rows() || (y.rows() > 0 && y.cols() != out.cols()) {
        return Err(ExpertError::BadCombine(format!(
            "{} output rows of width {} with {} tokens and {} weights into rows of width {}",
            y.rows(),
            y.cols(),
            tokens.len(),
            weights.len(),
            out.cols()
        )));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= out.rows()) {
        return Err(ExpertError::BadCombine(format!(
            "token {t} past the layer's {} tokens",
            out.rows()
        )));
    }
    for (j, (&t, &w)) in tokens.iter().zip(weights).enumerate() {
        for (o, v) in out.row_mut(t as usize).iter_mut().zip(y.row(j)) {
            *o += w * v;
        }
    }
    Ok(())
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

/// How a layer's expert tasks should run: with few tokens per expert (decode), experts side by
/// side; with many (prefill), one expert at a time, each matrix product parallel inside.
pub fn run_side_by_side(tasks: usize, rows: usize) -> bool {
    tasks > 1 && rows <= 4 * tasks
}

impl ExpertFunction for LocalExperts {
    fn execute(&self, _layer: usize, tasks: Vec<ExpertTask>) -> Result<Vec<Tensor>, ExpertError> {
        let rows: usize = tasks.iter().map(|t| t.input.rows()).sum();
        if run_side_by_side(tasks.len(), rows) {
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

    /// Where an instance runs (a worker id). When every instance of a layer has one, the
    /// engine matches a replicated expert's tokens to the instance on a site the token's other
    /// experts already send it to (each instance still gets its share of tokens), so fewer
    /// copies travel; `None` (the default): tokens split in order.
    fn site(&self, _instance: InstanceId) -> Option<u64> {
        None
    }
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
        // A standby instance (share 0, warmed up ahead of need) never gets a token.
        for n in 0..50 {
            let c = split_counts(n, &[0.0, 0.3, 0.0, 0.7]);
            assert_eq!((c[0], c[2], c[1] + c[3]), (0, 0, n), "{n} tokens");
        }
        for n in 0..50 {
            let c = split_counts(n, &[0.1, 0.3, 0.6]);
            assert_eq!(c.iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn blocked_transposes_match_the_definition() {
        for (rows, cols) in [(1, 1), (3, 70), (33, 2), (65, 64)] {
            let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let t = transpose(&data, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], data[r * cols + c]);
                }
            }
            if cols % 2 == 0 {
                let (even, odd) = split_transpose(&data, rows, cols / 2);
                for r in 0..rows {
                    for c in 0..cols / 2 {
                        assert_eq!(even[c * rows + r], data[r * cols + 2 * c]);
                        assert_eq!(odd[c * rows + r], data[r * cols + 2 * c + 1]);
                    }
                }
            }
        }
    }

    #[test]
    fn uneven_split_shares_sum_to_one_and_differ() {
        let s = UnevenSplit { k: 3 }.shares(ExpertKey::new(1, 2));
        let total: f32 = s.iter().map(|x| x.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(s[0].1 != s[1].1);
    }

    #[test]
    fn weighted_rows_add_into_their_tokens_and_misfits_are_errors() {
        let mut out = Tensor::zeros(vec![3, 2]);
        let y = Tensor::matrix(2, 2, vec![1.0, 2.0, 3.0, 4.0]);
        add_weighted_rows(&mut out, &y, &[2, 0], &[0.5, 2.0]).unwrap();
        add_weighted_rows(&mut out, &y, &[2, 2], &[1.0, 1.0]).unwrap();
        assert_eq!(out.data(), &[6.0, 8.0, 0.0, 0.0, 4.5, 7.0]);
        let before = out.clone();
        for (tokens, weights) in [(&[0u32, 3][..], &[1.0, 1.0][..]), (&[0], &[1.0]), (&[0, 1], &[1.0])] {
            assert!(matches!(
                add_weighted_rows(&mut out, &y, tokens, weights),
                Err(ExpertError::BadCombine(_))
            ));
        }
        let wide = Tensor::matrix(1, 3, vec![1.0; 3]);
        assert!(add_weighted_rows(&mut out, &wide, &[0], &[1.0]).is_err());
        assert_eq!(out.data(), before.data(), "nothing is added on error");
    }
}
