import json, glob, os, statistics as st, sys
pre = sys.argv[1]  # e.g. loopback or tbf10g
rows = {}
for v in ["old", "new"]:
    for f in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{pre}-{v}-*.json"))):
        for r in json.load(open(f))["results"]:
            d = rows.setdefault((r["size_bytes"], v), {"q": [], "t": [], "ratio": [], "ql": [], "tl": []})
            d["q"].append(r["quic_mb_per_s"]); d["t"].append(r["tcp_mb_per_s"])
            d["ratio"].append(r["quic_mb_per_s"] / r["tcp_mb_per_s"])
            d["ql"].append(r["quic_p50_ms"]); d["tl"].append(r["tcp_p50_ms"])
print("| size | runs | QUIC MB/s before | after | change | TCP MB/s | QUIC/TCP before | after (per run) | QUIC p50 ms before -> after |")
print("|---|---|---|---|---|---|---|---|---|")
for size in sorted({k[0] for k in rows}):
    o, n = rows.get((size, "old")), rows.get((size, "new"))
    m = st.median
    if o is None:
        print(f"| {size>>10} KiB | {len(n['q'])} | - | {m(n['q']):.0f} | - | {m(n['t']):.0f} | - | **{m(n['ratio']):.2f}** ({' / '.join(f'{x:.2f}' for x in n['ratio'])}) | - -> {m(n['ql']):.2f} |")
        continue
    print(f"| {size>>10} KiB | {len(n['q'])} | {m(o['q']):.0f} | {m(n['q']):.0f} | {m(n['q'])/m(o['q']):.2f}x | {m(o['t']+n['t']):.0f} | {m(o['ratio']):.2f} | **{m(n['ratio']):.2f}** ({' / '.join(f'{x:.2f}' for x in n['ratio'])}) | {m(o['ql']):.2f} -> {m(n['ql']):.2f} |")
