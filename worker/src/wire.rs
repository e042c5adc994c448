//! Binary frames exchanged between engines and workers over the transport.
//!
//! Every frame starts with a 16-byte header: magic `MOEX`, version, kind, two reserved bytes and
//! a request id (little endian). Activations travel as raw little-endian f32 or bf16 bytes after a
//! small per-task table: no per-element encoding. One [`Frame::ExpertRequest`] carries all of one
//! worker's tokens for one MoE layer; with top-k > 1 a token whose experts share a worker may
//! travel once for all of them ([`encode_request_shared`]: a table of distinct rows and, per
//! task, indices into it), as an all-to-all sends a token once per destination. A *combining*
//! request ([`encode_request_combined`]) also carries each row's combine weight, and the
//! worker answers one weighted sum per token rather than one row per (token, expert): the
//! combine half of the all-to-all shrinks the same way.
//!
//! Decoding validates everything (magic, version, kind, table sizes, that the payload length is
//! exactly what the table announces) and answers a typed [`FrameError`]; it never panics and never
//! allocates more than the frame's own length.

use bytes::{BufMut, Bytes, BytesMut};
use data_plane::tensor::Tensor;
use data_plane::weight::bf16_to_f32;
use shared::ExpertKey;

pub const MAGIC: [u8; 4] = *b"MOEX";
pub const VERSION: u8 = 1;
const HEADER: usize = 16;
/// Largest hidden size a frame may announce.
pub const MAX_HIDDEN: u32 = 1 << 20;
/// Most tasks one request may carry.
pub const MAX_TASKS: u32 = 1 << 16;

/// Element type of activations on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn code(self) -> u8 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
        }
    }
    fn from_code(c: u8) -> Result<Self, FrameError> {
        match c {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::Bf16),
            other => Err(FrameError::Invalid(format!("unknown dtype code {other}"))),
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// Why a worker could not do the work; the engine decides from the code whether to retry elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request was malformed; retrying it anywhere fails the same way.
    BadFrame = 1,
    /// The worker has no model loaded, or another one.
    WrongModel = 2,
    /// Not enough memory for the instance.
    OutOfMemory = 3,
    /// Loading the weights failed.
    LoadFailed = 4,
    /// The instance asked for is not warm here (peer weight fetch).
    NotWarm = 5,
    /// The worker is shutting down.
    Draining = 6,
    Internal = 7,
}

impl ErrorCode {
    fn from_code(c: u16) -> Self {
        match c {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::WrongModel,
            3 => ErrorCode::OutOfMemory,
            4 => ErrorCode::LoadFailed,
            5 => ErrorCode::NotWarm,
            6 => ErrorCode::Draining,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether another worker may succeed where this one failed.
    pub fn retry_elsewhere(self) -> bool {
        !matches!(self, ErrorCode::BadFrame)
    }
}

/// One expert's share of a layer's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskData {
    pub key: ExpertKey,
    pub replica: u32,
    /// `[rows, hidden]`.
    pub input: Tensor,
    /// In a combining request, per input row: the row of the summed answer its output adds
    /// into and its weight; empty otherwise.
    pub combine: Vec<(u32, f32)>,
}

/// A task as the engine encodes it, borrowing its rows.
#[derive(Debug, Clone, Copy)]
pub struct TaskRef<'a> {
    pub key: ExpertKey,
    pub replica: u32,
    /// `[rows, hidden]`.
    pub input: &'a Tensor,
    /// Per row, its token in the layer's batch (equal ids are the same activation); may be
    /// empty for [`encode_request`].
    pub tokens: &'a [u32],
    /// Per row, its combine weight; only [`encode_request_combined`] reads them.
    pub weights: &'a [f32],
}

impl TaskData {
    /// This task for the encoders, with per-row token ids and combine weights.
    pub fn task_ref<'a>(&'a self, tokens: &'a [u32], weights: &'a [f32]) -> TaskRef<'a> {
        TaskRef {
            key: self.key,
            replica: self.replica,
            input: &self.input,
            tokens,
            weights,
        }
    }
}

impl<'a> TaskRef<'a> {
    /// A task without token ids or weights (for [`encode_request`]).
    pub fn plain(key: ExpertKey, replica: u32, input: &'a Tensor) -> Self {
        Self {
            key,
            replica,
            input,
            tokens: &[],
            weights: &[],
        }
    }
}

