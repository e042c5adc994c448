#!/bin/bash
# Held-out tuning of the temporal predictor (docs/PERFORMANCE.md, "Predictors: held-out tuning").
set -euo pipefail
M=${MOELESS:-moeless}
T=${1:?usage: $0 LLAMA4_TRACE OUT_DIR}
OUT=${2:?usage: $0 LLAMA4_TRACE OUT_DIR}
mkdir -p "$OUT"
echo "split decay history balancedness fractional"
for split in first-half second-half; do
  for d in 0.5 0.7 0.8 0.9 0.95 0.99; do
    for h in 0 0.1 0.2 0.3 0.4 0.5 0.7 1; do
      f="$OUT/$split-d$d-h$h.json"
      "$M" replay --trace "$T" --gpus 8 --batch 64 --phase decode --policy moeless --slots-per-gpu 18 \
        --split "$split" --temporal-decay "$d" --temporal-history "$h" --out "$f" 2>/dev/null
      python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['policies'][0]; print(sys.argv[2], sys.argv[3], sys.argv[4], round(p['balancedness_mean'],4), round(p['balancedness_fractional'],4))" "$f" "$split" "$d" "$h"
    done
  done
done
