#!/usr/bin/env python3
"""Time to first token with and without prefix caching, side by side in one run.

Starts `moeless up` (the built-in model, or `--model DIR`) twice per round, once as is and once
with `--no-enable-prefix-caching`, and sends the same sequential requests to each: prompts that
share a long system prefix (a chat-style workload, the case prefix caching is for) followed by
a distinct question. TTFT is read from the first streamed chunk. Rounds alternate the order of
the two servers; the report (JSON, and a TTFT CDF as SVG beside it) gives per-configuration
medians over all requests and the ratio.

Usage: scripts/bench_prefix_cache.py [path/to/moeless] [--prefix-tokens 1536] [--requests 20]
       [--rounds 3] [--out docs/results/issue7-kv-cache/prefix-cache.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_server import free_port, stop_server, wait_healthy  # noqa: E402


def ttft(base, prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data:") and first is None:
                first = time.perf_counter() - start
    return first


def run_config(binary, extra, prompts, max_tokens, model_args):
    port = free_port()
    proc = subprocess.Popen([binary, "up", "--port", str(port), *model_args, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        ttft(base, "warm-up", 2)
        return [ttft(base, p, max_tokens) for p in prompts]
    finally:
        stop_server(proc)


def cdf_svg(samples, path):
    """TTFT CDFs, one line per configuration, on a log-scale time axis."""
    import math
    w, h, pad = 640, 360, 55
    colours = ["#1f77b4", "#d62728"]
    vals = [v * 1e3 for vs in samples.values() for v in vs]
    lo, hi = math.log10(min(vals) * 0.8), math.log10(max(vals) * 1.25)
    fx = lambda v: pad + (w - 2 * pad) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    fy = lambda q: h - pad - (h - 2 * pad) * q  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="{pad - 25}" text-anchor="middle">TTFT CDF, prompts sharing a system prefix</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">time to first token, ms (log scale)</text>']
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= math.log10(v) <= hi:
                out.append(f'<text x="{fx(v):.1f}" y="{h - pad + 14}" text-anchor="middle">{v:g}</text>')
    for q in (0, 0.5, 1):
        out.append(f'<text x="{pad - 5}" y="{fy(q) + 4}" text-anchor="end">{q:g}</text>')
    for ci, (name, vs) in enumerate(samples.items()):
        xs = sorted(v * 1e3 for v in vs)
        pts = " ".join(f"{fx(x):.1f},{fy((i + 1) / len(xs)):.1f}" for i, x in enumerate(xs))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colours[ci % 2]}" stroke-width="2"/>')
        out.append(f'<text x="{pad + 10}" y="{pad + 15 * (ci + 1)}" fill="{colours[ci % 2]}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.environ.get("MOELESS_BIN", "target/release/moeless"))
    ap.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--prefix-tokens", type=int, default=1536)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default="docs/results/issue7-kv-cache/prefix-cache.json")
    a = ap.parse_args()
    model_args = ["--model", a.model] if a.model else []
    # The built-in model's tokenizer is byte-level: one token per character.
    system = ("You are MoEless, a careful assistant. " * 200)[: a.prefix_tokens]
    prompts = [f"{system}Question {i}: what is expert {i % 8}?" for i in range(a.requests)]
    configs = {"prefix_caching": [], "no_prefix_caching": ["--no-enable-prefix-caching"]}
    samples = {name: [] for name in configs}
    for r in range(a.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            t = run_config(a.binary, configs[name], prompts, a.max_tokens, model_args)
            samples[name].extend(t)
            print(f"round {r + 1}/{a.rounds} {name}: median TTFT {statistics.median(t) * 1e3:.2f} ms",
                  file=sys.stderr)
    med = {name: statistics.median(v) for name, v in samples.items()}
    report = {
        "what": "TTFT of sequential requests sharing a system prefix, prefix caching on vs off",
        "model": a.model or "moeless-builtin",
        "prefix_tokens": a.prefix_tokens,
        "prompt_tokens": len(prompts[0]),
        "requests_per_round": a.requests,
        "rounds": a.rounds,
        "ttft_median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ttft_p90_ms": {k: round(statistics.quantiles(v, n=10)[-1] * 1e3, 3) for k, v in samples.items()},
        "speedup_median": round(med["no_prefix_caching"] / med["prefix_caching"], 2),
        "command": "python3 scripts/bench_prefix_cache.py " + " ".join(sys.argv[1:]),
        "ttft_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in samples.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    cdf_svg(samples, os.path.splitext(a.out)[0] + ".svg")
    print(json.dumps({k: v for k, v in report.items() if k != "ttft_ms"}, indent=2))


if __name__ == "__main__":
    main()
