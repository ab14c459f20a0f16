#!/usr/bin/env bash
# The CPU anchor's virtual environment: torch and transformers from PyPI, made once and reused while the pinned
# versions and the Python version match (a stamp file inside says what it holds). Prints the venv's path.
# Not part of the tests: only scripts/bench-cpu.sh uses it.
#
# PyPI's Linux torch wheel is the CUDA build: libtorch_cpu.so and libtorch_python.so link libcudart, libcupti,
# libcudnn, libcublas, libnccl, ... so `import torch` fails without the nvidia-* wheels even on a CPU-only machine,
# and no CPU-only torch 2.x wheel is on PyPI. What can go is what the CPU eager path never loads: triton (the GPU
# compiler, ~1 GB), cuda-bindings, and the cuSOLVER and NVTX parts of cuda-toolkit (cuSOLVER is only reached
# through libtorch_cuda_linalg.so, which torch loads lazily on a CUDA linear-algebra call). So: torch --no-deps,
# then torch's own requirements less those, then transformers. About 4.3 GB installed instead of 5.6 GB.
#
# Environment: MLA_BENCH_VENV (default ~/.cache/mla-bench-venv), MLA_BENCH_TORCH, MLA_BENCH_TRANSFORMERS
# (versions), PYTHON (the interpreter that makes the venv; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MLA_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mla-bench-venv}
torch_version=${MLA_BENCH_TORCH:-2.15.0}
transformers_version=${MLA_BENCH_TRANSFORMERS:-5.17.0}
python=${PYTHON:-python3}

if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  MLA_SETUP_PYTHON=1 scripts/setup.sh >&2
fi
want="torch==$torch_version transformers==$transformers_version python $("$python" -c 'import platform; print(platform.python_version())') cpu-light-1"
if [ "$(cat "$venv/mla-bench.stamp" 2>/dev/null)" = "$want" ]; then
  echo "$venv"
  exit 0
fi

echo "bench-venv: making $venv ($want); downloads about 2.5 GB" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
start=$(date +%s)
"$python" -m venv "$venv"
log="$venv/mla-bench-install.log"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
if ! {
  "${pip[@]}" install --no-deps "torch==$torch_version" &&
    mapfile -t reqs < <("$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import re

for req in md.requires("torch") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[\s\[<>=~!;]", req, maxsplit=1)[0].lower()
    if name in ("triton", "cuda-bindings"):
        continue
    drop = ("cusolver", "nvtx")
    req = re.sub(r"\[([^\]]*)\]", lambda m: "[" + ",".join(e for e in m.group(1).split(",") if e.strip() not in drop) + "]",
                 req, count=1)
    print(req)
EOF
    ) &&
    "${pip[@]}" install "${reqs[@]}" "transformers==$transformers_version" &&
    "$venv/bin/python" -c 'import torch, transformers; torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)'
} >"$log" 2>&1; then
  tail -20 "$log" >&2
  echo "bench-venv: install failed (log: $log)" >&2
  exit 1
fi
seconds=$(( $(date +%s) - start ))
mib=$(du -sm "$venv" | cut -f1)
"$venv/bin/python" - "$seconds" "$mib" "$torch_version" "$transformers_version" >"$venv/mla-bench-install.json" <<'EOF'
import datetime, json, sys
print(json.dumps({"seconds": int(sys.argv[1]), "mib": int(sys.argv[2]), "torch": sys.argv[3], "transformers": sys.argv[4],
                  "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}",
                  "method": "torch --no-deps from PyPI + its requirements less triton, cuda-bindings, cuSOLVER, NVTX"}))
EOF
echo "$want" >"$venv/mla-bench.stamp"
echo "bench-venv: made $venv in $seconds s, $mib MiB" >&2
echo "$venv"
