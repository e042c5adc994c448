//! CUDA C sources of the GPU data plane, and their compilation at run time with NVRTC.
//!
//! The sources live in `kernels/cuda/*.cu`; each is compiled with [`COMMON`] (bf16 helpers and
//! block reductions) prepended, so NVRTC needs no include path and no CUDA header. Nothing here
//! launches a kernel: the data plane (`data-plane/src/cuda/`) loads the PTX into a context and
//! calls the entry points by the names listed in [`SOURCES`].
//!
//! With the `nvrtc` feature, [`compile`] turns a source into PTX for one compute capability,
//! caching the result in memory (per process) and on disk (per device architecture and source
//! hash), so a worker pays the NVRTC cost once per machine. Building needs no CUDA toolkit:
//! `libnvrtc` is loaded when first used, and [`nvrtc_available`] says whether it can be.

/// Helpers prepended to every source.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// One compilation unit and the `extern "C"` entry points it defines.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

/// Every kernel source of the data plane.
pub const SOURCES: &[Source] = &[
    Source {
        name: "activation",
        code: include_str!("../cuda/activation.cu"),
        kernels: &[
            "silu_mul_f32",
            "clamped_swiglu_f32",
            "swiglu_bf16",
            "f32_to_bf16_kernel",
            "bf16_to_f32_kernel",
            "add_bias_f32",
        ],
    },
    Source {
        name: "norm",
        code: include_str!("../cuda/norm.cu"),
        kernels: &["rms_norm_f32", "layer_norm_f32", "rms_norm_bf16"],
    },
    Source {
        name: "rope",
        code: include_str!("../cuda/rope.cu"),
        kernels: &["rope_f32"],
    },
    Source {
        name: "router",
        code: include_str!("../cuda/router.cu"),
        kernels: &["topk_softmax_f32", "topk_sigmoid_group_f32"],
    },
    Source {
        name: "dispatch",
        code: include_str!("../cuda/dispatch.cu"),
        kernels: &["permute_rows_bf16", "unpermute_combine_bf16", "unpermute_combine_f32"],
    },
    Source {
        name: "attention",
        code: include_str!("../cuda/attention.cu"),
        kernels: &["attention_f32"],
    },
];

/// The source by name.
pub fn source(name: &str) -> Option<&'static Source> {
    SOURCES.iter().find(|s| s.name == name)
}

impl Source {
    /// What NVRTC compiles: [`COMMON`] followed by this source.
    pub fn full_text(&self) -> String {
        format!("{COMMON}\n// ---- {}.cu ----\n{}", self.name, self.code)
    }

    /// FNV-1a of the full text: the disk cache key, so an edited source never meets stale PTX.
    pub fn hash(&self) -> u64 {
        self.full_text().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("libnvrtc could not be loaded (install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its lib folder on LD_LIBRARY_PATH)")]
    NvrtcMissing,
    #[error("no kernel source named {0:?}")]
    UnknownSource(String),
    #[error("NVRTC failed to compile {source_name}.cu for {arch}: {log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
}

#[cfg(feature = "nvrtc")]
mod compile;
#[cfg(feature = "nvrtc")]
pub use compile::{compile, nvrtc_available, Compiled};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_source() {
        for s in SOURCES {
            for k in s.kernels {
                let decl = format!("__global__ void {k}(");
                assert!(s.code.contains(&decl), "{}.cu does not define {k}", s.name);
            }
            // and every entry point of the source is listed (so none is silently unreachable)
            let defined = s.code.matches("extern \"C\" __global__ void ").count();
            assert_eq!(defined, s.kernels.len(), "{}.cu: listed {:?}", s.name, s.kernels);
        }
    }

    #[test]
    fn the_hash_changes_with_the_text() {
        let a = SOURCES[0];
        let mut b = a;
        b.code = "extern \"C\" __global__ void x() {}";
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), SOURCES[0].hash());
    }
}
