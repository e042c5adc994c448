#!/usr/bin/env python3
"""Relative difference of `moeless sim` reports against a reference run, per policy.

    python3 scripts/sim_compare_reports.py EXACT OTHER [OTHER ...]

Each argument is a `report.json` or the `--out` directory holding one. Prints one markdown
table per OTHER (metric rows, policy columns: OTHER / EXACT - 1) and both runs' wall times.
Used for the layer-sampling check in docs/PERFORMANCE.md (issue 4, "Speed").
"""
import json
import os
import sys

METRICS = [
    ("e2e mean", lambda p: p["e2e_s"]["mean"]),
    ("e2e p99", lambda p: p["e2e_s"]["p99"]),
    ("TTFT p50", lambda p: p["ttft_s"]["p50"]),
    ("TPOT mean", lambda p: p["tpot_s"]["mean"]),
    ("MoE-layer mean", lambda p: p["moe_layer_time_mean_s"]),
    ("MoE-layer p99", lambda p: p["moe_layer_time_p99_s"]),
    ("GPU-mem GB-s", lambda p: p["cost_gpu_mem_gb_s"]),
    ("balancedness", lambda p: p["balancedness_mean"]),
    ("cold starts", lambda p: p["cold_starts"]),
]


def load(path):
    if os.path.isdir(path):
        path = os.path.join(path, "report.json")
    with open(path) as f:
        return json.load(f)


def rel(a, b):
    if b == 0:
        return "0" if a == 0 else "n/a"
    return "%+.1f%%" % (100.0 * (a / b - 1.0))


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    base = load(argv[1])
    by_policy = {p["policy"]: p for p in base["policies"]}
    for other in argv[2:]:
        r = load(other)
        print(f"{other}: wall {r['wall_s']:.1f} s (reference {base['wall_s']:.1f} s)")
        names = [p["policy"] for p in r["policies"] if p["policy"] in by_policy]
        print("| metric | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for name, f in METRICS:
            cells = [rel(f(p), f(by_policy[p["policy"]])) for p in r["policies"] if p["policy"] in by_policy]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv)