/// A request whose rows travel once per distinct token.
#[derive(Debug)]
pub struct Encoded {
    pub bytes: Bytes,
    /// Rows not repeated because an earlier task of the message carried them.
    pub rows_saved: usize,
    /// The distinct tokens, in the order the frame carries them (and a combining request's
    /// answer returns their sums).
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Run these experts of `layer` on their tokens.
    ExpertRequest {
        id: u64,
        layer: u32,
        dtype: Dtype,
        tasks: Vec<TaskData>,
        /// `0`: answer one output per task. Otherwise a combining request: answer one
        /// `[sums, hidden]` tensor whose row `s` is the sum of `weight x output row` over the
        /// rows whose [`TaskData::combine`] names `s` (a token's experts summed here, so it
        /// travels back once).
        sums: usize,
    },
    /// One `[rows, hidden]` output per task, in request order (for a combining request, one
    /// output: the sums).
    ExpertResponse {
        id: u64,
        outputs: Vec<Tensor>,
    },
    Error {
        id: u64,
        code: ErrorCode,
        message: String,
    },
    /// Send me the weights of this instance (it is warm on you).
    FetchExpert {
        id: u64,
        key: ExpertKey,
    },
    /// `ExpertWeights::encode()` bytes.
    Weights {
        id: u64,
        bytes: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic {0:?}")]
    Magic([u8; 4]),
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("invalid frame: {0}")]
    Invalid(String),
}

const K_REQ: u8 = 1;
const K_RESP: u8 = 2;
const K_ERR: u8 = 3;
const K_FETCH: u8 = 4;
const K_WEIGHTS: u8 = 5;
const K_REQ_SHARED: u8 = 6;
const K_REQ_COMBINED: u8 = 7;

