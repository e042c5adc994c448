//! Tensor math behind one trait, so one model definition serves every device.
//!
//! The model code ([`crate::model`]) and the expert functions ([`crate::expert`]) call only
//! these operations. [`CpuBackend`] implements them with `gemm` (the pure-Rust BLAS that
//! candle uses on CPU) for matrix products and rayon-parallel loops for the rest. A CUDA
//! backend (issue 9) implements the same trait.

use crate::kv_cache::KvView;
use crate::tensor::Tensor;
use crate::weight::Weight;
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
    fn linear(&self, x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Tensor;

    /// RMSNorm over the last dimension: `w * x / sqrt(mean(x^2) + eps)`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Tensor;

    /// LayerNorm over the last dimension with affine weight and bias.
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor;

    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Tensor;

    /// `down(silu(x @ gate^T) * (x @ up^T))`, a SwiGLU FFN without biases (routed and shared
    /// experts, dense MLPs). A backend that keeps activations on a device overrides it so the
    /// intermediates never leave the device.
    fn swiglu_ffn(&self, x: &Tensor, gate: &Weight, up: &Weight, down: &Weight) -> Tensor {
        let a = self.silu_mul(&self.linear(x, gate, None), &self.linear(x, up, None));
        self.linear(&a, down, None)
    }

    /// GPT-OSS's clamped gated activation: `(clamp(up) + 1) * g * sigmoid(alpha * g)` with
    /// `g = min(gate, limit)`, `up` clamped to `[-limit, limit]`.
    fn clamped_swiglu(&self, gate: &Tensor, up: &Tensor, limit: f32, alpha: f32) -> Tensor;

    /// Causal scaled-dot-product attention of `t` new queries of one sequence.
    ///
    /// `q`: `[t, heads, qk_dim]` at positions `q_start..q_start+t`; `kv`: per position a key
    /// row `[kv_heads, qk_dim]` and a value row `[kv_heads, v_dim]` for positions `0..P` with
    /// `P >= q_start + t` (contiguous, or paged through a block table).
    /// `sinks`: one learned logit per head that joins each softmax and is then dropped.
    /// Returns `[t, heads * v_dim]`.
    fn attention(
        &self,
        q: &[f32],
        kv: &KvView<'_>,
        q_start: usize,
        sinks: Option<&[f32]>,
        shape: &AttentionShape,
    ) -> Tensor;
}

/// Host CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Up to this many rows a matrix product is done weight-row by weight-row ([`simd::dots`]):
/// each weight slice is read from memory once per 16 input rows and dotted with them while it
/// sits in L1 (decode is bandwidth-bound). Measured on a 32000 x 2048 f32 weight (2 cores):
/// ~20% faster than gemm's packed kernels at 24-48 rows, level at 64.
const SMALL_BATCH_ROWS: usize = 48;

