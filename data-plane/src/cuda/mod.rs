//! The GPU data plane (issue 9): CUDA through cudarc, loaded at run time.
//!
//! Nothing here links against CUDA: `libcuda`, `libcublas`, `libnvrtc` and `libnccl` are opened
//! when first needed, and every entry point first checks that the library can be loaded
//! (cudarc panics otherwise), so the same binary runs on CPU where there is no GPU and says so.
//!
//! - [`Gpu`]: one device, its stream, cuBLAS handle and the NVRTC-compiled kernels of the
//!   `kernels` crate (compiled once per device architecture, cached on disk).
//! - [`backend::CudaBackend`]: the engine's [`crate::backend::Backend`] on the GPU, so every
//!   model runs on CUDA unchanged (host tensors in and out; weights stay on the device).
//! - [`experts::DeviceExpertLayer`]: a MoE layer's routed experts resident on the device in
//!   bf16: permute, grouped GEMMs through cuBLAS with f32 accumulation, the fused SwiGLU
//!   epilogue, weighted un-permute.
//! - [`coldstart::PinnedExpert`]: expert weights staged in pinned host memory and copied to
//!   the device asynchronously on a copy stream, overlapping compute.
//! - [`nccl`]: all-to-all (dispatch/combine) among the GPUs of a node.

pub mod backend;
pub mod coldstart;
pub mod experts;
pub mod nccl;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0:?}")]
    Blas(cudarc::cublas::result::CublasError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error("NCCL: {0:?}")]
    Nccl(cudarc::nccl::result::NcclError),
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Blas(e)
    }
}

impl From<cudarc::nccl::result::NcclError> for CudaError {
    fn from(e: cudarc::nccl::result::NcclError) -> Self {
        CudaError::Nccl(e)
    }
}

/// What a device is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub memory_bytes: usize,
}

/// Which CUDA libraries can be loaded, without loading anything that would panic.
pub fn libraries_present() -> Result<(), CudaError> {
    // SAFETY: each call only tries dlopen with the library's candidate names.
    let (driver, blas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    let missing: Vec<&str> = [
        ("libcuda", driver),
        ("libcublas", blas),
        ("libnvrtc", kernels::nvrtc_available()),
    ]
    .iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| *n)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CudaError::Unavailable(format!(
            "{} not found (LD_LIBRARY_PATH={})",
            missing.join(", "),
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        )))
    }
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: as above.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::Unavailable("libcuda not found (no NVIDIA driver)".into()));
    }
    let n = CudaContext::device_count()?;
    if n <= 0 {
        return Err(CudaError::Unavailable("the driver reports no CUDA device".into()));
    }
    Ok(n as usize)
}

/// One device with its stream, cuBLAS handle and kernels. Operations are serialised by an
/// internal lock: a cuBLAS handle must not be used from two threads at once.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    pub info: DeviceInfo,
    lock: Mutex<()>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({:?})", self.info)
    }
}

// SAFETY: the cuBLAS handle is only used under `lock` (see `Gpu::exclusive`), and cudarc's
// context and stream types are thread-safe.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens device `ordinal`, compiling (or reading from cache) every kernel for it.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        libraries_present()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // cudarc's per-argument event tracking costs driver calls on every launch. Each of our
        // buffers is used on one stream, and the one cross-stream hand-off (a cold start's copy
        // stream to the compute stream) is ordered by an explicit event, so it is switched off.
        // SAFETY: see above: no buffer is used on two streams without an event between them.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: (major, minor),
            multiprocessors: ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            memory_bytes: {
                ctx.bind_to_thread()?;
                cudarc::driver::result::mem_get_info()?.1
            },
        };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let mut funcs = HashMap::new();
        for s in kernels::SOURCES {
            let compiled = kernels::compile(s, major, minor)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx.as_str()))?;
            for k in s.kernels {
                funcs.insert(*k, module.load_function(k)?);
            }
        }
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            blas,
            funcs,
            info,
            lock: Mutex::new(()),
        }))
    }

    /// A kernel by its entry-point name (every name in `kernels::SOURCES` is loaded).
    pub fn func(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in kernels::SOURCES"))
    }

    /// Holds the device for a sequence of operations.
    pub fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Row-major `y[n, out] = x[n, inp] @ w[out, inp]^T` with f32 accumulation (cuBLAS column-major
    /// view: `y^T = w · x^T`). `beta = 1` accumulates into `y`.
    ///
    /// # Safety
    /// The pointers must address live device buffers of the stated shapes and types.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_xwt(
        &self,
        n: usize,
        inp: usize,
        out: usize,
        w: u64,
        x: u64,
        y: u64,
        types: GemmTypes,
        beta: f32,
    ) -> Result<(), CudaError> {
        if n == 0 || out == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        self.ctx.bind_to_thread()?;
        // SAFETY: shapes and pointers are the caller's contract; alpha/beta are f32 for
        // CUBLAS_COMPUTE_32F.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                out as i32,
                n as i32,
                inp as i32,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                types.w,
                inp as i32,
                x as *const _,
                types.x,
                inp as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                types.y,
                out as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// Element types of one GEMM (weights, inputs, outputs); accumulation is always f32.
#[derive(Debug, Clone, Copy)]
pub struct GemmTypes {
    pub w: cudaDataType_t,
    pub x: cudaDataType_t,
    pub y: cudaDataType_t,
}

impl GemmTypes {
    pub const F32: GemmTypes = GemmTypes {
        w: cudaDataType_t::CUDA_R_32F,
        x: cudaDataType_t::CUDA_R_32F,
        y: cudaDataType_t::CUDA_R_32F,
    };
    /// bf16 weights and inputs, f32 output (the engine's residual stream is f32).
    pub const BF16_TO_F32: GemmTypes = GemmTypes {
        w: cudaDataType_t::CUDA_R_16BF,
        x: cudaDataType_t::CUDA_R_16BF,
        y: cudaDataType_t::CUDA_R_32F,
    };
    pub const BF16: GemmTypes = GemmTypes {
        w: cudaDataType_t::CUDA_R_16BF,
        x: cudaDataType_t::CUDA_R_16BF,
        y: cudaDataType_t::CUDA_R_16BF,
    };
}

/// A 1-D grid-stride launch over `n` elements.
pub fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 8192) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Raw device address of a slice (for cuBLAS and pointer arithmetic).
pub fn dptr<T>(s: &cudarc::driver::CudaSlice<T>, stream: &CudaStream) -> u64 {
    use cudarc::driver::DevicePtr;
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// Median milliseconds of `f` on `stream` over `reps` runs after `warmups` untimed ones, each
/// run between two CUDA events (device time, not host time).
pub fn median_event_ms<E: From<CudaError>>(
    stream: &CudaStream,
    warmups: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<f64, E> {
    let timed = |e: cudarc::driver::DriverError| E::from(CudaError::from(e));
    for _ in 0..warmups {
        f()?;
    }
    stream.synchronize().map_err(timed)?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut v = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = stream.record_event(flags).map_err(timed)?;
        f()?;
        let t1 = stream.record_event(flags).map_err(timed)?;
        t1.synchronize().map_err(timed)?;
        v.push(t0.elapsed_ms(&t1).map_err(timed)? as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}
