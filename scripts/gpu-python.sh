#!/usr/bin/env bash
# The Python package on the GPU machine: builds the extension with CUDA (the image has nanobind,
# scikit-build-core, torch and transformers) and runs python/tests, the CUDA and transformers tests included.
# Build dependencies come from .deps/debs as in scripts/gpu.sh. Log in $OUT/python.log.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
t0=$(date +%s)
MLA_WITH_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/mla-site \
  -C cmake.define.CMAKE_PREFIX_PATH="$root/usr" -C cmake.define.MLA_CUDA_GENCODE=90a -C build-dir=build-gpu-py . \
  >"$OUT/python-build.log" 2>&1 || { tail -30 "$OUT/python-build.log"; exit 1; }
echo "python build: $(( $(date +%s) - t0 )) s"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
export NCCL_NVLS_ENABLE=0  # NVLink multicast off for test_nccl_python's communicators (docs/parallel.md)
PYTHONPATH=/tmp/mla-site python3 -m pytest python/tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/python.log" | tail -15
exit "${PIPESTATUS[0]}"
