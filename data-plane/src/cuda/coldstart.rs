//! Expert cold starts from pinned host memory.
//!
//! A worker keeps the experts it may be asked to start staged in page-locked (pinned) host
//! memory, laid out as the device wants them (`[w1; w3]` then `w2`, bf16). Starting an instance
//! is then one asynchronous host-to-device copy on a dedicated copy stream, which overlaps
//! whatever the compute stream is running; the compute stream waits on an event only when it
//! first uses the new instance.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};

use super::experts::DeviceExpert;
use super::{CudaError, Gpu};

/// One expert's weights in pinned host memory.
pub struct PinnedExpert {
    pub hidden: usize,
    pub inter: usize,
    w13: PinnedHostSlice<u16>,
    w2: PinnedHostSlice<u16>,
}

impl PinnedExpert {
    /// Stages HF-layout bf16 weights (`w1`, `w3` `[I, H]`, `w2` `[H, I]`).
    pub fn stage(
        gpu: &Gpu,
        hidden: usize,
        inter: usize,
        w1: &[u16],
        w3: &[u16],
        w2: &[u16],
    ) -> Result<Self, CudaError> {
        super::experts::check_expert_shapes(hidden, inter, w1, w3, w2)?;
        let (a, b) = (inter * hidden, hidden * inter);
        // SAFETY: both buffers are fully written below before any copy reads them.
        let (mut h13, mut h2) = unsafe { (gpu.ctx.alloc_pinned::<u16>(2 * a)?, gpu.ctx.alloc_pinned::<u16>(b)?) };
        let dst = h13.as_mut_slice()?;
        dst[..a].copy_from_slice(w1);
        dst[a..].copy_from_slice(w3);
        h2.as_mut_slice()?.copy_from_slice(w2);
        Ok(Self {
            hidden,
            inter,
            w13: h13,
            w2: h2,
        })
    }

    pub fn bytes(&self) -> usize {
        self.w13.num_bytes() + self.w2.num_bytes()
    }

    /// Starts the copy on `copy_stream` and returns the instance with an event that completes
    /// when its weights have arrived (wait on it before the first use).
    pub fn start(&self, copy_stream: &Arc<CudaStream>) -> Result<(DeviceExpert, CudaEvent), CudaError> {
        let a = self.inter * self.hidden;
        // SAFETY: both buffers are fully overwritten by the copies below before any use, which
        // the returned event orders.
        let (mut w13, mut w2) = unsafe { (copy_stream.alloc::<u16>(2 * a)?, copy_stream.alloc::<u16>(a)?) };
        copy_stream.memcpy_htod(&self.w13, &mut w13)?;
        copy_stream.memcpy_htod(&self.w2, &mut w2)?;
        let done = copy_stream.record_event(None)?;
        Ok((DeviceExpert { w13, w2 }, done))
    }
}

/// Host-to-device bandwidth of one pinned copy of `bytes`, in GB/s (median of `reps`).
pub fn pinned_h2d_gbps(gpu: &Gpu, bytes: usize, reps: usize) -> Result<f64, CudaError> {
    let n = bytes / 2;
    // SAFETY: the contents are irrelevant to a bandwidth measurement.
    let host = unsafe { gpu.ctx.alloc_pinned::<u16>(n)? };
    let s = gpu.ctx.new_stream()?;
    // SAFETY: as above.
    let mut dev = unsafe { s.alloc::<u16>(n)? };
    let ms = super::median_event_ms(&s, 1, reps, || -> Result<(), CudaError> {
        s.memcpy_htod(&host, &mut dev)?;
        Ok(())
    })?;
    Ok(bytes as f64 / (ms / 1e3) / 1e9)
}
