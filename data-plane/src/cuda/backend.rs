//! The engine's [`Backend`] on a GPU.
//!
//! Every model and expert function runs on CUDA unchanged: each operation uploads its
//! activations, runs cuBLAS or a kernel of the `kernels` crate, and downloads the result.
//! Weights are uploaded once and kept on the device, keyed by the address and length of their
//! host buffer plus a fingerprint of sampled values (so a freed-and-reused host buffer holding
//! other weights is uploaded again, never mistaken for the old one), in a least-recently-used
//! cache bounded in bytes (by default 90% of the memory free when the backend is created), so
//! weights of instances that scaled to zero leave the device as new ones arrive.
//!
//! This is the parity path (f32 weights give the CPU engine's expert ids exactly) and what
//! `--device cuda` runs today. Activations cross PCIe at every operation, so decode speed is
//! bounded by launch and copy latency; the device-resident path is
//! [`super::experts::DeviceExpertLayer`].
//!
//! The trait's operations are infallible: a CUDA failure after [`Gpu::open`] succeeded (device
//! lost, out of memory) panics with the driver's message.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{dptr, elementwise_cfg, CudaError, GemmTypes, Gpu};
use crate::backend::{AttentionShape, Backend, CpuBackend};
use crate::kv_cache::KvView;
use crate::lru::LruBytes;
use crate::tensor::Tensor;
use crate::weight::Weight;

enum DeviceWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DeviceWeight {
    fn bytes(&self) -> usize {
        match self {
            DeviceWeight::F32(s) => s.len() * 4,
            DeviceWeight::Bf16(s) => s.len() * 2,
        }
    }
}

type Key = (usize, usize, u64);

pub struct CudaBackend {
    gpu: Arc<Gpu>,
    /// (host address, length, fingerprint) -> device copy.
    weights: Mutex<LruBytes<Key, Arc<DeviceWeight>>>,
    max_shared_bytes: usize,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.gpu.info.name)
    }
}

