"""Plots one run of bench/cuda/vs_anchors.py (its --json file): per row, the fraction of the H200's ceilings that
mla and the best anchor of the same run reached, on the same tensors. Rows whose anchor did not run get no grey bar.

    python3 bench/plot_cuda.py bench/results/2026-11-30-h200-run1-anchors.json docs/img/h200-cuda.png

Ceilings: 768 TFLOP/s (cuBLAS bf16 GEMM) and 4197 GB/s (device copy), measured on the lent H200
(../shared/PERFORMANCE.md). A decode row's fraction is the larger of its compute and bandwidth fractions: the one
that binds. Needs matplotlib (Debian: python3-matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TFLOPS, GBPS = 768.0, 4197.0


def decode_rows(rows):
    out = []
    for r in rows:
        ours = max(r["mla_TFLOPS"] / TFLOPS, r["mla_GBps"] / GBPS)
        best = r.get("best_anchor")
        theirs = ours * r["mla_ms"] / r[best + "_ms"] if best else None  # same FLOPs and bytes, their time
        out.append((r["case"], ours, theirs, best or ""))
    return out


def prefill_rows(rows):
    return [(r["case"], r["mla_TFLOPS"] / TFLOPS, r["cudnn_TFLOPS"] / TFLOPS, "cuDNN") for r in rows]


def panel(ax, rows, title):
    rows = rows[::-1]
    y = range(len(rows))
    ours = [o for _, o, _, _ in rows]
    theirs = [t or 0 for _, _, t, _ in rows]
    ax.barh([i + 0.2 for i in y], ours, height=0.4, label="mla", color="#2a7ab9")
    ax.barh([i - 0.2 for i in y], theirs, height=0.4, label="best anchor, same run", color="#bbbbbb")
    for i, (_, o, t, who) in enumerate(rows):
        ax.text(o + 0.01, i + 0.2, f"{100 * o:.0f}%", va="center", fontsize=7)
        if t:
            ax.text(t + 0.01, i - 0.2, f"{who}: mla {t and o / t:.2f}x", va="center", fontsize=7, color="#555555")
    ax.set_yticks(list(y))
    ax.set_yticklabels([n for n, _, _, _ in rows], fontsize=8)
    ax.set_xlim(0, 1.5)
    ax.set_xlabel("fraction of the ceiling (768 TFLOP/s or 4.2 TB/s, whichever binds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    rows = json.load(open(src))
    dec = [r for r in rows if r["section"] == "decode" and "error" not in r]
    pre = [r for r in rows if r["section"] == "prefill" and "error" not in r]
    env = next((r for r in rows if r["section"] == "env"), {})
    fig, axes = plt.subplots(2, 1, figsize=(9, 11), gridspec_kw={"height_ratios": [max(len(dec), 1), len(pre) + 1]})
    panel(axes[0], decode_rows(dec), "decode kernel (absorbed, bf16, page 64), CUDA graphs; grey: the faster of FlashMLA, FA3")
    panel(axes[1], prefill_rows(pre), "prefill from Python (192/128, causal); grey: cuDNN SDPA")
    fig.suptitle(f"mla on {env.get('gpu', 'GPU')}, one run: {src.split('/')[-1]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
