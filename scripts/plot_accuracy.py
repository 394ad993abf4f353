#!/usr/bin/env python3
"""Plot bits per element against KL divergence and against perplexity change from packkv_eval's CSV.

usage: plot_accuracy.py accuracy.csv accuracy.png
Two rows (mean KL(exact || setting) on a log scale; perplexity change, linear inside +-1% and
logarithmic beyond) by three columns: K (PackKV's K sweeps with V at 1/255, and the baselines' K
bits), V (the V sweep and the baselines' V bits), K+V (PackKV pairs and the baselines, the mean of
K and V bits). Bits are those of the compressed part, every byte counted. Error bars: the 95%
bootstrap intervals. A baseline's accuracy is always with both of its sides quantized.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402

NUMERIC = ("k_rel", "v_rel", "perplexity", "delta_pct", "delta_lo", "delta_hi", "kl", "kl_lo", "kl_hi", "top1",
           "k_bits", "v_bits", "kv_bits")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1])))
    for r in rows:
        for key in NUMERIC:
            r[key] = float(r[key])
    rows = [r for r in rows if r["family"] != "exact"]
    baselines = [r for r in rows if r["family"] == "baseline"]
    markers = ["s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p", "8"]
    # Baseline colours: tab20 without its blues and cyans, which the PackKV lines use.
    colours = [plt.cm.tab20.colors[i] for i in (2, 4, 6, 8, 10, 12, 14, 16, 3, 5, 7, 9, 11, 13, 15, 17)]

    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    # (panel, bits column, [(family, rel column, label, colour)]) - sweeps are drawn as lines in rel order.
    panels = [
        ("K", "k_bits", [("packkv-K", "k_rel", "PackKV, K per token (rel sweep)", "tab:blue"),
                         ("packkv-K-channel", "k_rel", "PackKV, K per channel (rel sweep)", "tab:cyan")]),
        ("V", "v_bits", [("packkv-V", "v_rel", "PackKV, V (rel sweep)", "tab:blue")]),
        ("K+V", "kv_bits", [("packkv-KV", None, "PackKV pairs", "tab:blue")]),
    ]
    for row, (metric, lo_key, hi_key) in enumerate((("kl", "kl_lo", "kl_hi"), ("delta_pct", "delta_lo", "delta_hi"))):
        for col, (title, bits_key, sweeps) in enumerate(panels):
            ax = axes[row][col]

            def draw(points, line, colour, label, marker="o"):
                xs = [p[bits_key] for p in points]
                ys = [p[metric] for p in points]
                err = [[max(p[metric] - p[lo_key], 0) for p in points], [max(p[hi_key] - p[metric], 0) for p in points]]
                ax.errorbar(xs, ys, yerr=err, fmt=marker, linestyle="-" if line else "none", color=colour, label=label,
                            capsize=2, markersize=5, linewidth=1)

            for family, rel_key, label, colour in sweeps:
                points = [r for r in rows if r["family"] == family]
                if not points:
                    continue
                if rel_key:
                    points.sort(key=lambda r: r[rel_key])
                draw(points, bool(rel_key), colour, label)
                for r in points:
                    if rel_key:
                        text = f"{r[rel_key]:g}"
                    else:
                        mode = "/ch" if r["k_mode"] == "per_channel" else ""
                        text = f"K{mode} {r['k_rel']:g}, V {r['v_rel']:g}"
                    ax.annotate(text, (r[bits_key], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colour)
            for i, b in enumerate(baselines):
                draw([b], False, colours[i % len(colours)], b["name"], markers[i % len(markers)])
            if metric == "kl":
                ax.set_yscale("log")
                ax.set_ylabel("mean KL(exact || setting), nats (log scale)")
            else:
                # Linear inside +-1% (where the turning points are), logarithmic beyond.
                ax.set_yscale("symlog", linthresh=1.0, linscale=2.0)
                ax.set_ylim(bottom=-1.0)
                ticks = [-1, -0.5, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20, 50, 100, 200, 500]
                ax.yaxis.set_major_locator(FixedLocator(ticks))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}%"))
                for bound, style in ((1.0, "--"), (5.0, ":")):
                    ax.axhline(bound, color="grey", linestyle=style, linewidth=1)
                ax.axhline(0.0, color="black", linewidth=0.5)
                ax.set_ylabel("perplexity change vs exact cache (dashed 1%, dotted 5%)")
            ax.set_xlabel(f"{title} bits per element, compressed part (all bytes counted)")
            ax.set_title(f"{title}: {'KL divergence' if metric == 'kl' else 'perplexity change'}")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.legend(fontsize=6.5, loc="best")
    fig.suptitle("PackKV vs quantization baselines: bits per element against accuracy "
                 "(teacher-forced, 95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
