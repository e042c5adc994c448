#!/usr/bin/env python3
"""Plots `moeless bench gpu` + `torch_expert_bench.py` results as SVG (no plotting library):
expert FFN TFLOP/s against tokens per expert, MoEless vs PyTorch (HF chain and fused), with
each side's dense bf16 GEMM peak; medians over the runs given.

    scripts/gpu/plot.py OUT.svg bench-gpu.run*.json -- torch.run*.json
"""
import json
import statistics
import sys


def main():
    out, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    ours = [json.load(open(p)) for p in rest[:split]]
    torch = [json.load(open(p)) for p in rest[split + 1:]]
    shape = (ours[0]["hidden"], ours[0]["ffn"])
    flops = lambda n: 6.0 * n * shape[0] * shape[1]
    ns = [r["tokens"] for r in ours[0]["expert_ffn"]]
    med = statistics.median
    series = {
        "MoEless (cuBLAS + fused SwiGLU)": ("#1f77b4", [med(r["tflops"] for o in ours for r in o["expert_ffn"] if r["tokens"] == n) for n in ns]),
        "PyTorch, HF Mixtral expert": ("#d62728", [med(flops(n) / (r["hf_ms"] / 1e3) / 1e12 for t in torch for r in t["expert_ffn"] if r["tokens"] == n) for n in ns]),
        "PyTorch, fused gate/up": ("#ff7f0e", [med(flops(n) / (r["fused_ms"] / 1e3) / 1e12 for t in torch for r in t["expert_ffn"] if r["tokens"] == n) for n in ns]),
    }
    peak = med(o["dense_bf16_peak_tflops"] for o in ours)
    W, H, L, R, T, B = 720, 420, 70, 250, 40, 50
    ymax = 100 * (int(peak / 100) + 1)
    xs = lambda i: L + (W - L - R) * i / (len(ns) - 1)
    ys = lambda v: T + (H - T - B) * (1 - v / ymax)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="14">Expert FFN, hidden {shape[0]}, ffn {shape[1]}, bf16 '
           f'({ours[0]["device"]["name"]}, medians of {len(ours)} runs)</text>']
    for v in range(0, ymax + 1, 100):
        svg.append(f'<line x1="{L}" x2="{W - R}" y1="{ys(v):.1f}" y2="{ys(v):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{L - 8}" y="{ys(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for i, n in enumerate(ns):
        svg.append(f'<text x="{xs(i):.1f}" y="{H - B + 18}" text-anchor="middle">{n}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">tokens per expert</text>')
    svg.append(f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" text-anchor="middle">TFLOP/s</text>')
    svg.append(f'<line x1="{L}" x2="{W - R}" y1="{ys(peak):.1f}" y2="{ys(peak):.1f}" stroke="#555" stroke-dasharray="6 4"/>')
    svg.append(f'<text x="{W - R + 8}" y="{ys(peak) + 4:.1f}">cuBLAS 8192^3 peak {peak:.0f}</text>')
    for k, (name, (color, vals)) in enumerate(series.items()):
        pts = " ".join(f"{xs(i):.1f},{ys(v):.1f}" for i, v in enumerate(vals))
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, v in enumerate(vals):
            svg.append(f'<circle cx="{xs(i):.1f}" cy="{ys(v):.1f}" r="3" fill="{color}"/>')
        svg.append(f'<rect x="{W - R + 8}" y="{T + 40 + 20 * k}" width="12" height="3" fill="{color}"/>')
        svg.append(f'<text x="{W - R + 26}" y="{T + 45 + 20 * k}">{name}</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg))


if __name__ == "__main__":
    main()
