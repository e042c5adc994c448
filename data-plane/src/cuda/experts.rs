//! A MoE layer's routed experts resident on one GPU, in bf16 with f32 accumulation.
//!
//! One layer call: the tokens' rows are permuted into expert order (`permute_rows_bf16`), each
//! expert with work runs `gate_up = x_e @ [w1; w3]^T` (one cuBLAS GEMM: gate and up projections
//! fused into one `[2I, H]` weight), the fused SwiGLU epilogue (`swiglu_bf16`) and
//! `y_e = h_e @ w2^T`, then `unpermute_combine_*` sums each token's k expert outputs with its
//! routing weights. Workspaces grow to the largest call and are reused.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{dptr, CudaError, GemmTypes, Gpu};

/// One expert's weights on the device: `w13 = [w1; w3]` as `[2I, H]`, `w2` as `[H, I]`, bf16.
pub struct DeviceExpert {
    pub w13: CudaSlice<u16>,
    pub w2: CudaSlice<u16>,
}

/// Checks HF-layout expert weights: `w1`, `w3` `[I, H]`, `w2` `[H, I]`.
pub fn check_expert_shapes(hidden: usize, inter: usize, w1: &[u16], w3: &[u16], w2: &[u16]) -> Result<(), CudaError> {
    let n = inter * hidden;
    if w1.len() != n || w3.len() != n || w2.len() != n {
        return Err(CudaError::Shape(format!(
            "expert weights: w1 {} / w3 {} / w2 {} values, expected {n} each for hidden {hidden}, inter {inter}",
            w1.len(),
            w3.len(),
            w2.len()
        )));
    }
    Ok(())
}

impl DeviceExpert {
    /// Uploads host bf16 bit patterns: `w1`, `w3` `[I, H]`, `w2` `[H, I]` (HF's layout).
    pub fn upload(
        gpu: &Gpu,
        hidden: usize,
        inter: usize,
        w1: &[u16],
        w3: &[u16],
        w2: &[u16],
    ) -> Result<Self, CudaError> {
        check_expert_shapes(hidden, inter, w1, w3, w2)?;
        let a = inter * hidden;
        let s = &gpu.stream;
        let mut w13 = Vec::with_capacity(2 * a);
        w13.extend_from_slice(w1);
        w13.extend_from_slice(w3);
        Ok(Self {
            w13: s.clone_htod(&w13)?,
            w2: s.clone_htod(w2)?,
        })
    }

    pub fn bytes(&self) -> usize {
        (self.w13.len() + self.w2.len()) * 2
    }
}

/// Where each routed (token, slot) goes: rows sorted by expert (stable in token order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// `src_rows[i]`: the token whose row is permuted row `i`.
    pub src_rows: Vec<i32>,
    /// Expert `e` owns permuted rows `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<usize>,
    /// `pos[t * k + j]`: the permuted row of token `t`'s `j`-th choice (`-1`: expert absent).
    pub pos: Vec<i32>,
}

/// Counting sort of `ids` (`[tokens * k]`, token-major) by expert. Ids `>= experts` are
/// dropped (their slot gets `pos = -1`).
pub fn plan_dispatch(ids: &[u32], k: usize, experts: usize) -> DispatchPlan {
    let mut counts = vec![0usize; experts + 1];
    for &e in ids {
        if (e as usize) < experts {
            counts[e as usize + 1] += 1;
        }
    }
    for e in 0..experts {
        counts[e + 1] += counts[e];
    }
    let offsets = counts.clone();
    let mut next = counts;
    let mut src_rows = vec![0i32; offsets[experts]];
    let mut pos = vec![-1i32; ids.len()];
    for (slot, &e) in ids.iter().enumerate() {
        let e = e as usize;
        if e < experts {
            let r = next[e];
            next[e] += 1;
            src_rows[r] = (slot / k.max(1)) as i32;
            pos[slot] = r as i32;
        }
    }
    DispatchPlan { src_rows, offsets, pos }
}

#[derive(Default)]
struct Workspace {
    permuted: Option<CudaSlice<u16>>,
    gate_up: Option<CudaSlice<u16>>,
    act: Option<CudaSlice<u16>>,
    expert_out: Option<CudaSlice<u16>>,
}

