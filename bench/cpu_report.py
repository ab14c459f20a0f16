"""Turns `mla bench --json` and bench/torch_anchor.py output into a results page (markdown on stdout)."""
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone

mla = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2]))
text = open(sys.argv[3]).read()
flags = sys.argv[4] if len(sys.argv) > 4 else ""


def sh(cmd):
    try:
        return subprocess.check_output(cmd, shell=True, text=True).strip()
    except subprocess.CalledProcessError:
        return "?"


cpu = sh("lscpu | sed -n 's/^Model name: *//p'")
rows = {(r["work"], r["dtype"]): r for r in mla["rows"]}
print(f"# CPU benchmark, {mla['preset']} layer\n")
print(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
print(f"- machine: {cpu}, {sh('nproc')} cores, {platform.system()} {platform.release()}")
print(f"- commit: {sh('git rev-parse HEAD')}{' (dirty)' if sh('git status --porcelain --untracked-files=no') else ''}")
print(f"- command: `scripts/bench-cpu.sh {flags}` (`mla bench --json`, then `bench/torch_anchor.py 1024 4096 7`)")
print(f"- mla: {mla['threads']} threads, GEMM {mla['gemm_library']}, kernels {mla['kernel_isa']}")
print(f"- anchor: PyTorch {torch['torch']} eager, {torch['threads']} threads, same shapes, bf16\n")
c = mla["ceilings"]
print("## Ceilings measured in the same run\n")
print("| ceiling | mla's measurement | PyTorch's measurement |")
print("|---|---|---|")
print(f"| bf16 GEMM 2048³ | {c['gemm_bf16_gflops']:.0f} GFLOP/s (oneDNN) | {torch['gemm_bf16_gflops']:.0f} GFLOP/s |")
print(f"| f32 GEMM 2048³ | {c['gemm_f32_gflops']:.0f} GFLOP/s | |")
print(f"| copy, read + write | {c['copy_gbps']:.1f} GB/s (2 threads) | {torch['copy_gbps']:.1f} GB/s |\n")
print("## Results (bf16 unless noted)\n")
print("| work | mla | PyTorch eager | speedup | mla's fraction of ceiling |")
print("|---|---|---|---|---|")
p = rows[("prefill", "bf16")]
print(f"| prefill {p['tokens']} tokens | {p['ms']:.1f} ms ({p['gflops']:.0f} GFLOP/s) | {torch['prefill_ms']:.1f} ms | "
      f"{torch['prefill_ms'] / p['ms']:.2f}x | {100 * p['fraction_of_gemm_peak']:.0f}% of bf16 GEMM peak |")
d = rows[("decode_latent", "bf16")]
print(f"| decode step, context {d['context']}, latent cache | {d['ms']:.3f} ms ({d['gbps']:.1f} GB/s) | "
      f"{torch['decode_latent_ms']:.3f} ms | {torch['decode_latent_ms'] / d['ms']:.2f}x | "
      f"{100 * d['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth |")
e = rows[("decode_reexpand", "bf16")]
print(f"| decode step, context {e['context']}, re-expanding the cache | {e['ms']:.2f} ms | "
      f"{torch['decode_reexpand_ms']:.2f} ms | {torch['decode_reexpand_ms'] / e['ms']:.2f}x | compute-bound (expansion GEMM) |")
for work in ("prefill", "decode_latent", "decode_reexpand"):
    r = rows.get((work, "f32"))
    if r:
        print(f"| {work.replace('_', ' ')}, f32 | {r['ms']:.3f} ms | | | |")
print("\n## mla bench output\n")
print("```")
print(text.strip())
print("```")
