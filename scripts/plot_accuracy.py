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
    panels = [("K", "packkv-K", "k_rel", "k_ratio"), ("V", "packkv-V", "v_rel", "v_ratio"),
              ("K+V", "packkv-KV", None, "kv_ratio")]
    for ax, (title, family, rel_key, ratio_key) in zip(axes, panels):
        sweep = sorted((r for r in rows if r["family"] == family), key=lambda r: r[ratio_key])
        if sweep:
            ax.plot([r[ratio_key] for r in sweep], [r["delta_pct"] for r in sweep], "o-", color="tab:blue",
                    label="PackKV" + (f" ({rel_key.split('_')[0].upper()} rel sweep)" if rel_key else " pairs"))
            for r in sweep:
                label = f"{r[rel_key]:g}" if rel_key else f"K {r['k_rel']:g} / V {r['v_rel']:g}"
                ax.annotate(label, (r[ratio_key], r["delta_pct"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color="tab:blue")
        for marker, b in zip(markers, baselines):
            ax.scatter([b[ratio_key]], [b["delta_pct"]], marker=marker, s=50, label=b["name"], zorder=3)
        for bound, style in ((1.0, "--"), (5.0, ":")):
            ax.axhline(bound, color="grey", linestyle=style, linewidth=1)
            ax.text(ax.get_xlim()[0], bound, f" {bound:g}%", va="bottom", fontsize=7, color="grey")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"{title} compression ratio vs fp16 (all bytes counted)")
        ax.set_ylabel("perplexity change vs exact cache (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("PackKV vs quantization baselines: compression against perplexity change (teacher-forced)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