/// Dot products with runtime-selected SIMD (AVX2 + FMA where the CPU has it), so one binary
/// runs everywhere and uses what it finds.
pub mod simd {
    use crate::weight::bf16_to_f32;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { x86::dot_f32(a, b) };
        }
        dot_scalar(a, b)
    }

    /// Weight rows for [`dots`]: `rows x cols`, row-major, f32 or bf16 bit patterns.
    #[derive(Clone, Copy)]
    pub enum Rows<'a> {
        F32(&'a [f32]),
        Bf16(&'a [u16]),
    }

    impl Rows<'_> {
        fn len(&self) -> usize {
            match self {
                Rows::F32(w) => w.len(),
                Rows::Bf16(w) => w.len(),
            }
        }
    }

    /// `out[c * xs.len() + r] = x_r . w_c` for every weight row `c` of `w` (rows of
    /// `xs[0].len()` elements) and every input row `r`.
    ///
    /// Each weight row is read from memory once per 16 input rows and dotted with them while it
    /// is in cache; tiles of 4 weight rows x 3 input rows (4 x 1 for one input row) keep 12 (4)
    /// accumulators in registers, so each loaded vector feeds several FMAs. Every pair is
    /// summed in one order whatever tile computes it (one 8-lane accumulator along the row, a
    /// fixed horizontal sum, then the tail in order), so a token's result does not depend on the
    /// tokens batched with it: batched and one-at-a-time runs agree bit for bit.
    pub fn dots(xs: &[&[f32]], w: Rows<'_>, out: &mut [f32]) {
        let (n, cols) = (xs.len(), xs.first().map_or(0, |x| x.len()));
        if n == 0 {
            return;
        }
        assert!(xs.iter().all(|x| x.len() == cols), "dots: ragged input rows");
        if cols == 0 {
            out.fill(0.0);
            return;
        }
        assert!(
            w.len().is_multiple_of(cols),
            "dots: weight length {} vs rows of {cols}",
            w.len()
        );
        assert_eq!(out.len(), w.len() / cols * n, "dots: output length");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features; lengths were checked above.
            return unsafe { x86::dots(xs, w, cols, out) };
        }
        for (c, o) in out.chunks_mut(n).enumerate() {
            for (x, v) in xs.iter().zip(o) {
                *v = match w {
                    Rows::F32(w) => dot_scalar(x, &w[c * cols..(c + 1) * cols]),
                    Rows::Bf16(w) => x
                        .iter()
                        .zip(&w[c * cols..(c + 1) * cols])
                        .map(|(a, &b)| a * bf16_to_f32(b))
                        .sum(),
                };
            }
        }
    }

    pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
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

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// `sum_i a[i] * b(i)` over `n` elements, where `load_b(i)` yields `b[i..i + 8]` as f32 and
        /// `tail_b(i)` a single element.
        #[inline(always)]
        unsafe fn dot_with(
            a: &[f32],
            n: usize,
            load_b: impl Fn(usize) -> __m256,
            tail_b: impl Fn(usize) -> f32,
        ) -> f32 {
            let pa = a.as_ptr();
            // SAFETY (all loads below): every index read is < n <= a.len().
            let mut acc = [unsafe { _mm256_setzero_ps() }; 4];
            let mut i = 0;
            while i + 32 <= n {
                for (k, ac) in acc.iter_mut().enumerate() {
                    *ac = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * k)), load_b(i + 8 * k), *ac) };
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load_b(i), acc[0]) };
                i += 8;
            }
            let mut s = unsafe {
                hsum(_mm256_add_ps(
                    _mm256_add_ps(acc[0], acc[1]),
                    _mm256_add_ps(acc[2], acc[3]),
                ))
            };
            while i < n {
                s += a[i] * tail_b(i);
                i += 1;
            }
            s
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let pb = b.as_ptr();
            // SAFETY: dot_with reads b only below n.
            unsafe { dot_with(a, n, |i| _mm256_loadu_ps(pb.add(i)), |i| b[i]) }
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16 at p.
            let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }

        #[inline(always)]
        unsafe fn dots_with(
            xs: &[&[f32]],
            cols: usize,
            rows: usize,
            load_w: impl Fn(usize) -> __m256,
            prefetch_w: impl Fn(usize),
            tail_w: impl Fn(usize) -> f32,
            out: &mut [f32],
        ) {
            let n = xs.len();
            let (lw, pw, tw) = (&load_w, &prefetch_w, &tail_w);
            // Blocks of ROWS weight rows x TOKENS inputs, walked in column slices of SLICE, so
            // the inputs' slice (TOKENS x 2 KiB) stays in L1 across the block's rows and each
            // weight slice is fetched from memory once and reused from L1 by every token group.
            // Accumulators live in `acc` between slices; each lane still sums its products in
            // column order, so the result is the same as one pass. A single input needs no
            // reuse: its slice is the whole row, streamed 4 weight rows at a time.
            let full = cols / 8 * 8;
            let width = if n == 1 { full } else { SLICE };
            for t0 in (0..n).step_by(TOKENS) {
                let t1 = (t0 + TOKENS).min(n);
                for c0 in (0..rows).step_by(ROWS) {
                    let c1 = (c0 + ROWS).min(rows);
                    let mut acc = [[unsafe { _mm256_setzero_ps() }; TOKENS]; ROWS];
                    let mut k = 0;
                    while k < full {
                        let k1 = (k + width).min(full);
                        let mut c = c0;
                        while c < c1 {
                            let step = match c1 - c {
                                4.. => 4,
                                2 | 3 => 2,
                                _ => 1,
                            };
                            let mut r = t0;
                            while r < t1 {
                                let left = (t1 - r).min(3);
                                let at = (c - c0, r - t0);
                                let xr = &xs[r..];
                                // SAFETY: weight rows c..c + step and inputs r..r + left exist,
                                // and k..k1 lies within every row.
                                unsafe {
                                    match (step, left) {
                                        (4, 3) => slice::<4, 3>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (4, 2) => slice::<4, 2>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (4, _) => slice::<4, 1>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (2, 3) => slice::<2, 3>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (2, 2) => slice::<2, 2>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (2, _) => slice::<2, 1>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (_, 3) => slice::<1, 3>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (_, 2) => slice::<1, 2>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                        (_, _) => slice::<1, 1>(xr, c, k, k1, cols, lw, pw, &mut acc, at),
                                    }
                                }
                                r += left;
                            }
                            c += step;
                        }
                        k = k1;
                    }
                    for c in c0..c1 {
                        for r in t0..t1 {
                            let mut s = unsafe { hsum(acc[c - c0][r - t0]) };
                            for (t, x) in xs[r].iter().enumerate().skip(full) {
                                s += x * tw(c * cols + t);
                            }
                            out[c * n + r] = s;
                        }
                    }
                }
            }
        }

        /// Weight rows per block.
        const ROWS: usize = 16;
        /// Input rows per block.
        const TOKENS: usize = 16;
        /// How far ahead (elements) the first token group prefetches each weight row.
        const AHEAD: usize = 128;
        /// Columns per slice: 2 KiB of f32 per row.
        const SLICE: usize = 512;

        /// Columns `k0..k1` (multiples of 8) of weight rows `c0..c0 + C` against input rows
        /// `xs[0..R]`, accumulating into `acc[at.0..][at.1..]`.
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        unsafe fn slice<const C: usize, const R: usize>(
            xs: &[&[f32]],
            c0: usize,
            k0: usize,
            k1: usize,
            cols: usize,
            load_w: &impl Fn(usize) -> __m256,
            prefetch_w: &impl Fn(usize),
            acc: &mut [[__m256; TOKENS]; ROWS],
            at: (usize, usize),
        ) {
            let px: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
            let mut a: [[__m256; R]; C] = std::array::from_fn(|c| std::array::from_fn(|r| acc[at.0 + c][at.1 + r]));
            let mut i = k0;
            let fetch = at.1 == 0;
            // SAFETY (loads): i + 8 <= k1 <= cols, the length of every input and weight row.
            while i < k1 {
                if fetch && i.is_multiple_of(16) {
                    for c in 0..C {
                        prefetch_w((c0 + c) * cols + i + AHEAD);
                    }
                }
                let xv: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(px[r].add(i)) });
                for (c, row) in a.iter_mut().enumerate() {
                    let wv = load_w((c0 + c) * cols + i);
                    for (v, x) in row.iter_mut().zip(&xv) {
                        *v = unsafe { _mm256_fmadd_ps(*x, wv, *v) };
                    }
                }
                i += 8;
            }
            for (c, row) in a.iter().enumerate() {
                for (r, v) in row.iter().enumerate() {
                    acc[at.0 + c][at.1 + r] = *v;
                }
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dots(xs: &[&[f32]], w: super::Rows<'_>, cols: usize, out: &mut [f32]) {
            let rows = w.len() / cols;
            // SAFETY: the loaders read w below rows * cols = w.len() (dots_with's indices).
            match w {
                super::Rows::F32(w) => {
                    let pw = w.as_ptr();
                    unsafe {
                        dots_with(
                            xs,
                            cols,
                            rows,
                            |i| _mm256_loadu_ps(pw.add(i)),
                            |i| _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i) as *const i8),
                            |i| w[i],
                            out,
                        )
                    }
                }
                super::Rows::Bf16(w) => {
                    let pw = w.as_ptr();
                    unsafe {
                        dots_with(
                            xs,
                            cols,
                            rows,
                            |i| load_bf16(pw.add(i)),
                            |i| _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(i) as *const i8),
                            |i| super::bf16_to_f32(w[i]),
                            out,
                        )
                    }
                }
            }
        }
    }
}

