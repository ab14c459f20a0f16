"""Plots a CUDA results file (`mla bench --device cuda --json`) as the fraction of the H200's ceilings reached
per row, ours beside the reference (FlashMLA for decode, cuDNN SDPA for prefill).

    python3 bench/plot_cuda.py bench/results/2026-11-28-h200-cuda-pass4.json docs/img/h200-cuda.png

Ceilings: 768 TFLOP/s (cuBLAS bf16 GEMM) and 4197 GB/s (device copy), measured on the lent H200
(../shared/PERFORMANCE.md). A decode row's fraction is the larger of its compute and bandwidth fractions: the
one that binds. Needs matplotlib (Debian: python3-matplotlib).
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
        ours = max(r["tflops"] / TFLOPS, r["gbps"] / GBPS)
        ref = r.get("flashmla_ms_reference")
        theirs = ours * r["ms"] / ref if ref else None  # same FLOPs and bytes, their time
        out.append((r["case"], ours, theirs))
    return out


def prefill_rows(rows):
    out = []
    for r in rows:
        ours = r["tflops"] / TFLOPS
        ref = r.get("cudnn_ms_reference")
        out.append((r["case"], ours, ours * r["ms"] / ref if ref else None))
    return out


def panel(ax, rows, title, ref_name):
    names = [n for n, _, _ in rows][::-1]
    ours = [o for _, o, _ in rows][::-1]
    theirs = [t if t is not None else 0 for _, _, t in rows][::-1]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], ours, height=0.4, label="mla", color="#2a7ab9")
    ax.barh([i - 0.2 for i in y], theirs, height=0.4, label=ref_name, color="#bbbbbb")
    for i, (o, t) in enumerate(zip(ours, theirs)):
        ax.text(o + 0.01, i + 0.2, f"{100 * o:.0f}%", va="center", fontsize=7)
        if t:
            ax.text(t + 0.01, i - 0.2, f"{o / t:.2f}x", va="center", fontsize=7, color="#555555")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1.5)  # room for the labels and the legend right of the longest bars
    ax.set_xlabel("fraction of the ceiling (768 TFLOP/s or 4.2 TB/s, whichever binds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    j = json.load(open(src))
    fig, axes = plt.subplots(2, 1, figsize=(9, 9), gridspec_kw={"height_ratios": [len(j["decode_kernel"]), len(j["prefill_kernel"]) + 1]})
    panel(axes[0], decode_rows(j["decode_kernel"]), "decode kernel (absorbed, bf16, page 64); grey labels: speed vs FlashMLA", "FlashMLA (PERFORMANCE.md, same GPU type)")
    panel(axes[1], prefill_rows(j["prefill_kernel"]), "expanded prefill kernel (192/128, causal); grey labels: speed vs cuDNN", "cuDNN SDPA (PERFORMANCE.md)")
    fig.suptitle(f"mla on {j.get('device', 'GPU')}: {src.split('/')[-1]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
