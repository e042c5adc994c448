//! All-to-all among the GPUs of a node through NCCL, for expert-parallel dispatch and combine.
//!
//! Each rank holds a send buffer of rows grouped by destination (`send_rows[r][p]` rows for
//! peer `p`, in peer order) and receives into a buffer grouped by source. One process drives
//! every local GPU (`ncclCommInitAll`), so all ranks' sends and receives are issued inside one
//! NCCL group. `libnccl` is loaded at run time; [`nccl_available`] checks first.

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::result as nccl;
use std::sync::Arc;

use super::CudaError;

/// Whether `libnccl` can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries dlopen with the library's candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One communicator per local GPU, rank `i` on `streams[i]`.
pub struct LocalComms {
    comms: Vec<cudarc::nccl::Comm>,
}

impl LocalComms {
    pub fn new(streams: Vec<Arc<CudaStream>>) -> Result<Self, CudaError> {
        if !nccl_available() {
            return Err(CudaError::Unavailable("libnccl not found".into()));
        }
        Ok(Self {
            comms: cudarc::nccl::Comm::from_devices(streams)?,
        })
    }

    pub fn world_size(&self) -> usize {
        self.comms.len()
    }

    /// All-to-all-v of bf16 rows of `cols` values: rank `r` sends `send_rows[r][p]` rows to
    /// peer `p` from `send[r]` (grouped by peer, in order) and receives `send_rows[p][r]` rows
    /// from each peer `p` into `recv[r]` (grouped by source, in order). Asynchronous on each
    /// rank's stream.
    pub fn all_to_all_v(
        &self,
        send: &[CudaSlice<u16>],
        send_rows: &[Vec<usize>],
        recv: &mut [CudaSlice<u16>],
        cols: usize,
    ) -> Result<(), CudaError> {
        let w = self.world_size();
        if send.len() != w || recv.len() != w || send_rows.len() != w || send_rows.iter().any(|r| r.len() != w) {
            return Err(CudaError::Shape(format!(
                "all_to_all_v over {w} ranks: mismatched buffer lists"
            )));
        }
        for r in 0..w {
            let out: usize = send_rows[r].iter().sum::<usize>() * cols;
            let inn: usize = (0..w).map(|p| send_rows[p][r]).sum::<usize>() * cols;
            if send[r].len() < out || recv[r].len() < inn {
                return Err(CudaError::Shape(format!(
                    "rank {r}: sends {out} values from a buffer of {}, receives {inn} into {}",
                    send[r].len(),
                    recv[r].len()
                )));
            }
        }
        // bf16 travels as ncclBfloat16 (2 bytes); values are only moved, never reduced.
        // SAFETY (group): sends and receives of all ranks are issued inside one group, as NCCL
        // requires when one thread drives several ranks; the buffers outlive the calls and the
        // counts were checked above.
        nccl::group_start()?;
        let issued = (|| -> Result<(), CudaError> {
            for (r, c) in self.comms.iter().enumerate() {
                // SAFETY: u16 and half::bf16 have the same size and alignment.
                let sv = unsafe { send[r].transmute::<half::bf16>(send[r].len()) }.expect("same size");
                let mut rv = unsafe { recv[r].transmute_mut::<half::bf16>(recv[r].len()) }.expect("same size");
                let (mut so, mut ro) = (0usize, 0usize);
                for (p, &rows_out) in send_rows[r].iter().enumerate() {
                    let n_out = rows_out * cols;
                    let n_in = send_rows[p][r] * cols;
                    if n_out > 0 {
                        c.send(&sv.slice(so..so + n_out), p as i32)?;
                    }
                    if n_in > 0 {
                        c.recv(&mut rv.slice_mut(ro..ro + n_in), p as i32)?;
                    }
                    so += n_out;
                    ro += n_in;
                }
            }
            Ok(())
        })();
        let ended = nccl::group_end();
        issued?;
        ended?;
        Ok(())
    }
}