use simd::dot;

/// `y[n, out]` for small `n`: each weight row is read once and dotted with every input row.
fn small_batch_linear(x: &Tensor, w: &Weight, y: &mut [f32]) {
    const BLOCK: usize = 32;
    let (n, inp, out) = (x.rows(), x.cols(), w.rows());
    let xs: Vec<&[f32]> = (0..n).map(|r| x.row(r)).collect();
    let rows = |j0: usize, j1: usize| match w {
        Weight::F32(t) => simd::Rows::F32(&t.data()[j0 * inp..j1 * inp]),
        Weight::Bf16 { data, .. } => simd::Rows::Bf16(&data[j0 * inp..j1 * inp]),
    };
    // Work in [out, n] order so parallel chunks are contiguous, then transpose.
    let mut yt = vec![0.0f32; out * n];
    if out * inp * n < 1 << 15 {
        simd::dots(&xs, rows(0, out), &mut yt);
    } else {
        yt.par_chunks_mut(BLOCK * n).enumerate().for_each(|(b, chunk)| {
            let j0 = b * BLOCK;
            simd::dots(&xs, rows(j0, j0 + chunk.len() / n), chunk);
        });
    }
    for j in 0..out {
        for r in 0..n {
            y[r * out + j] = yt[j * n + r];
        }
    }
}

