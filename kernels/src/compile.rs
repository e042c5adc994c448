//! NVRTC compilation with a memory and a disk cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use crate::{KernelError, Source};

/// PTX of one source for one architecture.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub source: &'static Source,
    /// e.g. `compute_90`.
    pub arch: String,
    pub ptx: Arc<String>,
    /// Whether this call found it in a cache (memory or disk) rather than running NVRTC.
    pub cached: bool,
}

/// Whether `libnvrtc` can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

type Key = (&'static str, String, u64);

fn memory() -> &'static Mutex<HashMap<Key, Arc<String>>> {
    static M: OnceLock<Mutex<HashMap<Key, Arc<String>>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `$MOELESS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/moeless/kernels`, else `~/.cache/moeless/kernels`.
fn disk_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOELESS_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("moeless/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moeless/kernels"))
}

/// Compiles `source` to PTX for `compute_{major}{minor}`, from cache when possible. The disk
/// cache is best effort: a folder that cannot be read or written only costs a recompile.
pub fn compile(source: &'static Source, major: i32, minor: i32) -> Result<Compiled, KernelError> {
    let arch = format!("compute_{major}{minor}");
    let key: Key = (source.name, arch.clone(), source.hash());
    if let Some(ptx) = memory().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(Compiled {
            source,
            arch,
            ptx: ptx.clone(),
            cached: true,
        });
    }
    let file = disk_dir().map(|d| d.join(format!("{}-{}-{:016x}.ptx", source.name, arch, key.2)));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        if text.contains(".entry") {
            let ptx = Arc::new(text);
            memory()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, ptx.clone());
            return Ok(Compiled {
                source,
                arch,
                ptx,
                cached: true,
            });
        }
    }
    if !nvrtc_available() {
        return Err(KernelError::NvrtcMissing);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{}.cu", source.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source.full_text(), opts).map_err(|e| KernelError::Compile {
        source_name: source.name.to_string(),
        arch: arch.clone(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })?;
    let ptx = Arc::new(ptx.to_src());
    if let Some(f) = &file {
        if let Some(parent) = f.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // Write then rename so a concurrent reader never sees half a file.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.as_bytes()).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    memory()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, ptx.clone());
    Ok(Compiled {
        source,
        arch,
        ptx,
        cached: false,
    })
}
