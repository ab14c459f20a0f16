#!/usr/bin/env bash
# The one GPU command: builds mla with CUDA (library, tests, benchmark, Python extension), builds the same-run
# anchors (FlashMLA's sm90 dense decode, FlashAttention-3's MLA decode) from the snapshots in the git-ignored
# .anchors/ folder in the background, runs the GPU tests (test_cuda, compute-sanitizer memcheck on a subset, the
# Python package's CUDA tests), then the benchmark: mla alone (mla-bench-cuda) and mla beside the anchors on
# identical tensors in CUDA graphs (bench/cuda/vs_anchors.py). The short tables come last; full logs and JSON go to
# $OUT (default ./gpu-out).
#
#   scripts/gpu.sh [all|test|bench|profile|nccl] [--quick]
#
# nccl: only the multi-GPU tests (tests/test_nccl.cpp: communicator, tensor- and context-parallel runs against one
# GPU; the two-GPU tests skip on one GPU), then, with 2+ GPUs, the multi-GPU benchmark (mla-bench-parallel:
# NCCL bus bandwidth, TP layer prefill/decode and CP decode against one GPU, same run; $OUT/parallel.json), all with
# NCCL_NVLS_ENABLE=0 (NVLink multicast stays off). `all` and `test` run the multi-GPU tests too.
# profile: Nsight Compute (clocks left alone) on the first sm90 decode and prefill launches of the quick bench.
# MLA_BENCH_ONLY=<substring> limits every benchmark table to the rows whose name contains it.
# MLA_NCU_CASE=<row name substring> adds Nsight Compute sections of mla's and the anchors' decode kernels on that row
# of bench/cuda/vs_anchors.py (to $OUT/ncu.txt).
#
# Build dependencies missing on the GPU machine (oneDNN and its OpenCL headers, nlohmann-json, CLI11, GoogleTest)
# come from .deb files in .deps/debs (docs/benchmarks.md says how to fetch them), unpacked into .deps/root, never
# into /. The anchors: .anchors/FlashMLA.tar.gz and .anchors/FA3.tar.gz, assembled as docs/benchmarks.md describes;
# without them the benchmark runs mla alone and prints no ratio.
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
# At most 8 files come back from the device machine: logs go to $LOGS and travel as one $OUT/logs.tgz.
LOGS=$(mktemp -d)
trap 'tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null' EXIT

# The anchors build while mla builds and its tests run (16 cores).
anchor_pids=()
if [[ "$what" == all || "$what" == bench ]]; then
  for a in FlashMLA FA3; do
    [[ -f .anchors/$a.tar.gz ]] || { echo "anchor $a: .anchors/$a.tar.gz not found, not built"; continue; }
    (
      t0=$(date +%s)
      cd .anchors && rm -rf "$a" && tar -xzf "$a.tar.gz" || exit 1
      if [[ $a == FlashMLA ]]; then cd FlashMLA && MAX_JOBS=4 python3 setup_dense.py build_ext --inplace
      else cd FA3/hopper && MAX_JOBS=4 python3 setup_mla.py build_ext --inplace; fi
      rc=$?
      echo "anchor $a build: rc $rc, $(( $(date +%s) - t0 )) s"
      exit $rc
    ) >"$LOGS/anchor-$a.log" 2>&1 &
    anchor_pids+=($!)
  done
fi

gen=""; command -v ninja >/dev/null && gen="-G Ninja"
t0=$(date +%s)
cmake -S . -B build-gpu $gen -DCMAKE_BUILD_TYPE=Release -DMLA_WITH_CUDA=ON -DMLA_BUILD_TESTS=ON -DMLA_BUILD_PYTHON=ON \
  -DPython_EXECUTABLE="$(command -v python3)" -DMLA_CUDA_GENCODE=90a -DMLA_CUDA_VERBOSE_PTXAS=ON \
  -DCMAKE_PREFIX_PATH="$root/usr" >"$LOGS/build.log" 2>&1 ||
  { tail -40 "$LOGS/build.log"; exit 1; }
