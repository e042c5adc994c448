//! Choosing where the engine's tensor math runs: `--device auto|cpu|cuda|cuda:N`.
//!
//! `auto` uses GPU 0 when the CUDA data plane is compiled in and a driver, cuBLAS and NVRTC
//! can be loaded, and the CPU otherwise; the returned description says which and why, so a
//! command can print it. `cuda` fails with the reason instead of falling back.

use std::sync::Arc;

use crate::backend::{Backend, CpuBackend};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?} (auto, cpu, cuda, cuda:N)")]
    Unknown(String),
    #[error("--device {spec}: {reason}")]
    Unavailable { spec: String, reason: String },
}

/// A backend and a line saying what it is.
pub struct Selected {
    pub backend: Arc<dyn Backend>,
    pub description: String,
}

fn parse(spec: &str) -> Result<Option<Option<usize>>, DeviceError> {
    // None: cpu; Some(None): auto; Some(Some(n)): cuda:n
    match spec {
        "cpu" => Ok(None),
        "auto" => Ok(Some(None)),
        "cuda" | "gpu" => Ok(Some(Some(0))),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(Some(n))),
            _ => Err(DeviceError::Unknown(spec.to_string())),
        },
    }
}

pub fn select(spec: &str) -> Result<Selected, DeviceError> {
    let cpu = |why: String| Selected {
        backend: Arc::new(CpuBackend),
        description: format!("CPU ({why})"),
    };
    match parse(spec)? {
        None => Ok(cpu("--device cpu".into())),
        Some(ordinal) => match open_cuda(ordinal.unwrap_or(0)) {
            Ok(s) => Ok(s),
            Err(reason) if ordinal.is_none() => Ok(cpu(reason)),
            Err(reason) => Err(DeviceError::Unavailable {
                spec: spec.to_string(),
                reason,
            }),
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Selected, String> {
    let be = crate::cuda::backend::CudaBackend::open(ordinal).map_err(|e| e.to_string())?;
    let i = &be.gpu().info;
    let description = format!(
        "CUDA device {} ({}, sm_{}{}, {} GiB)",
        i.ordinal,
        i.name,
        i.compute_capability.0,
        i.compute_capability.1,
        i.memory_bytes >> 30
    );
    Ok(Selected {
        backend: Arc::new(be),
        description,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Selected, String> {
    Err("built without the `cuda` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_typed_errors() {
        assert_eq!(parse("cpu").unwrap(), None);
        assert_eq!(parse("auto").unwrap(), Some(None));
        assert_eq!(parse("cuda").unwrap(), Some(Some(0)));
        assert_eq!(parse("cuda:3").unwrap(), Some(Some(3)));
        assert!(matches!(parse("cuda:x"), Err(DeviceError::Unknown(_))));
        assert!(matches!(parse("tpu"), Err(DeviceError::Unknown(_))));
    }

    #[test]
    fn cpu_is_always_available_and_says_so() {
        let s = select("cpu").unwrap();
        assert_eq!(s.backend.name(), "cpu");
        assert!(s.description.starts_with("CPU"));
    }

    #[test]
    fn auto_falls_back_to_the_cpu_with_a_reason_and_cuda_does_not() {
        let s = select("auto").unwrap();
        if s.backend.name() == "cpu" {
            assert!(s.description.starts_with("CPU ("), "{}", s.description);
            // Where auto fell back, an explicit cuda request must fail, not fall back.
            assert!(matches!(select("cuda"), Err(DeviceError::Unavailable { .. })));
        } else {
            assert_eq!(s.backend.name(), "cuda");
        }
    }
}
