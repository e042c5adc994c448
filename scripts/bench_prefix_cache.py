#!/usr/bin/env python3
"""Time to first token with and without prefix caching, side by side in one run.

Starts `moeless up` (the built-in model, or `--model DIR`) twice per round, once as is and once
with `--no-enable-prefix-caching`, and sends the same sequential requests to each: prompts that
share a long system prefix (a chat-style workload, the case prefix caching is for) followed by
a distinct question. TTFT is read from the first streamed chunk. Rounds alternate the order of
the two servers; the report gives per-configuration medians over all requests and the ratio.

Usage: scripts/bench_prefix_cache.py [path/to/moeless] [--prefix-tokens 1536] [--requests 20]
       [--rounds 3] [--out docs/results/prefix-cache/report.json]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.environ.get("MOELESS_BIN", "target/release/moeless"))
    ap.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--prefix-tokens", type=int, default=1536)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default="docs/results/prefix-cache/report.json")
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
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
