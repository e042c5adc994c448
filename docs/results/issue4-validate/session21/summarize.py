#!/usr/bin/env python3
"""Tables of docs/PERFORMANCE.md (session 21, `moeless sim-validate`) from the runs here.

Usage: python3 summarize.py [DIR]   (DIR holds x1-run1/validation.json ... x3-run3/)
"""
import json
import pathlib
import statistics
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
METRICS = [
    ("moe_layer_time_mean_s", "MoE-layer time, mean"),
    ("moe_layer_time_p99_s", "MoE-layer time, p99"),
    ("e2e_mean_s", "E2E, mean"),
    ("e2e_p50_s", "E2E, p50"),
    ("e2e_p90_s", "E2E, p90"),
    ("e2e_p99_s", "E2E, p99"),
    ("ttft_mean_s", "TTFT, mean"),
    ("tpot_mean_s", "TPOT, mean"),
]

for rate in (1, 3):
    runs = sorted(root.glob(f"x{rate}-run*/validation.json"))
    docs = [json.loads(p.read_text()) for p in runs]
    if not docs:
        continue
    n = docs[0]["workload"]["requests"]
    print(f"\n| metric (rate x{rate}, {n} requests) | real (ms) | simulated (ms) | error per run | median error |")
    print("|---|---|---|---|---|")
    for key, name in METRICS:
        real = statistics.median(d["metrics"][key]["real"] for d in docs) * 1e3
        sim = statistics.median(d["metrics"][key]["sim"] for d in docs) * 1e3
        errs = [d["metrics"][key]["error_pct"] for d in docs]
        per = " / ".join(f"{e:+.1f}%" for e in errs)
        print(f"| {name} | {real:.2f} | {sim:.2f} | {per} | {statistics.median(errs):+.1f}% |")
    print(f"\n| real MoE-layer calls (x{rate}), by token copies sent | calls | real mean (ms) | priced (ms) | error per run | median |")
    print("|---|---|---|---|---|---|")
    for g in range(4):
        rows = [d["real_calls_priced"][g] for d in docs]
        errs = [100 * (r["priced_mean_s"] / r["real_mean_s"] - 1) for r in rows if r["real_mean_s"] > 0]
        print(
            f"| {rows[0]['tokens']} | {statistics.median(r['calls'] for r in rows):.0f} "
            f"| {statistics.median(r['real_mean_s'] for r in rows) * 1e3:.2f} "
            f"| {statistics.median(r['priced_mean_s'] for r in rows) * 1e3:.2f} "
            f"| {' / '.join(f'{e:+.1f}%' for e in errs)} | {statistics.median(errs):+.1f}% |"
        )
    print(f"\n| replayed window (x{rate}, 'all' group) | in run (ms) | idle, back to back (ms) | idle, after 0.4 ms of engine work (ms) | priced (ms) |")
    print("|---|---|---|---|---|")
    for p, d in zip(runs, docs):
        r = d["real_calls_priced"][0]
        print(
            f"| {p.parent.name} | {r['replayed_in_run_mean_s'] * 1e3:.2f} | {r['replayed_idle_mean_s'] * 1e3:.2f} "
            f"| {r['replayed_after_work_mean_s'] * 1e3:.2f} | {r['replayed_priced_mean_s'] * 1e3:.2f} |"
        )
    print(f"\n| calibration (x{rate}) | FFN 1 tok (us) | FFN 256 (us) | link latency (us) | GB/s | per task (us) | per further worker (us) | step fixed (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for p, d in zip(runs, docs):
        passes = d["calibration"]
        half = len(passes) // 2
        for i, c in enumerate(passes):
            when = f"before ({i + 1})" if i < half else f"after ({i - half + 1})"
            print(
                f"| {p.parent.name} {when} | {c['ffn_s'][0][1] * 1e6:.0f} | {c['ffn_s'][-1][1] * 1e6:.0f} "
                f"| {c['link_latency_s'] * 1e6:.0f} | {c['link_bandwidth'] / 1e9:.2f} "
                f"| {c['expert_task_overhead_s'] * 1e6:.0f} | {c['per_extra_worker_s'] * 1e6:.0f} | {c['step_fixed_s'] * 1e6:.0f} |"
            )