fn header(buf: &mut BytesMut, kind: u8, id: u64) {
    buf.put_slice(&MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
    buf.put_u16_le(0);
    buf.put_u64_le(id);
}

/// The frame header and what both request layouts start with (see [`request_head`]).
fn request_header(buf: &mut BytesMut, kind: u8, id: u64, (layer, hidden, dtype): (u32, usize, Dtype), tasks: usize) {
    header(buf, kind, id);
    buf.put_u32_le(layer);
    buf.put_u32_le(hidden as u32);
    buf.put_u8(dtype.code());
    buf.put_bytes(0, 3);
    buf.put_u32_le(tasks as u32);
}

fn put_rows(buf: &mut BytesMut, t: &Tensor, dtype: Dtype) {
    put_slice(buf, t.data(), dtype);
}

/// Encodes an [`Frame::ExpertRequest`] carrying every task's rows as they are; every tensor
/// must have the same number of columns.
pub fn encode_request(id: u64, layer: u32, dtype: Dtype, tasks: &[TaskRef]) -> Bytes {
    let hidden = tasks.first().map_or(0, |t| t.input.cols());
    let rows: usize = tasks.iter().map(|t| t.input.rows()).sum();
    let mut b = BytesMut::with_capacity(HEADER + 16 + 12 * tasks.len() + rows * hidden * dtype.size());
    request_header(&mut b, K_REQ, id, (layer, hidden, dtype), tasks.len());
    put_task_table(&mut b, tasks);
    for t in tasks {
        put_rows(&mut b, t.input, dtype);
    }
    b.freeze()
}

fn put_task_table(b: &mut BytesMut, tasks: &[TaskRef]) {
    for t in tasks {
        b.put_u32_le(t.key.expert);
        b.put_u32_le(t.replica);
        b.put_u32_le(t.input.rows() as u32);
    }
}

/// Encodes an [`Frame::ExpertRequest`] in which rows that several tasks carry travel once:
/// equal [`TaskRef::tokens`] name the same activation (a token of the layer's batch picked by
/// several experts held on this worker). The frame holds each distinct row once and, per
/// task, the index of each of its rows; it decodes to the same request as [`encode_request`]
/// of the same tasks. `None` when no row is shared (the plain frame is then as small) or a
/// task's ids do not match its rows.
pub fn encode_request_shared(id: u64, layer: u32, dtype: Dtype, tasks: &[TaskRef]) -> Option<Encoded> {
    encode_distinct(id, layer, dtype, tasks, false).filter(|e| e.rows_saved > 0)
}

/// Encodes a combining [`Frame::ExpertRequest`]: rows travel once per distinct token as in
/// [`encode_request_shared`], each row's [`TaskRef::weights`] entry travels with its index, and
/// the worker answers one weighted sum per distinct token ([`Encoded::tokens`] order) instead
/// of one row per task row. `None` when a task's ids or weights do not match its rows.
pub fn encode_request_combined(id: u64, layer: u32, dtype: Dtype, tasks: &[TaskRef]) -> Option<Encoded> {
    encode_distinct(id, layer, dtype, tasks, true)
}

fn encode_distinct(id: u64, layer: u32, dtype: Dtype, tasks: &[TaskRef], combine: bool) -> Option<Encoded> {
    let hidden = tasks.first().map_or(0, |t| t.input.cols());
    let fits = |t: &TaskRef| {
        t.tokens.len() == t.input.rows() && t.input.cols() == hidden && (!combine || t.weights.len() == t.input.rows())
    };
    if !tasks.iter().all(fits) {
        return None;
    }
    let rows: usize = tasks.iter().map(|t| t.input.rows()).sum();
    // Distinct ids in order of first appearance, with the (task, row) that carries each.
    let mut slot: std::collections::HashMap<u32, u32> = std::collections::HashMap::with_capacity(rows);
    let mut first: Vec<(usize, usize)> = Vec::new();
    let mut index: Vec<u32> = Vec::with_capacity(rows);
    for (ti, t) in tasks.iter().enumerate() {
        for (r, &tok) in t.tokens.iter().enumerate() {
            let next = first.len() as u32;
            let i = *slot.entry(tok).or_insert_with(|| {
                first.push((ti, r));
                next
            });
            index.push(i);
        }
    }
    let weights = if combine { 4 * rows } else { 0 };
    let mut b = BytesMut::with_capacity(
        HEADER + 20 + 12 * tasks.len() + 4 * rows + weights + first.len() * hidden * dtype.size(),
    );
    let kind = if combine { K_REQ_COMBINED } else { K_REQ_SHARED };
    request_header(&mut b, kind, id, (layer, hidden, dtype), tasks.len());
    b.put_u32_le(first.len() as u32);
    put_task_table(&mut b, tasks);
    for i in index {
        b.put_u32_le(i);
    }
    if combine {
        tasks.iter().flat_map(|t| t.weights).for_each(|w| b.put_f32_le(*w));
    }
    for &(ti, r) in &first {
        put_slice(&mut b, tasks[ti].input.row(r), dtype);
    }
    Some(Encoded {
        bytes: b.freeze(),
        rows_saved: rows - first.len(),
        tokens: first.iter().map(|&(ti, r)| tasks[ti].tokens[r]).collect(),
    })
}

fn put_slice(buf: &mut BytesMut, values: &[f32], dtype: Dtype) {
    match dtype {
        Dtype::F32 => values.iter().for_each(|v| buf.put_f32_le(*v)),
        Dtype::Bf16 => values
            .iter()
            .for_each(|v| buf.put_u16_le(half::bf16::from_f32(*v).to_bits())),
    }
}

impl Frame {
    pub fn id(&self) -> u64 {
        match self {
            Frame::ExpertRequest { id, .. }
            | Frame::ExpertResponse { id, .. }
            | Frame::Error { id, .. }
            | Frame::FetchExpert { id, .. }
            | Frame::Weights { id, .. } => *id,
        }
    }

    /// Encodes the frame. Tensors of a request must all have the same number of columns.
    pub fn encode(&self) -> Bytes {
        match self {
            Frame::ExpertRequest {
                id,
                layer,
                dtype,
                tasks,
                sums,
            } => {
                // A combining request's rows name their sums, so equal slots are equal rows.
                let slots: Vec<(Vec<u32>, Vec<f32>)> =
                    tasks.iter().map(|t| t.combine.iter().copied().unzip()).collect();
                let refs: Vec<TaskRef> = tasks
                    .iter()
                    .zip(&slots)
                    .map(|(t, (ts, ws))| t.task_ref(ts, ws))
                    .collect();
                match *sums {
                    0 => encode_request(*id, *layer, *dtype, &refs),
                    _ => encode_request_combined(*id, *layer, *dtype, &refs)
                        .map(|e| e.bytes)
                        .unwrap_or_else(|| encode_request(*id, *layer, *dtype, &refs)),
                }
            }
            Frame::ExpertResponse { id, outputs } => {
                let hidden = outputs.first().map_or(0, |t| t.cols());
                let rows: usize = outputs.iter().map(|t| t.rows()).sum();
                let mut b = BytesMut::with_capacity(HEADER + 12 + 4 * outputs.len() + rows * hidden * 4);
                header(&mut b, K_RESP, *id);
                b.put_u32_le(hidden as u32);
                b.put_u32_le(outputs.len() as u32);
                for t in outputs {
                    b.put_u32_le(t.rows() as u32);
                }
                for t in outputs {
                    put_rows(&mut b, t, Dtype::F32);
                }
                b.freeze()
            }
            Frame::Error { id, code, message } => {
                let mut b = BytesMut::with_capacity(HEADER + 8 + message.len());
                header(&mut b, K_ERR, *id);
                b.put_u16_le(*code as u16);
                b.put_u16_le(0);
                b.put_u32_le(message.len() as u32);
                b.put_slice(message.as_bytes());
                b.freeze()
            }
            Frame::FetchExpert { id, key } => {
                let mut b = BytesMut::with_capacity(HEADER + 8);
                header(&mut b, K_FETCH, *id);
                b.put_u32_le(key.layer);
                b.put_u32_le(key.expert);
                b.freeze()
            }
            Frame::Weights { id, bytes } => {
                let mut b = BytesMut::with_capacity(HEADER + bytes.len());
                header(&mut b, K_WEIGHTS, *id);
                b.put_slice(bytes);
                b.freeze()
            }
        }
    }

    /// Decodes and validates one frame.
    pub fn decode(buf: &Bytes) -> Result<Frame, FrameError> {
        Frame::decode_chunks(std::slice::from_ref(buf))
    }

    /// Decodes and validates one frame that arrived in pieces (`transport::Message::chunks`),
    /// reading across the pieces instead of joining them first: the rows are copied once,
    /// straight into their tensors.
    pub fn decode_chunks(chunks: &[Bytes]) -> Result<Frame, FrameError> {
        let mut r = Reader::new(chunks);
        if r.remaining() < HEADER {
            return Err(FrameError::Short(r.remaining()));
        }
        let magic: [u8; 4] = r.array()?;
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = r.u8()?;
        let _reserved = r.u16()?;
        let id = r.u64()?;
        match kind {
            K_REQ => {
                let head = request_head(&mut r, false)?;
                let tensors = r.tensors(head.table.iter().map(|t| t.2), head.hidden, head.dtype)?;
                let inputs = tensors.into_iter().map(|t| (t, Vec::new())).collect();
                Ok(head.into_request(id, inputs, 0))
            }
            K_REQ_SHARED | K_REQ_COMBINED => {
                let combine = kind == K_REQ_COMBINED;
                let head = request_head(&mut r, true)?;
                let total = head
                    .table
                    .iter()
                    .try_fold(0usize, |a, t| a.checked_add(t.2))
                    .ok_or_else(|| FrameError::Invalid("row counts overflow".into()))?;
                let per_row = if combine { 8 } else { 4 };
                if total > r.remaining() / per_row {
                    return Err(FrameError::Invalid(format!(
                        "{total} row indices announced, {} bytes left",
                        r.remaining()
                    )));
                }
                let distinct = head.distinct;
                let mut index = Vec::with_capacity(total);
                for _ in 0..total {
                    let i = r.u32()?;
                    if i as usize >= distinct {
                        return Err(FrameError::Invalid(format!(
                            "row index {i} past the {distinct} rows carried"
                        )));
                    }
                    index.push(i);
                }
                let mut weights = Vec::with_capacity(if combine { total } else { 0 });
                if combine {
                    for _ in 0..total {
                        weights.push(f32::from_bits(r.u32()?));
                    }
                }
                let rows = r
                    .tensors(std::iter::once(distinct), head.hidden, head.dtype)?
                    .pop()
                    .ok_or_else(|| FrameError::Invalid("no row table".into()))?;
                let mut at = 0;
                let inputs: Vec<(Tensor, Vec<(u32, f32)>)> = head
                    .table
                    .iter()
                    .map(|t| {
                        let idx = &index[at..at + t.2];
                        let combine = match combine {
                            true => idx.iter().copied().zip(weights[at..at + t.2].iter().copied()).collect(),
                            false => Vec::new(),
                        };
                        at += t.2;
                        let rows_of: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
                        (rows.gather_rows(&rows_of), combine)
                    })
                    .collect();
                let sums = if combine { distinct } else { 0 };
                Ok(head.into_request(id, inputs, sums))
            }
            K_RESP => {
                let hidden = r.u32()?;
                let n = r.u32()?;
                if n > MAX_TASKS || hidden > MAX_HIDDEN {
                    return Err(FrameError::Invalid(format!(
                        "{n} outputs of hidden size {hidden} out of range"
                    )));
                }
                let mut rows = Vec::with_capacity((n as usize).min(r.remaining() / 4));
                for _ in 0..n {
                    rows.push(r.u32()? as usize);
                }
                let outputs = r.tensors(rows.into_iter(), hidden as usize, Dtype::F32)?;
                Ok(Frame::ExpertResponse { id, outputs })
            }
            K_ERR => {
                let code = ErrorCode::from_code(r.u16()?);
                let _ = r.u16()?;
                let len = r.u32()? as usize;
                let bytes = r.vec(len)?;
                r.end()?;
                let message = String::from_utf8_lossy(&bytes).into_owned();
                Ok(Frame::Error { id, code, message })
            }
            K_FETCH => {
                let layer = r.u32()?;
                let expert = r.u32()?;
                r.end()?;
                Ok(Frame::FetchExpert {
                    id,
                    key: ExpertKey::new(layer as usize, expert as usize),
                })
            }
            K_WEIGHTS => Ok(Frame::Weights { id, bytes: r.rest() }),
            other => Err(FrameError::Kind(other)),
        }
    }
}

/// What both request layouts start with: layer, hidden size, dtype, the task count (then, in
/// a shared-rows request, the count of distinct rows) and the task table.
struct RequestHead {
    layer: u32,
    hidden: usize,
    dtype: Dtype,
    distinct: usize,
    /// `(expert, replica, rows)` per task.
    table: Vec<(ExpertKey, u32, usize)>,
}

impl RequestHead {
    /// The request with one input (and combine table) per task of the table.
    fn into_request(self, id: u64, inputs: Vec<(Tensor, Vec<(u32, f32)>)>, sums: usize) -> Frame {
        let tasks = self
            .table
            .into_iter()
            .zip(inputs)
            .map(|((key, replica, _), (input, combine))| TaskData {
                key,
                replica,
                input,
                combine,
            })
            .collect();
        Frame::ExpertRequest {
            id,
            layer: self.layer,
            dtype: self.dtype,
            tasks,
            sums,
        }
    }
}

fn request_head(r: &mut Reader, shared: bool) -> Result<RequestHead, FrameError> {
    let layer = r.u32()?;
    let hidden = r.u32()?;
    let dtype = Dtype::from_code(r.u8()?)?;
    r.skip(3)?;
    let n = r.u32()?;
    let distinct = if shared { r.u32()? as usize } else { 0 };
    if n > MAX_TASKS {
        return Err(FrameError::Invalid(format!(
            "{n} tasks exceed the limit of {MAX_TASKS}"
        )));
    }
    if hidden == 0 || hidden > MAX_HIDDEN {
        return Err(FrameError::Invalid(format!("hidden size {hidden} out of range")));
    }
    let mut table = Vec::with_capacity((n as usize).min(r.remaining() / 12));
    for _ in 0..n {
        let expert = r.u32()?;
        let replica = r.u32()?;
        let rows = r.u32()?;
        table.push((ExpertKey::new(layer as usize, expert as usize), replica, rows as usize));
    }
    Ok(RequestHead {
        layer,
        hidden: hidden as usize,
        dtype,
        distinct,
        table,
    })
}

/// Reads a frame from the pieces it arrived in, as if they were one buffer.
struct Reader<'a> {
    chunks: &'a [Bytes],
    /// The piece being read and the offset in it.
    at: usize,
    off: usize,
    /// Bytes read so far, and the frame's length.
    pos: usize,
    len: usize,
}

