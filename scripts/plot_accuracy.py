#!/usr/bin/env python3
"""Plot compression ratio against perplexity change from packkv_eval's CSV.

usage: plot_accuracy.py accuracy.csv accuracy.png
Three panels: K (PackKV's K sweep with V at 8-bit codes, and the baselines' K ratios), V (the V
sweep and the baselines' V ratios), and K+V (PackKV pairs and the baselines). Every ratio counts all
bytes, against an fp16 cache.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1])))
    for r in rows:
        for key in ("k_rel", "v_rel", "perplexity", "delta_pct", "top1", "k_ratio", "v_ratio", "kv_ratio"):
            r[key] = float(r[key])
    baselines = [r for r in rows if r["family"] == "baseline"]
    markers = ["s", "D", "^", "v", "P", "X", "*"]

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    # (panel, ratio column, [(family, rel column, label, colour)]) - sweeps are drawn as lines in rel order.
    panels = [
        ("K", "k_ratio", [("packkv-K", "k_rel", "PackKV, K per token (rel sweep)", "tab:blue"),
                          ("packkv-K-channel", "k_rel", "PackKV, K per channel (rel sweep)", "tab:cyan")]),
        ("V", "v_ratio", [("packkv-V", "v_rel", "PackKV (V rel sweep)", "tab:blue")]),
        ("K+V", "kv_ratio", [("packkv-KV", None, "PackKV pairs", "tab:blue")]),
    ]
    for ax, (title, ratio_key, sweeps) in zip(axes, panels):
        for family, rel_key, label, colour in sweeps:
            points = [r for r in rows if r["family"] == family]
            if not points:
                continue
            if rel_key:
                points.sort(key=lambda r: r[rel_key])
                ax.plot([r[ratio_key] for r in points], [r["delta_pct"] for r in points], "o-", color=colour, label=label)
            else:
                ax.plot([r[ratio_key] for r in points], [r["delta_pct"] for r in points], "o", color=colour, label=label)
            for r in points:
                if rel_key:
                    text = f"{r[rel_key]:g}"
                else:
                    mode = "/ch" if r["k_mode"] == "per_channel" else ""
                    text = f"K{mode} {r['k_rel']:g}, V {r['v_rel']:g}"
                ax.annotate(text, (r[ratio_key], r["delta_pct"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colour)
        for marker, b in zip(markers, baselines):
            ax.scatter([b[ratio_key]], [b["delta_pct"]], marker=marker, s=50, label=b["name"], zorder=3)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=-2.0)
        for bound, style in ((1.0, "--"), (5.0, ":")):
            ax.axhline(bound, color="grey", linestyle=style, linewidth=1)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel(f"{title} compression ratio vs fp16 (all bytes counted)")
        ax.set_ylabel("perplexity change vs exact cache (%; dashed 1%, dotted 5%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("PackKV vs quantization baselines: compression against perplexity change (teacher-forced)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
