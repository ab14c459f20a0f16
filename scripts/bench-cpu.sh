#!/usr/bin/env bash
# CPU benchmark of record: `mla bench` and the anchor (transformers' DeepseekV3Attention and an eager absorbed
# decode step in PyTorch, both from PyPI, in the venv that scripts/bench-venv.sh makes once and reuses) in one run,
# the same threads, written as bench/results/<date>-cpu-v2lite.md. Not part of the tests.
# Usage: scripts/bench-cpu.sh [extra mla bench flags]     Environment: MLA_BENCH_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/mla ] || scripts/build.sh
venv=$(scripts/bench-venv.sh)
threads=${MLA_BENCH_THREADS:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cut -d" " -f1-3 /proc/loadavg >"$tmp/load"  # the machine is shared: the report shows the load before and after
OMP_NUM_THREADS=$threads ./build/mla bench --json "$tmp/mla.json" "$@" | tee "$tmp/mla.txt"
# The anchor takes the shapes mla used (its rows carry them); it only knows the V2-Lite layer.
read -r preset tokens context < <(python3 -c 'import json, sys
j = json.load(open(sys.argv[1])); rows = j.get("rows", [])
get = lambda k, d: next((r[k] for r in rows if k in r), d)
print(j.get("preset", "v2-lite"), get("tokens", 1024), get("context", 4096))' "$tmp/mla.json")
if [ "$preset" != v2-lite ]; then
  echo "bench-cpu: the anchor has the v2-lite layer only, not $preset" >&2
  exit 1
fi
anchor=(bench/transformers_anchor.py --threads "$threads" --tokens "$tokens" --context "$context" --reps 7 --mla build/mla)
echo "anchor: ${anchor[*]} (torch and transformers from $venv)"
OMP_NUM_THREADS=$threads "$venv/bin/python" "${anchor[@]}" >"$tmp/anchor.json"
cut -d" " -f1-3 /proc/loadavg >>"$tmp/load"
out="bench/results/$(date -u +%F)-cpu-v2lite.md"
MLA_BENCH_LOAD="$(paste -sd'|' "$tmp/load")" \
  python3 bench/cpu_report.py "$tmp/mla.json" "$tmp/anchor.json" "$tmp/mla.txt" "$*" "${anchor[*]}" >"$tmp/report.md"
mv "$tmp/report.md" "$out"  # after the report read `git status`, so the old file does not mark the tree dirty
echo "wrote $out"
sed -n '/^## Results/,/^## Checks/p' "$out"
