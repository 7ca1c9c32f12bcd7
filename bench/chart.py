#!/usr/bin/env python3
"""Draws the benchmark's chart from results.json: one panel per figure family (Go vs custom
medians, whiskers min..max), and a last, full-width panel with every ratio custom/Go.

    python3 bench/chart.py bench/results/results.json bench/results/chart.png
"""
import json
import math
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GO = "#4c72b0"
CUSTOM = "#dd8452"


def wrap(s, width=34):
    return "\n".join(textwrap.wrap(s.replace("`", ""), width)) or s


def bars(ax, metrics, title):
    labels = [wrap(m["label"]) for m in metrics]
    y = list(range(len(metrics)))
    h = 0.38
    for off, side, color, name in ((-h / 2, "go", GO, "Go (runc.v2)"), (h / 2, "custom", CUSTOM, "custom")):
        vals, lo, hi, ys = [], [], [], []
        for i, m in enumerate(metrics):
            s = m.get(side)
            if not s:
                continue
            ys.append(i + off)
            vals.append(s["median"])
            lo.append(max(s["median"] - s["min"], 0))
            hi.append(max(s["max"] - s["median"], 0))
        if vals:
            ax.barh(ys, vals, height=h, color=color, label=name, xerr=[lo, hi], capsize=2,
                    error_kw={"elinewidth": 0.8})
            for yy, v in zip(ys, vals):
                ax.text(v, yy, f" {v:.3g}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    ax.legend(fontsize=7, loc="lower right")


def ratios(ax, metrics):
    rows = [(m["label"], m["ratio_custom_over_go"], m["higher_is_better"]) for m in metrics
            if m.get("ratio_custom_over_go") not in (None, 0) and math.isfinite(m["ratio_custom_over_go"])]
    if not rows:
        ax.set_axis_off()
        return
    y = list(range(len(rows)))
    colors = []
    for _, r, higher in rows:
        better = r > 1 if higher else r < 1
        colors.append("#999999" if 0.98 <= r <= 1.02 else "#55a868" if better else "#c44e52")
    ax.barh(y, [r for _, r, _ in rows], color=colors, height=0.6)
    for i, (_, r, _) in enumerate(rows):
        ax.text(r, i, f" {r:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels([wrap(label, 100) for label, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("custom / Go (median ratio; green: custom better, red: worse, grey: within 2 %)", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "bench/results/chart.png"
    with open(src) as f:
        res = json.load(f)
    panels = {}
    for m in res["metrics"]:
        if m.get("go") or m.get("custom"):
            panels.setdefault(m["panel"], []).append(m)
    items = list(panels.items())
    cols = 2
    rows = math.ceil(len(items) / cols)
    ratio_rows = len([m for m in res["metrics"] if m.get("ratio_custom_over_go")])
    heights = [max(2.0, 0.36 * max(len(ms) for _, ms in items[r * cols:(r + 1) * cols]) + 0.9)
               for r in range(rows)]
    heights.append(max(2.0, 0.24 * ratio_rows + 0.9))
    fig = plt.figure(figsize=(17, sum(heights)))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=heights)
    for idx, (name, ms) in enumerate(items):
        bars(fig.add_subplot(grid[idx // cols, idx % cols]), ms, name)
    ratios(fig.add_subplot(grid[rows, :]), res["metrics"])
    meta = res.get("meta", {})
    fig.suptitle(f"containerd-shim-custom-v2 vs containerd-shim-runc-v2 — {meta.get('date', '')}, "
                 f"{meta.get('mode', '').split(' ')[0]} run", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=90, bbox_inches="tight")
    print(f"chart: wrote {out}")


if __name__ == "__main__":
    main()