fn ensure(gpu: &Gpu, slot: &mut Option<CudaSlice<u16>>, len: usize) -> Result<(), CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(gpu.stream.alloc_zeros::<u16>(len.max(1))?);
    }
    Ok(())
}

pub struct DeviceExpertLayer {
    gpu: Arc<Gpu>,
    pub hidden: usize,
    pub inter: usize,
    experts: Vec<Option<DeviceExpert>>,
    ws: std::sync::Mutex<Workspace>,
}

impl DeviceExpertLayer {
    pub fn new(gpu: Arc<Gpu>, hidden: usize, inter: usize, num_experts: usize) -> Self {
        Self {
            gpu,
            hidden,
            inter,
            experts: (0..num_experts).map(|_| None).collect(),
            ws: Default::default(),
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Makes expert `e` resident (replacing any earlier instance).
    pub fn install(&mut self, e: usize, expert: DeviceExpert) -> Result<(), CudaError> {
        let n = self.experts.len();
        let slot = self
            .experts
            .get_mut(e)
            .ok_or_else(|| CudaError::Shape(format!("expert {e} of a {n}-expert layer")))?;
        *slot = Some(expert);
        Ok(())
    }

    /// Scale to zero: frees expert `e`'s device memory.
    pub fn evict(&mut self, e: usize) -> Option<DeviceExpert> {
        self.experts.get_mut(e).and_then(Option::take)
    }

    pub fn is_resident(&self, e: usize) -> bool {
        self.experts.get(e).is_some_and(Option::is_some)
    }

    /// One expert's FFN on `n` rows: `x` and `out` are device addresses of `[n, H]` bf16;
    /// `gate_up` (`[n, 2I]`) and `act` (`[n, I]`) are scratch.
    ///
    /// # Safety
    /// All four addresses must point to live device buffers of at least those sizes.
    pub unsafe fn expert_ffn_raw(
        &self,
        e: usize,
        n: usize,
        x: u64,
        gate_up: u64,
        act: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        let ex = self.experts[e]
            .as_ref()
            .ok_or_else(|| CudaError::Shape(format!("expert {e} is not resident")))?;
        let (h, i) = (self.hidden, self.inter);
        let s = &self.gpu.stream;
        // SAFETY: shapes as documented; the caller guarantees the buffers.
        unsafe {
            self.gpu
                .gemm_xwt(n, h, 2 * i, dptr(&ex.w13, s), x, gate_up, GemmTypes::BF16, 0.0)?;
            let threads = 256u32;
            let per_row = (i / 8).div_ceil(threads as usize).clamp(1, 64) as u32;
            let inter = i as i32;
            // One grid row per token; grids are at most 65535 high, so long calls go in chunks.
            for r0 in (0..n).step_by(65_535) {
                let rows = (n - r0).min(65_535);
                let (gu, a) = (gate_up + (r0 * 2 * i * 2) as u64, act + (r0 * i * 2) as u64);
                let rows_i = rows as i32;
                s.launch_builder(self.gpu.func("swiglu_bf16"))
                    .arg(&gu)
                    .arg(&a)
                    .arg(&rows_i)
                    .arg(&inter)
                    .launch(LaunchConfig {
                        grid_dim: (per_row, rows as u32, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    })?;
            }
            self.gpu
                .gemm_xwt(n, i, h, dptr(&ex.w2, s), act, out, GemmTypes::BF16, 0.0)?;
        }
        Ok(())
    }

    /// The layer on `tokens` rows of `x` (`[tokens, H]` bf16 on the device) routed by `ids` /
    /// `weights` (`[tokens * k]`, token-major, host): returns `[tokens, H]` bf16. Every routed
    /// expert must be resident.
    pub fn forward(
        &self,
        x: &CudaSlice<u16>,
        tokens: usize,
        ids: &[u32],
        weights: &[f32],
        k: usize,
    ) -> Result<CudaSlice<u16>, CudaError> {
        let (h, i) = (self.hidden, self.inter);
        if ids.len() != tokens * k || weights.len() != tokens * k || x.len() < tokens * h {
            return Err(CudaError::Shape(format!(
                "layer forward: {tokens} tokens x k {k} vs {} ids, {} weights, {} input values",
                ids.len(),
                weights.len(),
                x.len()
            )));
        }
        if let Some(&e) = ids.iter().find(|&&e| !self.is_resident(e as usize)) {
            return Err(CudaError::Shape(format!("routed to expert {e}, which is not resident")));
        }
        let plan = plan_dispatch(ids, k, self.experts.len());
        let rows = plan.src_rows.len();
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let mut ws = self.ws.lock().unwrap_or_else(|p| p.into_inner());
        ensure(&self.gpu, &mut ws.permuted, rows * h)?;
        ensure(&self.gpu, &mut ws.gate_up, rows * 2 * i)?;
        ensure(&self.gpu, &mut ws.act, rows * i)?;
        ensure(&self.gpu, &mut ws.expert_out, rows * h)?;
        let src = s.clone_htod(&plan.src_rows)?;
        let pos = s.clone_htod(&plan.pos)?;
        let wts = s.clone_htod(weights)?;
        let mut out = s.alloc_zeros::<u16>((tokens * h).max(1))?;
        let (permuted, gate_up, act, expert_out) = (
            ws.permuted.as_ref().expect("ensured"),
            ws.gate_up.as_ref().expect("ensured"),
            ws.act.as_ref().expect("ensured"),
            ws.expert_out.as_ref().expect("ensured"),
        );
        let (rows_i, cols_i) = (rows as i32, h as i32);
        let threads = (h / 8).next_multiple_of(32).clamp(32, 256) as u32;
        if rows > 0 {
            // SAFETY: permute_rows_bf16(x, out, src_rows, rows_out, cols).
            unsafe {
                s.launch_builder(self.gpu.func("permute_rows_bf16"))
                    .arg(x)
                    .arg(permuted)
                    .arg(&src)
                    .arg(&rows_i)
                    .arg(&cols_i)
                    .launch(LaunchConfig {
                        grid_dim: (rows as u32, 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    })?;
            }
        }
        let (p0, g0, a0, o0) = (dptr(permuted, s), dptr(gate_up, s), dptr(act, s), dptr(expert_out, s));
        for e in 0..self.experts.len() {
            let (r0, r1) = (plan.offsets[e], plan.offsets[e + 1]);
            if r1 == r0 {
                continue;
            }
            // SAFETY: rows r0..r1 of each workspace lie inside it (sized for `rows`).
            unsafe {
                self.expert_ffn_raw(
                    e,
                    r1 - r0,
                    p0 + (r0 * h * 2) as u64,
                    g0 + (r0 * 2 * i * 2) as u64,
                    a0 + (r0 * i * 2) as u64,
                    o0 + (r0 * h * 2) as u64,
                )?;
            }
        }
        let (t_i, k_i) = (tokens as i32, k as i32);
        // SAFETY: unpermute_combine_bf16(y, pos, weights, out, tokens, k, cols).
        unsafe {
            s.launch_builder(self.gpu.func("unpermute_combine_bf16"))
                .arg(expert_out)
                .arg(&pos)
                .arg(&wts)
                .arg(&mut out)
                .arg(&t_i)
                .arg(&k_i)
                .arg(&cols_i)
                .launch(LaunchConfig {
                    grid_dim: (tokens.max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_plan_is_a_stable_counting_sort() {
        // 3 tokens, k = 2: t0 -> (2, 0), t1 -> (0, 1), t2 -> (2, 9 = absent)
        let p = plan_dispatch(&[2, 0, 0, 1, 2, 9], 2, 3);
        assert_eq!(p.offsets, vec![0, 2, 3, 5]);
        assert_eq!(p.src_rows, vec![0, 1, 1, 0, 2]);
        assert_eq!(p.pos, vec![3, 0, 1, 2, 4, -1]);
        for (slot, &r) in p.pos.iter().enumerate() {
            if r >= 0 {
                assert_eq!(p.src_rows[r as usize] as usize, slot / 2);
            }
        }
    }
}
