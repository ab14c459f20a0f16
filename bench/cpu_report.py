"""Turns `mla bench --json` and bench/transformers_anchor.py output into a results page (markdown on stdout).

Usage: cpu_report.py MLA_JSON ANCHOR_JSON MLA_TEXT [FLAGS] [ANCHOR_COMMAND]
Reads only keys it finds: a key missing from either JSON prints "n/a" instead of failing.
"""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

mla = json.load(open(sys.argv[1]))
anchor = json.load(open(sys.argv[2]))
text = open(sys.argv[3]).read()
flags = sys.argv[4] if len(sys.argv) > 4 else ""
anchor_cmd = sys.argv[5] if len(sys.argv) > 5 else "bench/transformers_anchor.py"
NA = "n/a"


def sh(cmd):
    try:
        return subprocess.check_output(cmd, shell=True, text=True, stderr=subprocess.DEVNULL).strip()
    except subprocess.CalledProcessError:
        return "?"


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def fmt(x, spec, unit=""):
    return NA if num(x) is None else f"{x:{spec}}{unit}"


def ratio(slow, fast):
    return f"{slow / fast:.2f}x" if num(slow) and num(fast) else NA


rows = {(r.get("work"), r.get("dtype")): r for r in mla.get("rows", []) if isinstance(r, dict)}
ceil = mla.get("ceilings", {}) if isinstance(mla.get("ceilings"), dict) else {}
flag_set = set(sh("grep -m1 '^flags' /proc/cpuinfo").split())


def has(*names):
    return "yes" if any(n in flag_set for n in names) else "no"


# Ceilings of this run: the best GEMM rate any precision reached (mla's or torch's) and the copy bandwidth.
gemms = {f"mla {k.replace('_gflops', '').replace('gemm_', '')}": v for k, v in ceil.items()
         if "gemm" in k and "gflops" in k and num(v)}
gemms.update({f"torch {d}": anchor.get(f"gemm_{d}_gflops") for d in ("bf16", "f32") if num(anchor.get(f"gemm_{d}_gflops"))})
best_gemm_name, best_gemm = max(gemms.items(), key=lambda kv: kv[1]) if gemms else (NA, None)
copies = [v for v in (ceil.get("copy_gbps"), anchor.get("copy_gbps")) if num(v)]
best_copy = max(copies) if copies else None

