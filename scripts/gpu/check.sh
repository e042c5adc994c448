#!/usr/bin/env bash
# The GPU checks of issue 9, on a machine with an NVIDIA GPU, PyTorch and transformers, from the
# repository root: scripts/gpu/check.sh [PREPARED_DIR] [OUT_DIR]. PREPARED_DIR is what
# scripts/gpu/prepare.sh made (default .gpu); OUT_DIR gets results.tgz (every log and JSON)
# and summary.txt. RUNS (default 3) repeats the GPU and PyTorch benchmarks; SKIP_ENGINE=1 skips
# the decode comparison.
set -uo pipefail
cd "$(dirname "$0")/../.."
P="${1:-.gpu}"
FINAL="${2:-gpu-results}"
RUNS="${RUNS:-3}"
OUT=/tmp/moeless-gpu/out
mkdir -p "$FINAL" "$OUT" /tmp/moeless-gpu/bin /tmp/moeless-gpu/lib
for f in "$P"/*.gz; do gunzip -c "$f" > "/tmp/moeless-gpu/bin/$(basename "$f" .gz)"; done
chmod +x /tmp/moeless-gpu/bin/*
B=/tmp/moeless-gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/summary.txt"

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
for run in $(seq 1 "$RUNS"); do
  step "moeless bench gpu, run $run"
  timeout 240 $B/moeless bench gpu --out "$OUT/gpu.$run.json" 2>&1 | tee "$OUT/bench_gpu.$run.log" | grep -v '^\[' || status=1
  step "PyTorch on the same shapes and weights, run $run"
  PYTHONUNBUFFERED=1 timeout 240 python3 scripts/gpu/torch_expert_bench.py --ours "$OUT/gpu.$run.json" --out "$OUT/torch.$run.json" 2>&1 \
    | tee "$OUT/torch.$run.log" | grep -v '^{' || status=1
done
if [ "${SKIP_ENGINE:-0}" != 1 ]; then
  # name: engine shape flags (Mixtral-shaped: 8 experts, top-2, GQA)
  for shape in "h1024-l8:--hidden 1024 --ffn 3584 --layers 8 --heads 16 --kv-heads 4" \
               "h4096-l2:--hidden 4096 --ffn 14336 --layers 2 --heads 32 --kv-heads 8"; do
    name=${shape%%:*}; flags=${shape#*:}
    step "decode b=1 ($name): moeless bench engine --device cuda vs transformers on the same checkpoint"
    EARGS="$flags --experts 8 --vocab 32000 --dtypes bf16 --batches 1 --decode-steps 16 --repeats 3 --no-peer --dir /tmp/moeless-gpu/models/$name"
    timeout 300 $B/moeless bench engine --device cuda $EARGS --out "$OUT/engine_cuda.$name.json" 2>&1 | tee "$OUT/engine_cuda.$name.log" | grep '^|' || status=1
    ck=$(ls -d /tmp/moeless-gpu/models/$name/mixtral-* | head -1)
    PYTHONUNBUFFERED=1 timeout 240 python3 scripts/gpu/hf_decode_bench.py --checkpoint "$ck" --prompt-len 16 --steps 16 --repeats 5 --out "$OUT/hf_decode.$name.json" 2>&1 \
      | tail -1 | tee "$OUT/hf_decode.$name.log" || status=1
    rm -rf "/tmp/moeless-gpu/models/$name"
  done
fi
step "the CLI picks the GPU by itself (--device auto)"
timeout 60 $B/moeless generate --model "$P/shared/golden/mixtral" --prompts "$P/shared/golden/mixtral/prompts.json" \
  --max-new-tokens 12 --out "$OUT/generate_auto.json" 2>&1 | grep -E '^device' | tee -a "$OUT/summary.txt" || status=1
step "expert instances on GPU workers: generate --workers 2 --device cuda gives the CPU's tokens"
G="$P/shared/golden/mixtral"
timeout 120 $B/moeless generate --model "$G" --prompts "$G/prompts.json" --max-new-tokens 12 --device cpu \
  --out "$OUT/generate_cpu.json" > "$OUT/generate_cpu.log" 2>&1 || status=1
MOELESS_KEEP_CLUSTER_DIR=1 TMPDIR=/tmp/moeless-gpu timeout 180 $B/moeless generate --model "$G" --prompts "$G/prompts.json" \
  --max-new-tokens 12 --workers 2 --device cuda --out "$OUT/generate_gpu_workers.json" > "$OUT/generate_gpu_workers.log" 2>&1 || status=1
grep -h '^device' /tmp/moeless-gpu/moeless-cluster*/worker-*.log | sort | uniq -c | tee -a "$OUT/summary.txt"
python3 -c "import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); print('same tokens' if a==b else 'DIFFERENT'); sys.exit(a!=b)" \
  "$OUT/generate_cpu.json" "$OUT/generate_gpu_workers.json" 2>&1 | tee -a "$OUT/summary.txt" || status=1
[ "$RUNS" -gt 0 ] && python3 scripts/gpu/plot.py "$OUT/expert_ffn_tflops.svg" "$OUT"/gpu.*.json -- "$OUT"/torch.*.json
step "exit $status"
tar czf "$FINAL/results.tgz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
exit $status