impl<'a> Reader<'a> {
    fn new(chunks: &'a [Bytes]) -> Self {
        Reader {
            chunks,
            at: 0,
            off: 0,
            pos: 0,
            len: chunks.iter().map(Bytes::len).sum(),
        }
    }
    fn remaining(&self) -> usize {
        self.len - self.pos
    }
    fn check(&self, n: usize) -> Result<(), FrameError> {
        if n > self.remaining() {
            return Err(FrameError::Invalid(format!(
                "needs {n} more bytes at offset {}, frame has {}",
                self.pos,
                self.remaining()
            )));
        }
        Ok(())
    }
    /// Hands the next `n` bytes to `f` in pieces, as they lie in the chunks.
    fn pieces(&mut self, n: usize, mut f: impl FnMut(&'a [u8])) -> Result<(), FrameError> {
        self.check(n)?;
        let mut left = n;
        while left > 0 {
            let chunk = &self.chunks[self.at];
            let here = (chunk.len() - self.off).min(left);
            if here > 0 {
                f(&chunk[self.off..self.off + here]);
            }
            self.off += here;
            left -= here;
            if self.off == chunk.len() {
                self.at += 1;
                self.off = 0;
            }
        }
        self.pos += n;
        Ok(())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        let mut at = 0;
        self.pieces(N, |p| {
            a[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        })?;
        Ok(a)
    }
    fn vec(&mut self, n: usize) -> Result<Vec<u8>, FrameError> {
        // Checked before allocating: `n` comes from the frame.
        self.check(n)?;
        let mut v = Vec::with_capacity(n);
        self.pieces(n, |p| v.extend_from_slice(p))?;
        Ok(v)
    }
    /// The rest of the frame: a slice of its chunk when it lies in one, else a joined copy.
    fn rest(&mut self) -> Bytes {
        let n = self.remaining();
        let within_one = self
            .chunks
            .get(self.at)
            .filter(|chunk| chunk.len() - self.off >= n)
            .map(|chunk| chunk.slice(self.off..self.off + n));
        let mut joined = Vec::new();
        // Reading exactly what remains cannot fail.
        let _ = self.pieces(n, |p| {
            if within_one.is_none() {
                joined.extend_from_slice(p)
            }
        });
        within_one.unwrap_or_else(|| joined.into())
    }
    fn skip(&mut self, n: usize) -> Result<(), FrameError> {
        self.pieces(n, |_| ())
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.remaining() != 0 {
            return Err(FrameError::Invalid(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }

    /// Reads one tensor per row count; the payload must be exactly their total size.
    fn tensors(
        &mut self,
        rows: impl Iterator<Item = usize> + Clone,
        hidden: usize,
        dtype: Dtype,
    ) -> Result<Vec<Tensor>, FrameError> {
        let total_rows = rows
            .clone()
            .try_fold(0usize, |a, r| a.checked_add(r))
            .ok_or_else(|| FrameError::Invalid("row counts overflow".into()))?;
        let expected = total_rows
            .checked_mul(hidden)
            .and_then(|x| x.checked_mul(dtype.size()))
            .ok_or_else(|| FrameError::Invalid("payload size overflows".into()))?;
        if expected != self.remaining() {
            return Err(FrameError::Invalid(format!(
                "payload is {} bytes, the task table announces {expected}",
                self.remaining()
            )));
        }
        let size = dtype.size();
        let value = |b: &[u8]| match dtype {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::Bf16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        };
        let mut out = Vec::new();
        for r in rows {
            let mut data: Vec<f32> = Vec::with_capacity(r * hidden);
            // A value split between two pieces is put together in `carry`.
            let mut carry = [0u8; 4];
            let mut held = 0;
            self.pieces(r * hidden * size, |mut p| {
                if held > 0 {
                    let k = (size - held).min(p.len());
                    carry[held..held + k].copy_from_slice(&p[..k]);
                    held += k;
                    p = &p[k..];
                    if held < size {
                        return;
                    }
                    data.push(value(&carry));
                    held = 0;
                }
                let whole = p.len() / size * size;
                data.extend(p[..whole].chunks_exact(size).map(value));
                held = p.len() - whole;
                carry[..held].copy_from_slice(&p[whole..]);
            })?;
            out.push(Tensor::matrix(r, hidden, data));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Frame {
        Frame::ExpertRequest {
            id: 7,
            layer: 3,
            dtype: Dtype::F32,
            tasks: vec![
                TaskData {
                    key: ExpertKey::new(3, 1),
                    replica: 0,
                    input: Tensor::matrix(2, 4, (0..8).map(|x| x as f32 * 0.5).collect()),
                    combine: Vec::new(),
                },
                TaskData {
                    key: ExpertKey::new(3, 5),
                    replica: 2,
                    input: Tensor::matrix(1, 4, vec![1.0, -2.0, 3.5, 1e-8]),
                    combine: Vec::new(),
                },
            ],
            sums: 0,
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            request(),
            Frame::ExpertResponse {
                id: 9,
                outputs: vec![Tensor::matrix(1, 2, vec![1.0, 2.0]), Tensor::matrix(0, 2, vec![])],
            },
            Frame::Error {
                id: 1,
                code: ErrorCode::OutOfMemory,
                message: "no room".into(),
            },
            Frame::FetchExpert {
                id: 2,
                key: ExpertKey::new(1, 2),
            },
            Frame::Weights {
                id: 3,
                bytes: Bytes::from_static(b"abc"),
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
    }

    /// `bytes` cut into pieces of `piece` bytes (the last shorter).
    fn split(bytes: &Bytes, piece: usize) -> Vec<Bytes> {
        (0..bytes.len())
            .step_by(piece)
            .map(|i| bytes.slice(i..(i + piece).min(bytes.len())))
            .collect()
    }

    #[test]
    fn frames_decode_alike_however_they_arrived_in_pieces() {
        let bf16 = match request() {
            Frame::ExpertRequest {
                id, layer, tasks, sums, ..
            } => Frame::ExpertRequest {
                id,
                layer,
                dtype: Dtype::Bf16,
                tasks,
                sums,
            },
            _ => unreachable!(),
        };
        let frames = [
            request().encode(),
            bf16.encode(),
            shared_as(false).0,
            shared_as(true).0,
            Frame::ExpertResponse {
                id: 9,
                outputs: vec![Tensor::matrix(3, 5, (0..15).map(|x| x as f32 - 7.25).collect())],
            }
            .encode(),
            Frame::Error {
                id: 1,
                code: ErrorCode::OutOfMemory,
                message: "no room".into(),
            }
            .encode(),
            Frame::Weights {
                id: 3,
                bytes: Bytes::from_static(b"weights of an expert"),
            }
            .encode(),
        ];
        for bytes in &frames {
            let whole = Frame::decode(bytes).unwrap();
            // Pieces of odd sizes split values (f32 and bf16) and header fields between them.
            for piece in [1, 2, 3, 5, 7, 13, 64, 1000] {
                let pieces = split(bytes, piece);
                assert_eq!(Frame::decode_chunks(&pieces).unwrap(), whole, "pieces of {piece} bytes");
                // Cut short or extended, the pieced frame decodes (or is refused) as the whole
                // one does (only a weights frame, whose payload is the rest, takes any length).
                for len in [bytes.len() - 1, bytes.len() / 2, HEADER - 1] {
                    let cut = bytes.slice(..len);
                    assert_eq!(Frame::decode_chunks(&split(&cut, piece)), Frame::decode(&cut));
                }
                let mut longer = BytesMut::from(&bytes[..]);
                longer.put_u8(0);
                let longer = longer.freeze();
                assert_eq!(Frame::decode_chunks(&split(&longer, piece)), Frame::decode(&longer));
            }
        }
        // Empty pieces anywhere change nothing.
        let bytes = &frames[0];
        let mut pieces = vec![Bytes::new()];
        for p in split(bytes, 9) {
            pieces.push(p);
            pieces.push(Bytes::new());
        }
        assert_eq!(Frame::decode_chunks(&pieces).unwrap(), Frame::decode(bytes).unwrap());
        assert!(matches!(Frame::decode_chunks(&[]), Err(FrameError::Short(0))));
    }

    #[test]
    fn bf16_frames_round_to_bf16() {
        let Frame::ExpertRequest { id, layer, tasks, .. } = request() else {
            unreachable!()
        };
        let f = Frame::ExpertRequest {
            id,
            layer,
            dtype: Dtype::Bf16,
            tasks,
            sums: 0,
        };
        let Ok(Frame::ExpertRequest { tasks, .. }) = Frame::decode(&f.encode()) else {
            panic!("decode failed")
        };
        assert_eq!(tasks[0].input.data()[3], 1.5);
        assert!((tasks[1].input.data()[2] - 3.5).abs() < 1e-6);
    }

    /// Every prefix of a valid frame, and the frame with one byte more, fail to decode.
    fn truncations_and_extensions_fail(bytes: &Bytes) {
        for len in 0..bytes.len() {
            assert!(
                Frame::decode(&bytes.slice(..len)).is_err(),
                "truncated to {len} accepted"
            );
        }
        let mut longer = BytesMut::from(&bytes[..]);
        longer.put_u8(0);
        assert!(Frame::decode(&longer.freeze()).is_err());
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        truncations_and_extensions_fail(&request().encode());
    }

    /// [`request`] with expert 5's token made expert 1's second one (tokens (10, 11) and
    /// (11)): token 11 travels once. Combining: weights (0.5, 0.25) and (2.0).
    fn shared_as(combine: bool) -> (Bytes, Frame) {
        let Frame::ExpertRequest {
            id,
            layer,
            dtype,
            mut tasks,
            ..
        } = request()
        else {
            unreachable!()
        };
        tasks[1].input = Tensor::matrix(1, 4, tasks[0].input.row(1).to_vec());
        let ids: [&[u32]; 2] = [&[10, 11], &[11]];
        let weights: [&[f32]; 2] = [&[0.5, 0.25], &[2.0]];
        let refs: Vec<TaskRef> = tasks
            .iter()
            .zip(ids)
            .zip(weights)
            .map(|((t, ts), ws)| t.task_ref(ts, ws))
            .collect();
        let e = match combine {
            true => encode_request_combined(id, layer, dtype, &refs),
            false => encode_request_shared(id, layer, dtype, &refs),
        }
        .expect("a row is shared");
        assert_eq!((e.rows_saved, e.tokens.as_slice()), (1, &[10, 11][..]));
        let sums = if combine {
            tasks[0].combine = vec![(0, 0.5), (1, 0.25)];
            tasks[1].combine = vec![(1, 2.0)];
            2
        } else {
            0
        };
        (
            e.bytes,
            Frame::ExpertRequest {
                id,
                layer,
                dtype,
                tasks,
                sums,
            },
        )
    }

    fn shared() -> (Bytes, Frame) {
        shared_as(false)
    }

    #[test]
    fn shared_rows_travel_once_and_decode_to_the_same_request() {
        let (bytes, plain) = shared();
        assert_eq!(Frame::decode(&bytes), Ok(plain.clone()));
        // One row of 16 bytes fewer, three 4-byte indices and a row count more.
        assert_eq!(plain.encode().len() - bytes.len(), 16 - 12 - 4);
        // Nothing shared, or ids that do not match the rows: no shared frame.
        let a = Tensor::matrix(1, 4, vec![1.0; 4]);
        let one = |ids: &'static [u32]| TaskRef {
            tokens: ids,
            ..TaskRef::plain(ExpertKey::new(0, 0), 0, &a)
        };
        assert!(encode_request_shared(1, 0, Dtype::F32, &[one(&[1])]).is_none());
        assert!(encode_request_shared(1, 0, Dtype::F32, &[one(&[])]).is_none());
        // bf16 rows round once, as in the plain frame.
        let x = Tensor::matrix(1, 4, vec![1.0, 1.0 + 1e-3, -3.0, 0.1]);
        let t = [
            TaskRef {
                tokens: &[4],
                ..TaskRef::plain(ExpertKey::new(0, 0), 0, &x)
            },
            TaskRef {
                tokens: &[4],
                ..TaskRef::plain(ExpertKey::new(0, 1), 0, &x)
            },
        ];
        assert_eq!(
            Frame::decode(&encode_request_shared(2, 0, Dtype::Bf16, &t).unwrap().bytes),
            Frame::decode(&encode_request(2, 0, Dtype::Bf16, &t))
        );
    }

    #[test]
    fn combining_requests_carry_weights_and_round_trip() {
        let (bytes, frame) = shared_as(true);
        assert_eq!(Frame::decode(&bytes), Ok(frame.clone()));
        assert_eq!(frame.encode(), bytes);
        // The shared layout plus one f32 weight per row, and a different kind.
        let (shared, _) = shared();
        assert_eq!(bytes.len() - shared.len(), 3 * 4);
        assert_eq!((bytes[5], shared[5]), (K_REQ_COMBINED, K_REQ_SHARED));
        // Unlike the shared layout, combining needs nothing shared; weights must match rows.
        let a = Tensor::matrix(1, 4, vec![1.0; 4]);
        let t = |weights: &'static [f32]| TaskRef {
            tokens: &[3],
            weights,
            ..TaskRef::plain(ExpertKey::new(0, 0), 0, &a)
        };
        let e = encode_request_combined(1, 0, Dtype::F32, &[t(&[0.5])]).unwrap();
        assert_eq!((e.rows_saved, e.tokens), (0, vec![3]));
        assert!(matches!(
            Frame::decode(&e.bytes),
            Ok(Frame::ExpertRequest { sums: 1, .. })
        ));
        assert!(encode_request_combined(1, 0, Dtype::F32, &[t(&[])]).is_none());
        assert!(encode_request_combined(1, 0, Dtype::F32, &[t(&[0.5, 0.5])]).is_none());
    }

    #[test]
    fn forged_combining_frames_are_rejected() {
        let (bytes, _) = shared_as(true);
        truncations_and_extensions_fail(&bytes);
        let forge = |at: usize, v: &[u8]| {
            let mut b = BytesMut::from(&bytes[..]);
            b[at..at + v.len()].copy_from_slice(v);
            Frame::decode(&b.freeze())
        };
        // Layout as the shared frame, then weights 72..84 and rows 84..
        assert!(matches!(forge(60, &2u32.to_le_bytes()), Err(FrameError::Invalid(m)) if m.contains("past")));
        assert!(forge(32, &1u32.to_le_bytes()).is_err());
        assert!(forge(56, &3u32.to_le_bytes()).is_err());
        // A weight is any f32; the frame still decodes with it.
        let Ok(Frame::ExpertRequest { tasks, .. }) = forge(72, &7.0f32.to_le_bytes()) else {
            panic!("a changed weight is still a frame")
        };
        assert_eq!(tasks[0].combine[0], (0, 7.0));
    }

    #[test]
    fn forged_shared_frames_are_rejected() {
        let (bytes, _) = shared();
        truncations_and_extensions_fail(&bytes);
        let forge = |at: usize, v: &[u8]| {
            let mut b = BytesMut::from(&bytes[..]);
            b[at..at + v.len()].copy_from_slice(v);
            Frame::decode(&b.freeze())
        };
        // Layout: header 16, layer 16, hidden 20, dtype 24, tasks 28, distinct rows 32, table
        // 36..60 (rows at 44 and 56), indices 60..72, rows 72..
        assert!(forge(28, &u32::MAX.to_le_bytes()).is_err());
        assert!(forge(32, &u32::MAX.to_le_bytes()).is_err());
        assert!(forge(32, &0u32.to_le_bytes()).is_err());
        assert!(forge(44, &u32::MAX.to_le_bytes()).is_err());
        assert!(forge(56, &3u32.to_le_bytes()).is_err());
        // An index past the distinct rows.
        assert!(matches!(forge(60, &2u32.to_le_bytes()), Err(FrameError::Invalid(m)) if m.contains("past")));
        assert!(forge(68, &u32::MAX.to_le_bytes()).is_err());
        // The untouched frame still decodes.
        assert!(forge(60, &1u32.to_le_bytes()).is_ok());
    }

    /// Every single-byte corruption of either request layout decodes to a frame or a typed
    /// error, never a panic, and a corrupted shared-rows frame never yields rows it does not
    /// carry.
    #[test]
    fn corrupted_requests_never_panic() {
        let plain = request().encode();
        let (shared, _) = shared();
        let (combined, _) = shared_as(true);
        for bytes in [plain, shared, combined] {
            for at in 0..bytes.len() {
                for v in [0u8, 1, 2, 0x7f, 0x80, 0xff] {
                    let mut b = BytesMut::from(&bytes[..]);
                    b[at] = v;
                    if let Ok(Frame::ExpertRequest { tasks, sums, .. }) = Frame::decode(&b.freeze()) {
                        let rows: usize = tasks.iter().map(|t| t.input.rows()).sum();
                        assert!(rows <= 3, "byte {at} = {v}: {rows} rows from a 3-row request");
                        let slots = tasks.iter().flat_map(|t| &t.combine).map(|c| c.0 as usize);
                        assert!(slots.clone().all(|s| s < sums.max(1)) && sums <= 3, "byte {at} = {v}");
                    }
                }
            }
        }
    }

    #[test]
    fn forged_headers_are_rejected() {
        let bytes = request().encode();
        let forge = |at: usize, v: &[u8]| {
            let mut b = BytesMut::from(&bytes[..]);
            b[at..at + v.len()].copy_from_slice(v);
            Frame::decode(&b.freeze())
        };
        assert!(matches!(forge(0, b"XXXX"), Err(FrameError::Magic(_))));
        assert!(matches!(forge(4, &[9]), Err(FrameError::Version(9))));
        assert!(matches!(forge(5, &[99]), Err(FrameError::Kind(99))));
        // hidden = 0, huge hidden, unknown dtype, huge task count, huge row count.
        assert!(forge(20, &0u32.to_le_bytes()).is_err());
        assert!(forge(20, &u32::MAX.to_le_bytes()).is_err());
        assert!(forge(24, &[7]).is_err());
        assert!(forge(28, &u32::MAX.to_le_bytes()).is_err());
        assert!(forge(40, &u32::MAX.to_le_bytes()).is_err());
    }
}
