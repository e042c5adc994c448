#!/usr/bin/env bash
# The GPU checks of issue 9, on a machine with an NVIDIA GPU, PyTorch and transformers, from the
# repository root: scripts/gpu/check.sh [PREPARED_DIR] [OUT_DIR]. PREPARED_DIR is what
# scripts/gpu/prepare.sh made (default .gpu); results and logs go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
P="${1:-.gpu}"
OUT="${2:-gpu-results}"
mkdir -p "$OUT" /tmp/moeless-gpu/bin /tmp/moeless-gpu/lib
for f in "$P"/*.gz; do gunzip -c "$f" > "/tmp/moeless-gpu/bin/$(basename "$f" .gz)"; done
chmod +x /tmp/moeless-gpu/bin/*
B=/tmp/moeless-gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"

# cuBLAS, NVRTC and NCCL from the CUDA toolkit or the Python wheels. NCCL ships as
# libnccl.so.2, a name cudarc's loader does not try: give it an unversioned link.
libdirs=$(find /usr/local /opt /usr/lib -xdev \( -name 'libcublas.so*' -o -name 'libnvrtc.so*' -o -name 'libnccl.so*' \) 2>/dev/null \
  | grep -v -e stubs -e '\.alt\.' | xargs -r -n1 dirname | sort -u | tr '\n' ':')
nccl=$(find /usr/local /opt /usr/lib -xdev -name 'libnccl.so.2' 2>/dev/null | head -1)
[ -n "$nccl" ] && ln -sf "$nccl" /tmp/moeless-gpu/lib/libnccl.so
export LD_LIBRARY_PATH="/tmp/moeless-gpu/lib:${libdirs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/env.txt"
export MOELESS_KERNEL_CACHE=/tmp/moeless-gpu/kernels MOELESS_SHARED_DIR="$P/shared" MOELESS_REQUIRE_CUDA=1 MOELESS_REQUIRE_NVRTC=1
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }

step "kernels compile with NVRTC"
timeout 120 $B/t01_nvrtc --test-threads=1 2>&1 | tee "$OUT/t01_nvrtc.log" | tail -3 || status=1
step "CUDA parity tests (golden models, kernels, expert layer, cold start, NCCL)"
timeout 300 $B/t05_cuda --test-threads=1 --nocapture 2>&1 | tee "$OUT/t05_cuda.log" | grep -E "^test |test result|panicked|verified|matches" || status=1
step "moeless bench gpu"
timeout 240 $B/moeless bench gpu --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
step "PyTorch on the same shapes and weights"
PYTHONUNBUFFERED=1 timeout 240 python3 scripts/gpu/torch_expert_bench.py --ours "$OUT/gpu.json" --out "$OUT/torch.json" 2>&1 \
  | tee "$OUT/torch.log" | grep -v '^{' || status=1
if [ "${SKIP_ENGINE:-0}" != 1 ]; then
  step "decode step: moeless bench engine --device cuda vs transformers on the same checkpoint"
  EARGS="--hidden 1024 --ffn 3584 --layers 8 --experts 8 --vocab 32000 --heads 16 --kv-heads 4 --dtypes bf16 --batches 1 --decode-steps 16 --repeats 3 --no-peer --dir /tmp/moeless-gpu/models"
  timeout 300 $B/moeless bench engine --device cuda $EARGS --out "$OUT/engine_cuda.json" 2>&1 | tee "$OUT/engine_cuda.log" | grep -v '^\[' || status=1
  ck=$(ls -d /tmp/moeless-gpu/models/mixtral-* | head -1)
  PYTHONUNBUFFERED=1 timeout 240 python3 scripts/gpu/hf_decode_bench.py --checkpoint "$ck" --prompt-len 16 --steps 16 --out "$OUT/hf_decode.json" 2>&1 \
    | tail -3 | tee "$OUT/hf_decode.log" || status=1
fi
step "exit $status"
exit $status
