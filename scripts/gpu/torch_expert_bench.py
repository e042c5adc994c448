#!/usr/bin/env python3
"""PyTorch side of `moeless bench gpu`: the same shapes and the same deterministic weights.

Measures, in this process on the same GPU:
  - torch's dense bf16 GEMM 8192^3 (the ceiling, as `moeless bench gpu` measures its own);
  - one expert FFN as Hugging Face's Mixtral writes it, `w2(silu(w1 x) * w3 x)` through
    torch.matmul, and with gate/up fused into one matmul (what we run);
  - the MoE layer with the same skewed routing (HF's per-expert index/index_add loop);
  - a pinned host-to-device copy of one expert, and of 1 GiB.
With --ours (the JSON of `moeless bench gpu`), compares our expert outputs with torch's on the
same inputs and reports the ratios. Writes JSON with --out.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F


def formula(n, tensor, scale, device):
    i = torch.arange(n, dtype=torch.int64, device=device)
    v = (((i + 7919 * tensor) * 2654435761) % 2001).to(torch.float32) / 1000.0 - 1.0
    return (v * torch.tensor(scale, dtype=torch.float32, device=device)).to(torch.bfloat16)


def time_ms(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def zipf_ids(tokens, experts, k):
    """The same LCG and Zipf sampling as `moeless bench gpu`."""
    mask = (1 << 64) - 1
    z = [1.0 / r for r in range(1, experts + 1)]
    total = sum(z)
    state = 0x9E3779B97F4A7C15
    ids = []
    for _ in range(tokens):
        chosen = []
        while len(chosen) < k:
            state = (state * 6364136223846793005 + 1442695040888963407) & mask
            u = (state >> 11) / float(1 << 53) * total
            acc, e = 0.0, experts - 1
            for j, zz in enumerate(z):
                acc += zz
                if u < acc:
                    e = j
                    break
            if e not in chosen:
                chosen.append(e)
        ids.extend(chosen)
    return ids


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--tokens", default="128,512,1024,2048,4096")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layer-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ours")
    p.add_argument("--out")
    a = p.parse_args()
    dev = torch.device("cuda")
    h, i = a.hidden, a.ffn
    tokens = [int(t) for t in a.tokens.split(",")]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)

    m = 8192
    ga = formula(m * m, 90, 0.01, dev).view(m, m)
    gb = formula(m * m, 91, 0.01, dev).view(m, m)
    peak_ms = time_ms(lambda: torch.matmul(gb, ga.T), a.repeats)
    peak = 2 * m**3 / (peak_ms / 1e3) / 1e12
    del ga, gb

    w1 = formula(i * h, 1, 1.0 / math.sqrt(h), dev).view(i, h)
    w3 = formula(i * h, 2, 1.0 / math.sqrt(h), dev).view(i, h)
    w2 = formula(h * i, 3, 1.0 / math.sqrt(i), dev).view(h, i)
    w13 = torch.cat([w1, w3], 0)
    nmax = max(max(tokens), a.layer_tokens * a.top_k)
    x = formula(nmax * h, 4, 1.0, dev).view(nmax, h)

    def hf_expert(xs):
        return torch.matmul(F.silu(torch.matmul(xs, w1.T)) * torch.matmul(xs, w3.T), w2.T)

    def fused_expert(xs):
        g, u = torch.matmul(xs, w13.T).chunk(2, dim=-1)
        return torch.matmul(F.silu(g) * u, w2.T)

    rows = []
    for n in tokens:
        xs = x[:n]
        hf = time_ms(lambda: hf_expert(xs), a.repeats)
        fu = time_ms(lambda: fused_expert(xs), a.repeats)
        flops = 6.0 * n * h * i
        rows.append({"tokens": n, "hf_ms": hf, "fused_ms": fu,
                     "hf_tflops": flops / (hf / 1e3) / 1e12, "fused_tflops": flops / (fu / 1e3) / 1e12})

    # The layer, as HF's MixtralSparseMoeBlock loops over experts (all 8 share the weights, as ours do).
    t, k, e = a.layer_tokens, a.top_k, a.experts
    ids = torch.tensor(zipf_ids(t, e, k), device=dev).view(t, k)
    wts = torch.full((t, k), 1.0 / k, device=dev, dtype=torch.bfloat16)
    xl = x[:t]

    def hf_layer():
        out = torch.zeros_like(xl)
        for ex in range(e):
            tok, slot = torch.where(ids == ex)
            if tok.numel() == 0:
                continue
            y = hf_expert(xl[tok]) * wts[tok, slot, None]
            out.index_add_(0, tok, y)
        return out

    layer_ms = time_ms(hf_layer, a.repeats)

    # Pinned host-to-device copies.
    one = torch.empty(3 * h * i, dtype=torch.bfloat16).pin_memory()
    big = torch.empty(1 << 29, dtype=torch.bfloat16).pin_memory()
    d_one = torch.empty_like(one, device=dev)
    d_big = torch.empty_like(big, device=dev)
    one_ms = time_ms(lambda: d_one.copy_(one, non_blocking=True), min(a.repeats, 10))
    big_ms = time_ms(lambda: d_big.copy_(big, non_blocking=True), min(a.repeats, 10))

    doc = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
           "dense_bf16_peak_tflops": peak, "expert_ffn": rows,
           "layer": {"tokens": t, "ms": layer_ms},
           "h2d": {"expert_bytes": one.numel() * 2, "expert_gbps": one.numel() * 2 / (one_ms / 1e3) / 1e9,
                   "gib_gbps": big.numel() * 2 / (big_ms / 1e3) / 1e9}}

    if a.ours:
        ours = json.load(open(a.ours))
        c = ours["check"]
        n = c["tokens"]
        y = hf_expert(x[:n]).float()
        doc["check"] = {"tokens": n, "torch_sum": y.sum().item(), "torch_abs_sum": y.abs().sum().item(),
                        "ours_sum": c["sum"], "ours_abs_sum": c["abs_sum"],
                        "torch_first": y.flatten()[:8].tolist(), "ours_first": c["first"],
                        "abs_sum_rel_diff": abs(c["abs_sum"] - y.abs().sum().item()) / y.abs().sum().item()}
        print("| tokens/expert | MoEless ms | torch HF ms | torch fused ms | MoEless % of own peak | vs HF | vs fused |")
        print("|---|---|---|---|---|---|---|")
        by_n = {r["tokens"]: r for r in rows}
        cmp = []
        for r in ours["expert_ffn"]:
            tr = by_n.get(r["tokens"])
            if not tr:
                continue
            cmp.append({"tokens": r["tokens"], "ours_ms": r["ms"], "torch_hf_ms": tr["hf_ms"],
                        "torch_fused_ms": tr["fused_ms"], "speedup_vs_hf": tr["hf_ms"] / r["ms"],
                        "speedup_vs_fused": tr["fused_ms"] / r["ms"], "ours_fraction_of_peak": r["fraction_of_peak"]})
            print(f"| {r['tokens']} | {r['ms']:.3f} | {tr['hf_ms']:.3f} | {tr['fused_ms']:.3f} | "
                  f"{100 * r['fraction_of_peak']:.0f}% | {tr['hf_ms'] / r['ms']:.2f}x | {tr['fused_ms'] / r['ms']:.2f}x |")
        doc["comparison"] = cmp
        doc["layer"]["ours_ms"] = ours["layer"]["ms"]
        doc["layer"]["speedup_vs_hf"] = layer_ms / ours["layer"]["ms"]
        print(f"layer {t} tokens: MoEless {ours['layer']['ms']:.3f} ms, HF loop {layer_ms:.3f} ms "
              f"({layer_ms / ours['layer']['ms']:.2f}x)")
        print(f"dense peak: MoEless/cuBLAS {ours['dense_bf16_peak_tflops']:.0f}, torch {peak:.0f} TFLOP/s")
        print(f"cold start: MoEless {ours['cold_start']['gbps']:.1f} GB/s, torch pinned copy of one expert "
              f"{doc['h2d']['expert_gbps']:.1f} GB/s, 1 GiB {doc['h2d']['gib_gbps']:.1f} GB/s")
        print(f"output check ({n} tokens): abs-sum relative difference {doc['check']['abs_sum_rel_diff']:.2e}")
    if a.out:
        json.dump(doc, open(a.out, "w"), indent=2)
    print(json.dumps(doc)[:2000], file=sys.stderr)


if __name__ == "__main__":
    main()