print(f"# CPU benchmark, {mla.get('preset', NA)} layer\n")
print(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
model = sh("lscpu | sed -n 's/^Model name: *//p'")
print(f"- machine: {model}, {sh('nproc')} cores, "
      f"{platform.system()} {platform.release()}; AVX-512F: {has('avx512f')}, AVX512-BF16: {has('avx512_bf16')}, "
      f"AMX: {has('amx_bf16', 'amx_tile')}")
dirty = " (dirty)" if sh("git status --porcelain --untracked-files=no") else ""
print(f"- commit: {sh('git rev-parse HEAD')}{dirty}")
print(f"- command: `scripts/bench-cpu.sh {flags}`: `mla bench --json` then `{anchor_cmd}`, one after the other")
print(f"- mla: {mla.get('threads', NA)} threads, GEMM {mla.get('gemm_library', NA)}, kernels {mla.get('kernel_isa', NA)}")
inst = anchor.get("install", {}) if isinstance(anchor.get("install"), dict) else {}
print(f"- anchor: PyTorch {anchor.get('torch', NA)} and transformers {anchor.get('transformers', NA)} from PyPI "
      f"(Python {anchor.get('python', NA)}), {anchor.get('threads', NA)} threads, CPU capability "
      f"{anchor.get('cpu_capability', NA)}, transformers attention `{anchor.get('attn_implementation', NA)}`; "
      f"venv {anchor.get('venv', NA)} ({inst.get('method', NA)}; {fmt(inst.get('mib'), '.0f', ' MiB')}, "
      f"made in {fmt(inst.get('seconds'), '.0f', ' s')} on {inst.get('date', NA)})")
load = os.environ.get("MLA_BENCH_LOAD", "").split("|")
if len(load) == 2:
    print(f"- load average (1, 5, 15 min) of the {sh('nproc')}-core machine: {load[0]} before the run, {load[1]} after (the run itself adds about its thread count)")
print(f"- timing: every row is a median over repeated calls after warm-up (anchor: {anchor.get('reps', NA)} timed "
      f"calls after 2 warm-ups, the absorbed decode 5x as many); the machine is shared, so repeated runs move\n")

print("## Ceilings measured in the same run\n")
print("| ceiling | mla's measurement | torch's measurement |")
print("|---|---|---|")
for d in ("bf16", "f32"):
    print(f"| {d} GEMM 2048³ | {fmt(ceil.get(f'gemm_{d}_gflops'), '.0f', ' GFLOP/s')} | "
          f"{fmt(anchor.get(f'gemm_{d}_gflops'), '.0f', ' GFLOP/s')} |")
for k, v in ceil.items():  # ceilings that a newer `mla bench` adds (e.g. other precision paths)
    if k not in ("gemm_bf16_gflops", "gemm_f32_gflops", "copy_gbps") and num(v):
        print(f"| {k} | {v:.4g} | |")
print(f"| copy, read + write | {fmt(ceil.get('copy_gbps'), '.1f', ' GB/s')} | {fmt(anchor.get('copy_gbps'), '.1f', ' GB/s')} |")
print(f"\nBest GEMM rate of any precision in this run: {fmt(best_gemm, '.0f', ' GFLOP/s')} ({best_gemm_name}); "
      f"copy bandwidth: {fmt(best_copy, '.1f', ' GB/s')} (the higher of the two measurements).\n")


def mla_cell(r, kind):
    """ms and rate of an mla row, rate against this run's ceilings (computed here from the row's own counts)."""
    if not r or num(r.get("ms")) is None:
        return NA
    ms = r["ms"]
    if kind == "flops" and num(r.get("gflops")):
        rate = r["gflops"]
        share = f", {100 * rate / best_gemm:.0f}% of best GEMM" if best_gemm else ""
        return f"{ms:.1f} ms ({rate:.0f} GFLOP/s{share})"
    if kind == "bytes" and num(r.get("gbps")):
        share = f", {100 * r['gbps'] / best_copy:.0f}% of copy" if best_copy else ""
        return f"{ms:.3f} ms ({r['gbps']:.1f} GB/s{share})"
    return f"{ms:.3f} ms"


def anchor_cell(ms, r=None):
    if num(ms) is None:
        return NA
    if r and num(r.get("gflops")) and num(r.get("ms")):  # the same FLOP count as mla's row
        return f"{ms:.1f} ms ({r['gflops'] * r['ms'] / ms:.0f} GFLOP/s)"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


T, L = anchor.get("tokens", NA), anchor.get("context", NA)
print("## Results, same run\n")
print("| work | precision | mla | anchor | anchor time | mla speedup |")
print("|---|---|---|---|---|---|")
hf_name = "transformers `DeepseekV3Attention`"
for d in ("bf16", "f32"):
    p, dl, de = rows.get(("prefill", d)), rows.get(("decode_latent", d)), rows.get(("decode_reexpand", d))
    a_p, a_abs, a_hf = (anchor.get(f"{k}_{d}_ms") for k in ("prefill", "decode_absorbed", "decode_hf"))
    print(f"| prefill {T} tokens | {d} | {mla_cell(p, 'flops')} | {hf_name} | {anchor_cell(a_p, p)} | "
          f"{ratio(a_p, p and p.get('ms'))} |")
    print(f"| decode step, context {L}; mla: absorbed, latent cache | {d} | {mla_cell(dl, 'bytes')} | "
          f"absorbed decode step in eager torch | {anchor_cell(a_abs)} | {ratio(a_abs, dl and dl.get('ms'))} |")
    print(f"| decode step, context {L}; mla: absorbed, latent cache | {d} | {mla_cell(dl, 'bytes')} | "
          f"{hf_name} decode step (DynamicCache; re-expands the cache) | {anchor_cell(a_hf)} | "
          f"{ratio(a_hf, dl and dl.get('ms'))} |")
    print(f"| decode step, context {L}; mla: re-expanding the cache too | {d} | {mla_cell(de, 'plain')} | "
          f"{hf_name} decode step | {anchor_cell(a_hf)} | {ratio(a_hf, de and de.get('ms'))} |")

print("\n## Targets (issue 9), this run\n")
for what, key, work, goal in (("prefill, bf16, against transformers", "prefill", "prefill", 3.0),
                              ("decode, bf16, against eager absorbed decode", "decode_absorbed", "decode_latent", 2.0)):
    a_ms, r = anchor.get(f"{key}_bf16_ms"), rows.get((work, "bf16"))
    if num(a_ms) and r and num(r.get("ms")):
        s = a_ms / r["ms"]
        print(f"- mla {what}: {s:.2f}x (target ≥ {goal:.0f}x): {'met' if s >= goal else 'not met'}")
    else:
        print(f"- mla {what}: {NA} (target ≥ {goal:.0f}x)")

print("\n## Checks in the anchor (relative Frobenius error of the outputs, same random weights)\n")
checks = anchor.get("checks", {}) if isinstance(anchor.get("checks"), dict) else {}
labels = {"absorbed_vs_transformers_decode": f"eager absorbed decode vs transformers' decode step (context {L})",
          "mla_forward_vs_transformers": "`mla forward` (56 tokens prefill + 8 absorbed decode steps) vs transformers "
                                         "in float64"}
for k, v in checks.items():
    base, _, d = k.rpartition("_")
    print(f"- {labels.get(base, base)}, {d}: {fmt(v, '.2e')}")
if not checks:
    print(f"- {NA}")
print(f"- all within tolerance (f32 1e-4, bf16 3e-2): {'yes' if anchor.get('checks_passed') else 'no'}")

print("\n## mla bench output\n")
print("```")
print(text.strip())
print("```")
print("\n## Anchor output\n")
print("```json")
print(json.dumps(anchor, indent=1))
print("```")
