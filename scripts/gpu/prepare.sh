#!/usr/bin/env bash
# Prepares what a GPU machine without a Rust toolchain needs to run scripts/gpu/check.sh:
# the moeless binary and the GPU test binaries (stripped, gzipped) and the golden reference
# data, in .gpu/ (ignored by git). Run from the repository root on the build machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${MOELESS_SHARED_DIR:-$(cd .. && pwd)/shared}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --locked
cargo test --locked -p data-plane --features cuda --test t05_cuda_matches_cpu --no-run
cargo test --locked -p kernels --features nvrtc --test t01_nvrtc_compiles_every_source --no-run
rm -rf .gpu && mkdir -p .gpu/shared
newest() { ls -t "$TARGET"/debug/deps/"$1"-* | grep -v '\.d$' | head -1; }
strip -o .gpu/moeless "$TARGET/debug/moeless"
strip -o .gpu/t05_cuda "$(newest t05_cuda_matches_cpu)"
strip -o .gpu/t01_nvrtc "$(newest t01_nvrtc_compiles_every_source)"
gzip -9 .gpu/moeless .gpu/t05_cuda .gpu/t01_nvrtc
cp -r "$SHARED/golden" .gpu/shared/
du -sh .gpu
