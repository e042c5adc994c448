//! Every kernel source compiles to PTX with NVRTC for Ampere and Hopper, defines each listed
//! entry point, and is served from the disk cache the second time. Runs on machines without a
//! GPU: only libnvrtc is needed (CI installs the nvidia-cuda-nvrtc wheel and sets
//! MOELESS_REQUIRE_NVRTC=1, so there a missing library fails instead of skipping).

#![cfg(feature = "nvrtc")]

use kernels::{compile, nvrtc_available, KernelError, Source, SOURCES};

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    assert!(
        std::env::var("MOELESS_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "MOELESS_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (LD_LIBRARY_PATH={:?})",
        std::env::var("LD_LIBRARY_PATH")
    );
    eprintln!("skipped: libnvrtc not found");
    false
}

#[test]
fn every_source_compiles_for_ampere_and_hopper_and_is_cached() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // This test binary's only test that compiles real sources: the variable is set before use.
    std::env::set_var("MOELESS_KERNEL_CACHE", dir.path());
    for (major, minor) in [(8, 0), (9, 0)] {
        for s in SOURCES {
            let c = compile(s, major, minor).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.cached, "{} compiled fresh", s.name);
            assert!(
                c.ptx.contains(&format!(".target sm_{major}{minor}")),
                "{}: {}",
                s.name,
                &c.ptx[..200]
            );
            for k in s.kernels {
                assert!(
                    c.ptx.contains(&format!(".entry {k}(")),
                    "{}.cu: no entry {k} in PTX",
                    s.name
                );
            }
        }
    }
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 2 * SOURCES.len());
    // A second compile is a memory hit; the disk copy is what a new process would use.
    assert!(compile(&SOURCES[0], 9, 0).unwrap().cached);
}

#[test]
fn a_broken_source_is_a_typed_error_with_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken: &'static Source = Box::leak(Box::new(Source {
        name: "broken",
        code: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        kernels: &["broken"],
    }));
    match compile(broken, 9, 0) {
        Err(KernelError::Compile { source_name, log, .. }) => {
            assert_eq!(source_name, "broken");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