targets=""
[[ "$what" == nccl ]] && targets="--target test_nccl mla_bench_parallel"  # no Python, no single-GPU benchmark
cmake --build build-gpu -j12 $targets >>"$LOGS/build.log" 2>&1 || { grep -B2 -A12 -E "error|Error" "$LOGS/build.log" | head -80; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -A2 -E "Compiling entry function '.*(decode_kernel|prefill_kernel)" "$LOGS/build.log" | grep -E "registers|spill" | head -6
# The Python package from this build: its .py files beside the extension the build made.
site=$PWD/build-gpu/site
[[ "$what" != nccl ]] && rm -rf "$site" && mkdir -p "$site" && cp -r python/mla "$site/" && cp build-gpu/python/mla/_mla*.so "$site/mla/"

status=0
# One gtest binary of build-gpu/tests under a time limit (a hung kernel must not eat the whole call: rc 124), its
# log in $LOGS/<log>, its summary printed; a failure sets status.
run_gtest() {  # binary, seconds, log file name
  local t0 rc
  t0=$(date +%s)
  timeout "$2" stdbuf -oL "./build-gpu/tests/$1" >"$LOGS/$3" 2>&1; rc=$?
  grep -E "FAILED|Failure|error|PASSED|SKIPPED \]|tests from .* ran" "$LOGS/$3" | head -40
  (( rc == 124 )) && { echo "$1 timed out; last lines:"; tail -3 "$LOGS/$3"; }
  echo "$1: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc == 0 )) || status=1
}
export NCCL_NVLS_ENABLE=0  # NVLink multicast off on the lent machines (docs/parallel.md)
if [[ "$what" == all || "$what" == test || "$what" == nccl ]]; then
  nvidia-smi topo -m 2>/dev/null | head -6
  run_gtest test_nccl "${MLA_NCCL_TEST_TIMEOUT:-300}" test_nccl.log
fi
if [[ "$what" == nccl ]] && (( $(nvidia-smi -L | wc -l) >= 2 )); then
  timeout "${MLA_NCCL_BENCH_TIMEOUT:-300}" ./build-gpu/mla-bench-parallel $quick --json "$OUT/parallel.json" \
    >"$OUT/parallel.txt" 2>&1 || status=1
  cat "$OUT/parallel.txt"
fi
if [[ "$what" == all || "$what" == test ]]; then
  run_gtest test_cuda "${MLA_TEST_TIMEOUT:-270}" test.log
  t0=$(date +%s)
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 ./build-gpu/tests/test_cuda --gtest_brief=1 \
    --gtest_filter='CudaDecode.SplitKvAndLongSequences:CudaDecode.FinerSplits:CudaDecode.Fp8SixteenRowKernelEdges:CudaDecode.GenericF32AndSmallDims:CudaPrefillBackward.GenericKernelsF32AndOtherHeadDims:CudaPrefillBackward.CausalVarlen:CudaPrefill.*:AllCases/CudaGolden.*v3_tiny_bf16_decode:Shapes/CudaLayerVsCpu.*h3_page16*bf16' \
    >"$LOGS/sanitizer.log" 2>&1; rc=$?
  grep -E "ERROR SUMMARY|FAILED|Invalid" "$LOGS/sanitizer.log" | head -10
  echo "memcheck: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc != 0 )) && status=1
  t0=$(date +%s)
  PYTHONPATH=$site timeout 150 python3 -m pytest python/tests/test_cuda.py python/tests/test_torch.py \
    python/tests/test_nccl_python.py python/tests/test_train.py::test_ops_path_forward_backward_captured_in_cuda_graph -q -p no:cacheprovider -rs \
    >"$LOGS/python.log" 2>&1; rc=$?
  tail -3 "$LOGS/python.log"
  echo "python GPU tests: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc != 0 )) && status=1
fi
if [[ "$what" == all || "$what" == bench ]]; then
  timeout 120 ./build-gpu/mla-bench-cuda $quick --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 || status=1
  for pid in "${anchor_pids[@]}"; do wait "$pid"; done
  for a in FlashMLA FA3; do [[ -f "$LOGS/anchor-$a.log" ]] && tail -1 "$LOGS/anchor-$a.log"; done
  export PYTHONPATH=$site:$PWD/.anchors/FlashMLA:$PWD/.anchors/FlashMLA/tests:$PWD/.anchors/FA3/hopper
  sections="grid decode prefill"
  [[ -n "$quick" ]] && sections="decode"
  timeout 160 python3 bench/cuda/vs_anchors.py --json "$OUT/anchors.json" $sections >"$OUT/anchors.txt" 2>"$LOGS/anchors.err" || status=1
  echo
  cat "$OUT/bench.txt"
  echo
  grep -h "^anchor " "$LOGS/anchors.err"
  sed -n '/^decode (same run/,$p' "$OUT/anchors.txt"
fi
if [[ -n "${MLA_NCU_CASE:-}" ]]; then
  # Nsight Compute on mla's and the anchors' decode kernels of one row of vs_anchors.py (clocks left alone).
  MLA_BENCH_ONLY="$MLA_NCU_CASE" ncu --clock-control none --kernel-name 'regex:seesaw|splitkv_mla|flash_fwd|combine' \
    --launch-skip 0 --launch-count 8 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section LaunchStats python3 bench/cuda/vs_anchors.py decode >"$OUT/ncu.txt" 2>&1
  grep -E "^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Shared Memory|Registers Per|Grid Size|Warp Cycles Per Issued|Issue Slots Busy|L1/TEX Hit|DRAM Throughput" \
    "$OUT/ncu.txt" | cut -c1-120 | head -90
fi
if [[ "$what" == profile ]]; then
  for k in 'regex:sm90.*decode_kernel' 'regex:sm90.*prefill_kernel'; do
    ncu --clock-control none --kernel-name "$k" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
      ./build-gpu/mla-bench-cuda --quick >>"$LOGS/ncu.txt" 2>&1
  done
  grep -vE "^\s*$|^==PROF==|^mla bench|^\(|^case|^work|^b[0-9]|^64-row|^imbal|^prefill|^decode" "$LOGS/ncu.txt" | cut -c1-110 | head -150
fi
exit $status