/// Up to 64 sampled values and the length.
fn fingerprint<T: Copy + Into<f64>>(data: &[T]) -> u64 {
    let step = (data.len() / 64).max(1);
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ data.len() as u64;
    for v in data.iter().step_by(step).take(64) {
        h = (h ^ (*v).into().to_bits()).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fail(op: &str, e: impl std::fmt::Display) -> ! {
    panic!("CUDA backend: {op} failed: {e}")
}

impl CudaBackend {
    pub fn new(gpu: Arc<Gpu>) -> Result<Self, CudaError> {
        let max_shared_bytes = gpu
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        gpu.ctx.bind_to_thread()?;
        let free = cudarc::driver::result::mem_get_info()?.0;
        Ok(Self::with_weight_budget(gpu, free / 10 * 9, max_shared_bytes))
    }

    fn with_weight_budget(gpu: Arc<Gpu>, budget: usize, max_shared_bytes: usize) -> Self {
        Self {
            gpu,
            weights: Mutex::new(LruBytes::new(budget)),
            max_shared_bytes,
        }
    }

    /// As [`CudaBackend::new`] with at most `budget` bytes of weights resident.
    pub fn with_budget(gpu: Arc<Gpu>, budget: usize) -> Result<Self, CudaError> {
        let b = Self::new(gpu)?;
        Ok(Self::with_weight_budget(b.gpu, budget, b.max_shared_bytes))
    }

    /// Opens device `ordinal` and wraps it.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        Self::new(Gpu::open(ordinal)?)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes of weights now resident on the device (cached; in-flight operations may hold
    /// evicted ones a moment longer).
    pub fn resident_weight_bytes(&self) -> usize {
        self.weights.lock().unwrap_or_else(|p| p.into_inner()).used_bytes()
    }

    /// Looks up or uploads one weight.
    fn cached(
        &self,
        key: Key,
        bytes: usize,
        upload: impl FnOnce() -> Result<DeviceWeight, CudaError>,
    ) -> Result<Arc<DeviceWeight>, CudaError> {
        let mut cache = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = cache.get(&key) {
            return Ok(w);
        }
        // Free least recently used weights first, so the upload has the room.
        cache.make_room(bytes);
        let dw = Arc::new(upload()?);
        debug_assert_eq!(dw.bytes(), bytes);
        cache.insert(key, dw.clone(), bytes);
        Ok(dw)
    }

    fn device_weight(&self, w: &Weight) -> Result<Arc<DeviceWeight>, CudaError> {
        let s = &self.gpu.stream;
        match w {
            Weight::F32(t) => {
                let key = (t.data().as_ptr() as usize, t.len(), fingerprint(t.data()));
                self.cached(key, t.len() * 4, || Ok(DeviceWeight::F32(s.clone_htod(t.data())?)))
            }
            Weight::Bf16 { data, .. } => {
                let key = (data.as_ptr() as usize, data.len(), fingerprint(data));
                self.cached(key, data.len() * 2, || {
                    Ok(DeviceWeight::Bf16(s.clone_htod(data.as_slice())?))
                })
            }
        }
    }

    /// Norm weights and biases: the same cache, as f32.
    fn device_vector(&self, t: &Tensor) -> Result<Arc<DeviceWeight>, CudaError> {
        let s = &self.gpu.stream;
        let key = (t.data().as_ptr() as usize, t.len(), fingerprint(t.data()));
        self.cached(key, t.len() * 4, || Ok(DeviceWeight::F32(s.clone_htod(t.data())?)))
    }

    fn f32_of(w: &DeviceWeight) -> &CudaSlice<f32> {
        match w {
            DeviceWeight::F32(s) => s,
            DeviceWeight::Bf16(_) => unreachable!("vectors are cached as f32"),
        }
    }

    /// `y[n, out] = x @ w^T` with `x` already on the device as f32; a bf16 weight converts `x`
    /// to bf16 once (kept in `xb` for further products of the same input).
    fn linear_dev(
        &self,
        xd: &CudaSlice<f32>,
        xb: &mut Option<CudaSlice<u16>>,
        n: usize,
        inp: usize,
        w: &DeviceWeight,
        out: usize,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let s = &self.gpu.stream;
        // SAFETY: the GEMM (beta = 0) writes every element of y.
        let y = unsafe { s.alloc::<f32>((n * out).max(1))? };
        match w {
            DeviceWeight::F32(wd) => {
                // SAFETY: wd is [out, inp], xd [n, inp], y [n, out], all f32.
                unsafe {
                    self.gpu
                        .gemm_xwt(n, inp, out, dptr(wd, s), dptr(xd, s), dptr(&y, s), GemmTypes::F32, 0.0)?
                };
            }
            DeviceWeight::Bf16(wd) => {
                if xb.is_none() {
                    // SAFETY: the conversion writes every element.
                    let mut b = unsafe { s.alloc::<u16>((n * inp).max(1))? };
                    let len = (n * inp) as i64;
                    // SAFETY: f32_to_bf16_kernel(const float*, bf16*, long long).
                    unsafe {
                        s.launch_builder(self.gpu.func("f32_to_bf16_kernel"))
                            .arg(xd)
                            .arg(&mut b)
                            .arg(&len)
                            .launch(elementwise_cfg(n * inp))?;
                    }
                    *xb = Some(b);
                }
                let b = xb.as_ref().expect("converted above");
                // SAFETY: wd is [out, inp] bf16, b [n, inp] bf16, y [n, out] f32.
                unsafe {
                    self.gpu.gemm_xwt(
                        n,
                        inp,
                        out,
                        dptr(wd, s),
                        dptr(b, s),
                        dptr(&y, s),
                        GemmTypes::BF16_TO_F32,
                        0.0,
                    )?
                };
            }
        }
        Ok(y)
    }

    fn try_linear(&self, x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Result<Tensor, CudaError> {
        let (n, inp, out) = (x.rows(), x.cols(), w.rows());
        if w.cols() != inp {
            return Err(CudaError::Shape(format!(
                "linear: weight {w:?} vs input {:?}",
                x.shape()
            )));
        }
        let dw = self.device_weight(w)?;
        let bias = bias.map(|b| self.device_vector(b)).transpose()?;
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let xd = s.clone_htod(x.data())?;
        let mut y = self.linear_dev(&xd, &mut None, n, inp, &dw, out)?;
        if let Some(b) = &bias {
            let (rows, cols) = (n as i32, out as i32);
            // SAFETY: add_bias_f32(float* y, const float* bias, int rows, int cols).
            unsafe {
                s.launch_builder(self.gpu.func("add_bias_f32"))
                    .arg(&mut y)
                    .arg(Self::f32_of(b))
                    .arg(&rows)
                    .arg(&cols)
                    .launch(elementwise_cfg(n * out))?;
            }
        }
        let mut o = s.clone_dtoh(&y)?;
        o.truncate(n * out);
        Ok(Tensor::matrix(n, out, o))
    }

    /// The whole SwiGLU FFN on the device: one upload, three GEMMs, one download.
    fn try_swiglu_ffn(&self, x: &Tensor, gate: &Weight, up: &Weight, down: &Weight) -> Result<Tensor, CudaError> {
        let (n, h, i) = (x.rows(), x.cols(), gate.rows());
        if gate.cols() != h || up.cols() != h || up.rows() != i || down.cols() != i {
            return Err(CudaError::Shape(format!(
                "swiglu_ffn: x {:?}, gate {gate:?}, up {up:?}, down {down:?}",
                x.shape()
            )));
        }
        let out = down.rows();
        let (dg, du, dd) = (
            self.device_weight(gate)?,
            self.device_weight(up)?,
            self.device_weight(down)?,
        );
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let xd = s.clone_htod(x.data())?;
        let mut xb = None;
        let g = self.linear_dev(&xd, &mut xb, n, h, &dg, i)?;
        let u = self.linear_dev(&xd, &mut xb, n, h, &du, i)?;
        // SAFETY: silu_mul_f32 writes every element.
        let mut a = unsafe { s.alloc::<f32>((n * i).max(1))? };
        let len = (n * i) as i64;
        // SAFETY: silu_mul_f32(g, u, y, n).
        unsafe {
            s.launch_builder(self.gpu.func("silu_mul_f32"))
                .arg(&g)
                .arg(&u)
                .arg(&mut a)
                .arg(&len)
                .launch(elementwise_cfg(n * i))?;
        }
        let y = self.linear_dev(&a, &mut None, n, i, &dd, out)?;
        let mut o = s.clone_dtoh(&y)?;
        o.truncate(n * out);
        Ok(Tensor::matrix(n, out, o))
    }

    fn row_cfg(rows: usize, cols: usize) -> LaunchConfig {
        let threads = cols.next_multiple_of(32).clamp(32, 1024) as u32;
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn try_norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f32) -> Result<Tensor, CudaError> {
        let (rows, cols) = (x.rows(), x.cols());
        if rows == 0 {
            return Ok(x.clone());
        }
        let wd = self.device_vector(w)?;
        let bd = b.map(|b| self.device_vector(b)).transpose()?;
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let xd = s.clone_htod(x.data())?;
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { s.alloc::<f32>(rows * cols)? };
        let c = cols as i32;
        // SAFETY: (layer|rms)_norm_f32(x, w, [b,] y, cols, eps), one block per row.
        unsafe {
            match &bd {
                None => s
                    .launch_builder(self.gpu.func("rms_norm_f32"))
                    .arg(&xd)
                    .arg(Self::f32_of(&wd))
                    .arg(&mut y)
                    .arg(&c)
                    .arg(&eps)
                    .launch(Self::row_cfg(rows, cols))?,
                Some(bd) => s
                    .launch_builder(self.gpu.func("layer_norm_f32"))
                    .arg(&xd)
                    .arg(Self::f32_of(&wd))
                    .arg(Self::f32_of(bd))
                    .arg(&mut y)
                    .arg(&c)
                    .arg(&eps)
                    .launch(Self::row_cfg(rows, cols))?,
            };
        }
        Ok(Tensor::new(x.shape().to_vec(), s.clone_dtoh(&y)?).expect("same shape"))
    }

    fn try_gated(&self, gate: &Tensor, up: &Tensor, clamp: Option<(f32, f32)>) -> Result<Tensor, CudaError> {
        if gate.shape() != up.shape() {
            return Err(CudaError::Shape(format!(
                "gate {:?} vs up {:?}",
                gate.shape(),
                up.shape()
            )));
        }
        let n = gate.len();
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let gd = s.clone_htod(gate.data())?;
        let ud = s.clone_htod(up.data())?;
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { s.alloc::<f32>(n.max(1))? };
        let len = n as i64;
        // SAFETY: silu_mul_f32(g, u, y, n) / clamped_swiglu_f32(g, u, y, n, limit, alpha).
        unsafe {
            match clamp {
                None => s
                    .launch_builder(self.gpu.func("silu_mul_f32"))
                    .arg(&gd)
                    .arg(&ud)
                    .arg(&mut y)
                    .arg(&len)
                    .launch(elementwise_cfg(n))?,
                Some((limit, alpha)) => s
                    .launch_builder(self.gpu.func("clamped_swiglu_f32"))
                    .arg(&gd)
                    .arg(&ud)
                    .arg(&mut y)
                    .arg(&len)
                    .arg(&limit)
                    .arg(&alpha)
                    .launch(elementwise_cfg(n))?,
            };
        }
        let mut out = s.clone_dtoh(&y)?;
        out.truncate(n);
        Ok(Tensor::new(gate.shape().to_vec(), out).expect("same shape"))
    }

    fn try_attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        q_start: usize,
        sinks: Option<&[f32]>,
        sh: &AttentionShape,
    ) -> Result<Option<Tensor>, CudaError> {
        let t = q.len() / (sh.heads * sh.qk_dim);
        let positions = q_start + t;
        let shared = positions * 4;
        if shared > self.max_shared_bytes {
            return Ok(None);
        }
        let _g = self.gpu.exclusive();
        let s = &self.gpu.stream;
        let f = self.gpu.func("attention_f32");
        if shared > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )?;
        }
        let qd = s.clone_htod(q)?;
        let kd = s.clone_htod(k)?;
        let vd = s.clone_htod(v)?;
        let sinks_d = sinks.map(|x| s.clone_htod(x)).transpose()?;
        // SAFETY: every (query, head) block writes its v_dim outputs.
        let mut out = unsafe { s.alloc::<f32>((t * sh.heads * sh.v_dim).max(1))? };
        let (heads, kvh, qk, vdim, qs) = (
            sh.heads as i32,
            sh.kv_heads as i32,
            sh.qk_dim as i32,
            sh.v_dim as i32,
            q_start as i32,
        );
        let window = sh.window.unwrap_or(0) as i32;
        let null: u64 = 0;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, sh.heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: attention_f32(q, k, v, out, heads, kv_heads, qk_dim, v_dim, q_start, scale,
        // window, sinks) with the shapes documented in the kernel; sinks is null or [heads].
        unsafe {
            let mut b = s.launch_builder(f);
            b.arg(&qd)
                .arg(&kd)
                .arg(&vd)
                .arg(&mut out)
                .arg(&heads)
                .arg(&kvh)
                .arg(&qk)
                .arg(&vdim)
                .arg(&qs)
                .arg(&sh.scale)
                .arg(&window);
            match &sinks_d {
                Some(sd) => b.arg(sd),
                None => b.arg(&null),
            };
            b.launch(cfg)?;
        }
        let mut o = s.clone_dtoh(&out)?;
        o.truncate(t * sh.heads * sh.v_dim);
        Ok(Some(Tensor::matrix(t, sh.heads * sh.v_dim, o)))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn linear(&self, x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Tensor {
        if x.rows() == 0 || w.rows() == 0 {
            return Tensor::matrix(x.rows(), w.rows(), vec![0.0; x.rows() * w.rows()]);
        }
        self.try_linear(x, w, bias).unwrap_or_else(|e| fail("linear", e))
    }

    fn swiglu_ffn(&self, x: &Tensor, gate: &Weight, up: &Weight, down: &Weight) -> Tensor {
        if x.rows() == 0 {
            return Tensor::matrix(0, down.rows(), Vec::new());
        }
        self.try_swiglu_ffn(x, gate, up, down)
            .unwrap_or_else(|e| fail("swiglu_ffn", e))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
        self.try_norm(x, w, None, eps).unwrap_or_else(|e| fail("rms_norm", e))
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
        self.try_norm(x, w, Some(b), eps)
            .unwrap_or_else(|e| fail("layer_norm", e))
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        self.try_gated(gate, up, None).unwrap_or_else(|e| fail("silu_mul", e))
    }

    fn clamped_swiglu(&self, gate: &Tensor, up: &Tensor, limit: f32, alpha: f32) -> Tensor {
        self.try_gated(gate, up, Some((limit, alpha)))
            .unwrap_or_else(|e| fail("clamped_swiglu", e))
    }

    fn attention(
        &self,
        q: &[f32],
        kv: &KvView<'_>,
        q_start: usize,
        sinks: Option<&[f32]>,
        shape: &AttentionShape,
    ) -> Tensor {
        // The kernel reads contiguous keys and values: a paged cache is gathered on the host
        // through its block table before the upload (the cache itself lives in host memory).
        let (k, v) = kv.contiguous_kv();
        match self.try_attention(q, &k, &v, q_start, sinks, shape) {
            Ok(Some(t)) => t,
            // Longer than one block's shared memory holds: the host computes it.
            Ok(None) => CpuBackend.attention(q, kv, q_start, sinks, shape),
            Err(e) => fail("attention", e),
        }
    }
}