/// `y[:, j0..j0+cols] = x @ w^T` for a row-major f32 block `w [cols, inp]`, with gemm.
///
/// # Safety
/// `y` must point to a live `[x.rows(), out]` row-major buffer with `j0 + cols <= out`, and no
/// one else may access columns `j0..j0+cols` of it during the call.
unsafe fn gemm_block(x: &Tensor, w: &[f32], j0: usize, out: usize, y: *mut f32, par: gemm::Parallelism) {
    let (n, inp) = (x.rows(), x.cols());
    let cols = w.len() / inp;
    // SAFETY: dst is y viewed as [n, out] starting at column j0 (row stride out); lhs = x
    // [n, inp] row-major; rhs = w^T viewed as [inp, cols] (w is [cols, inp] row-major).
    unsafe {
        gemm::gemm(
            n,
            cols,
            inp,
            y.add(j0),
            1,
            out as isize,
            false,
            x.data().as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
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

/// A raw output pointer handed to parallel tasks that write disjoint column blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint regions (see gemm_block's contract).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn linear(&self, x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Tensor {
        let (n, inp, out) = (x.rows(), x.cols(), w.rows());
        assert_eq!(w.cols(), inp, "linear: weight {w:?} vs input {:?}", x.shape());
        let mut y = vec![0.0f32; n * out];
        if n == 0 || out == 0 {
        } else if n <= SMALL_BATCH_ROWS {
            small_batch_linear(x, w, &mut y);
        } else {
            match w {
                Weight::F32(t) => {
                    let par = if n * out * inp >= 1 << 18 {
                        gemm::Parallelism::Rayon(0)
                    } else {
                        gemm::Parallelism::None
                    };
                    // SAFETY: y is [n, out]; the block covers all columns and nothing else runs.
                    unsafe { gemm_block(x, t.data(), 0, out, y.as_mut_ptr(), par) }
                }
                Weight::Bf16 { .. } => {
                    // Each task widens a block of rows (staying in cache) and multiplies it
                    // into its own columns of y, so widening runs in parallel too.
                    const BLOCK: usize = 128;
                    let yp = OutPtr(y.as_mut_ptr());
                    let starts: Vec<usize> = (0..out).step_by(BLOCK).collect();
                    starts.par_iter().for_each(|&j0| {
                        let wf = w.rows_f32(j0, (j0 + BLOCK).min(out));
                        // SAFETY: blocks cover disjoint column ranges of the [n, out] buffer.
                        unsafe { gemm_block(x, &wf, j0, out, yp.get(), gemm::Parallelism::None) }
                    });
                }
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
        kv: &KvView<'_>,
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
                .map(|j| dot(qv, &kv.key(j)[kvh * s.qk_dim..(kvh + 1) * s.qk_dim]) * s.scale)
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
                let vv = &kv.value(j)[kvh * s.v_dim..(kvh + 1) * s.v_dim];
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
        for n in [1, 3, 9, 20, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1] {
            let (inp, out) = (37, 129);
            let x = Tensor::matrix(
                n,
                inp,
                (0..n * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect(),
            );
            let w = Tensor::matrix(
                out,
                inp,
                (0..out * inp).map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0).collect(),
            );
            let y = CpuBackend.linear(&x, &Weight::F32(w.clone()), None);
            let want = naive_linear(&x, &w);
            for (a, b) in y.data().iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bf16_weights_match_their_f32_widening_on_both_paths() {
        for n in [1, 5, 17, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1] {
            let (inp, out) = (70, 33);
            let x = Tensor::matrix(
                n,
                inp,
                (0..n * inp).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect(),
            );
            let bits: Vec<u16> = (0..out * inp)
                .map(|i| half::bf16::from_f32(((i * 13 % 19) as f32 - 9.0) / 7.0).to_bits())
                .collect();
            let w = Weight::Bf16 {
                rows: out,
                cols: inp,
                data: bits,
            };
            let wide = w.to_f32();
            let y = CpuBackend.linear(&x, &w, None);
            let want = naive_linear(&x, &wide);
            for (a, b) in y.data().iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_tokens_dots_do_not_depend_on_the_tokens_beside_it() {
        // Lengths with and without a tail and over several column slices, row counts that leave
        // every tile and block remainder, and batches from 1 to 9 and past one token block
        // (every C x R tile, and the 4 x 1 path of one token).
        for cols in [7, 8, 37, 70, 1100] {
            for rows in [1, 2, 3, 5, 9, 35] {
                let wf: Vec<f32> = (0..rows * cols).map(|i| ((i * 13 % 19) as f32 - 9.0) / 7.0).collect();
                let wb: Vec<u16> = wf.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                let xs: Vec<Vec<f32>> = (0..20)
                    .map(|r| {
                        (0..cols)
                            .map(|i| (((r * 31 + i) * 7 % 23) as f32 - 11.0) / 5.0)
                            .collect()
                    })
                    .collect();
                for w in [simd::Rows::F32(&wf), simd::Rows::Bf16(&wb)] {
                    let alone: Vec<Vec<f32>> = xs
                        .iter()
                        .map(|x| {
                            let mut o = vec![0.0; rows];
                            simd::dots(&[x.as_slice()], w, &mut o);
                            o
                        })
                        .collect();
                    for n in (1..=9).chain([16, 17, 20]) {
                        let batch: Vec<&[f32]> = xs[..n].iter().map(|x| x.as_slice()).collect();
                        let mut o = vec![0.0; rows * n];
                        simd::dots(&batch, w, &mut o);
                        for c in 0..rows {
                            for r in 0..n {
                                assert_eq!(
                                    o[c * n + r].to_bits(),
                                    alone[r][c].to_bits(),
                                    "cols {cols} rows {rows} n {n}"
                                );
                                let want: f32 = (0..cols)
                                    .map(|i| {
                                        let wv = match w {
                                            simd::Rows::F32(w) => w[c * cols + i],
                                            simd::Rows::Bf16(w) => crate::weight::bf16_to_f32(w[c * cols + i]),
                                        };
                                        xs[r][i] * wv
                                    })
                                    .sum();
                                assert!((o[c * n + r] - want).abs() < 1e-4, "{} vs {want}", o[c * n + r]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn simd_dot_matches_scalar() {
        for len in [0, 1, 7, 8, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!((simd::dot(&a, &b) - simd::dot_scalar(&a, &b)).abs() < 1e-4, "len {len}");
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
        let out = CpuBackend.attention(&q, &KvView::contiguous(&k, &v, 1, 1), 2, Some(&[0.5]), &s);
        // window 2 at position 2 sees keys 1 and 2 only.
        let e = [1.0f32.exp(), 2.0f32.exp(), 0.5f32.exp()];
        let want = (10.0 * e[0] + 20.0 * e[1]) / (e[0] + e[1] + e[2]);
        assert!((out.data()[0] - want).abs() < 1e-4);
    }
}
