#!/usr/bin/env bash
# Builds the CUDA backend on the GPU machine, runs its tests (goldens on "cuda" in f32 and bf16 through every
# feed, cuda vs cpu on random shapes and adversarial caches), compute-sanitizer memcheck on a subset, then the
# benchmark; the short tables come last. Full logs and bench JSON go to $OUT (default ./gpu-out).
#
#   scripts/gpu.sh [all|test|bench|profile] [--quick]
#
# profile: Nsight Compute (clocks left alone) on the first sm90 decode and prefill launches of the quick bench.
#
# Missing build dependencies (oneDNN, nlohmann-json, CLI11, GoogleTest) come from .deb files in .deps/debs
# (fetched on a networked machine with `apt-get download libdnnl2 libdnnl-dev nlohmann-json3-dev libcli11-dev
# libgtest-dev googletest`), unpacked into .deps/root, never into /.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
quick=""
[[ "${2:-}" == "--quick" ]] && quick="--quick"
source scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# MLA_COMMIT first: the device copy of the tree may carry a stale .git
commit=${MLA_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
echo "commit $commit (+ working tree)" | tee -a "$OUT/gpu.txt"

gen=""; command -v ninja >/dev/null && gen="-G Ninja"
t0=$(date +%s)
cmake -S . -B build-gpu $gen -DCMAKE_BUILD_TYPE=Release -DMLA_WITH_CUDA=ON -DMLA_BUILD_TESTS=ON \
  -DMLA_CUDA_GENCODE=90a -DMLA_CUDA_VERBOSE_PTXAS=ON -DCMAKE_PREFIX_PATH="$root/usr" >"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
cmake --build build-gpu -j16 >>"$OUT/build.log" 2>&1 || { grep -B2 -A12 -E "error|Error" "$OUT/build.log" | head -80; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -A2 -E "Compiling entry function '.*(decode_kernel|prefill_kernel)" "$OUT/build.log" | grep -E "registers|spill" | head -6

status=0
if [[ "$what" == all || "$what" == test ]]; then
  t0=$(date +%s)
  ./build-gpu/tests/test_cuda --gtest_brief=1 >"$OUT/test.log" 2>&1; rc=$?
  grep -E "FAILED|Failure|error|PASSED|SKIPPED \]" "$OUT/test.log" | head -40
  echo "test_cuda: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc != 0 )) && status=1
  t0=$(date +%s)
  compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu/tests/test_cuda --gtest_brief=1 \
    --gtest_filter='CudaDecode.SplitKvAndLongSequences:CudaDecode.GenericF32AndSmallDims:CudaPrefill.*:AllCases/CudaGolden.*v3_tiny_bf16_decode:Shapes/CudaLayerVsCpu.*h3_page16*bf16' \
    >"$OUT/sanitizer.log" 2>&1; rc=$?
  grep -E "ERROR SUMMARY|FAILED|Invalid" "$OUT/sanitizer.log" | head -10
  echo "memcheck: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc != 0 )) && status=1
fi
if [[ "$what" == all || "$what" == bench ]]; then
  ./build-gpu/mla-bench-cuda $quick --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
fi
if [[ "$what" == profile ]]; then
  for k in 'regex:sm90.*decode_kernel' 'regex:sm90.*prefill_kernel'; do
    ncu --clock-control none --kernel-name "$k" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
      ./build-gpu/mla-bench-cuda --quick >>"$OUT/ncu.txt" 2>&1
  done
  grep -vE "^\s*$|^==PROF==|^mla bench|^\(|^case|^work|^b[0-9]|^FlashMLA|^64-row|^imbal|^prefill|^decode" "$OUT/ncu.txt" | cut -c1-110 | head -150
fi
exit $status
