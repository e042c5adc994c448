#!/usr/bin/env python3
"""Throughput and latency curves of the endpoint: `moeless bench serve` at rising Poisson
request rates against `moeless up` (built-in model), with the experts in process and on local
worker processes, each point repeated; medians of the repeats go to a Markdown table (stdout)
and an SVG plot (output throughput and TTFT p50/p99 against the offered rate).

Usage: scripts/bench_serve_curve.py [--bin target/release/moeless] [--out bench-serve]
       [--rates 8,16,32,64,128,inf] [--repeats 3] [--num-requests 100] [--max-tokens 64]
Reference data: $MOELESS_SHARED_DIR (default ../shared) for the ShareGPT prompts.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_server import free_port, stop_server, wait_healthy  # noqa: E402

SETUPS = [("in-process experts", []), ("2 worker processes", ["--workers", "2"])]


def run_point(args, base, rate, rep, path):
    cmd = [args.bin, "bench", "serve", "--base-url", base, "--prompts", args.prompts,
           "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
           "--seed", str(rep), "--out", path]
    if rate != "inf":
        cmd += ["--request-rate", rate]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def svg(curves, path):
    """Two panels: output tokens/s and TTFT p50 (solid) / p99 (dashed), one colour per setup."""
    w, h, pad = 900, 360, 55
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">']
    panels = [("output tokens/s", lambda p: [p["output_throughput"]]),
              ("TTFT ms (p50 solid, p99 dashed)", lambda p: [p["ttft_p50"], p["ttft_p99"]])]
    pw = (w - 3 * pad) / 2
    for k, (title, ys) in enumerate(panels):
        x0 = pad + k * (pw + pad)
        rates = [p["rate_x"] for c in curves.values() for p in c]
        vals = [v for c in curves.values() for p in c for v in ys(p)]
        xmax, ymax = max(rates), max(vals) * 1.1 or 1
        fx = lambda r: x0 + pw * r / xmax  # noqa: E731
        fy = lambda v: h - pad - (h - 2 * pad) * v / ymax  # noqa: E731
        out.append(f'<text x="{x0 + pw / 2}" y="{pad - 20}" text-anchor="middle">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{h - pad}" x2="{x0 + pw}" y2="{h - pad}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{pad}" x2="{x0}" y2="{h - pad}" stroke="black"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{h - 15}" text-anchor="middle">offered requests/s (rightmost: all at once)</text>')
        first = next(iter(curves.values()))
        for p in first:
            label = "all" if p["rate"] == "inf" else p["rate"]
            out.append(f'<text x="{fx(p["rate_x"]):.1f}" y="{h - pad + 14}" text-anchor="middle">{label}</text>')
        for i in range(5):
            v = ymax * i / 4
            out.append(f'<text x="{x0 - 5}" y="{fy(v) + 4}" text-anchor="end">{v:.0f}</text>')
        for ci, (name, pts) in enumerate(curves.items()):
            for si in range(len(ys(pts[0]))):
                line = " ".join(f"{fx(p['rate_x']):.1f},{fy(ys(p)[si]):.1f}" for p in pts)
                dash = ' stroke-dasharray="5,4"' if si else ""
                out.append(f'<polyline points="{line}" fill="none" stroke="{colours[ci]}" stroke-width="2"{dash}/>')
            if k == 0:
                out.append(f'<text x="{x0 + 10}" y="{pad + 15 * (ci + 1)}" fill="{colours[ci]}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/moeless")
    ap.add_argument("--out", default="bench-serve")
    ap.add_argument("--rates", default="8,16,32,64,128,inf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    shared = os.environ.get("MOELESS_SHARED_DIR", "../shared")
    args.prompts = os.path.join(shared, "data/prompts/ShareGPT_V3_filtered_1000.json")
    if not os.path.exists(args.prompts):
        sys.exit(f"prompts not found: {args.prompts} (set MOELESS_SHARED_DIR)")
    os.makedirs(args.out, exist_ok=True)
    rates = args.rates.split(",")
    curves = {}
    print("| setup | offered req/s | completed / failed | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 ms | E2E p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, extra in SETUPS:
        port = free_port()
        proc = subprocess.Popen([args.bin, "up", "--port", str(port), "--max-num-seqs", "64", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc, timeout=120)
            points = []
            for rate in rates:
                reps = []
                for rep in range(args.repeats):
                    tag = f"{name.split()[0]}-{rate}-{rep}"
                    print(f"  {name}: rate {rate}, run {rep + 1}/{args.repeats}", file=sys.stderr)
                    reps.append(run_point(args, base, rate, rep, os.path.join(args.out, f"{tag}.json")))
                med = lambda f: statistics.median(f(r) for r in reps)  # noqa: E731
                p = {
                    "rate": rate,
                    "completed": sum(r["completed"] for r in reps),
                    "failed": sum(r["failed"] for r in reps),
                    "request_throughput": med(lambda r: r["request_throughput"]),
                    "output_throughput": med(lambda r: r["output_throughput"]),
                    "ttft_p50": med(lambda r: r["ttft_ms"]["median"]),
                    "ttft_p99": med(lambda r: r["ttft_ms"]["p99"]),
                    "tpot_p50": med(lambda r: r["tpot_ms"]["median"]),
                    "e2e_p50": med(lambda r: r["e2e_ms"]["median"]),
                    "e2e_p99": med(lambda r: r["e2e_ms"]["p99"]),
                }
                points.append(p)
                print(f"| {name} | {rate} | {p['completed']} / {p['failed']} | {p['request_throughput']:.1f} | "
                      f"{p['output_throughput']:.0f} | {p['ttft_p50']:.1f} / {p['ttft_p99']:.1f} | "
                      f"{p['tpot_p50']:.2f} | {p['e2e_p50']:.0f} / {p['e2e_p99']:.0f} |", flush=True)
        finally:
            stop_server(proc)
        finite = [float(p["rate"]) for p in points if p["rate"] != "inf"]
        for p in points:
            p["rate_x"] = float(p["rate"]) if p["rate"] != "inf" else (max(finite) * 1.5 if finite else 1.0)
        curves[name] = points
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    svg(curves, os.path.join(args.out, "curves.svg"))
    print(f"written: {args.out}/curves.json, {args.out}/curves.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
