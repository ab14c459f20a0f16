#!/usr/bin/env bash
# CPU benchmark of record: `mla bench` and the PyTorch eager anchor (Debian's python3-torch) in one run,
# written as bench/results/<date>-cpu-<preset>.md. Usage: scripts/bench-cpu.sh [extra mla bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/mla ] || scripts/build.sh
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "bench-cpu: installing python3-torch for the anchor"
  apt-get install -y -qq python3-torch >/dev/null
fi
tmp=$(mktemp -d)
OMP_NUM_THREADS=2 ./build/mla bench --json "$tmp/mla.json" "$@" | tee "$tmp/mla.txt"
/usr/bin/python3 bench/torch_anchor.py 1024 4096 7 > "$tmp/torch.json"
out="bench/results/$(date -u +%F)-cpu-v2lite.md"
/usr/bin/python3 bench/cpu_report.py "$tmp/mla.json" "$tmp/torch.json" "$tmp/mla.txt" "$*" > "$tmp/report.md"
mv "$tmp/report.md" "$out"  # after the report read `git status`, so the old file does not mark the tree dirty
echo "wrote $out"
cat "$out" | sed -n '/^| work/,/^$/p'
