//! Compiles `proto/*.proto` with a vendored `protoc`, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC from the environment; build scripts are single-threaded.
    std::env::set_var("PROTOC", protoc);
    let files = ["proto/raft.proto", "proto/worker.proto", "proto/engine.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &["proto"])?;
    Ok(())
}
