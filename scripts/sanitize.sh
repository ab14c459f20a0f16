#!/usr/bin/env bash
# The C++ tests under the sanitizers, CPU only (CUDA off), with GCC:
#   asan  build-asan/: library, mla program and tests with -fsanitize=address,undefined -fno-sanitize-recover=all
#         (LeakSanitizer included), then ctest there: every test, the forced avx2 and scalar kernel variants.
#   tsan  build-tsan/: library and tests with -fsanitize=thread, then the gtest suite Threads (Threads.*) of every
#         test binary that defines it. Fails when no Threads test ran: the suite is the point of this build.
#
#   scripts/sanitize.sh [asan] [tsan]      (default: both)
#
# OpenMP under TSan: GCC's libgomp (and oneDNN's threads, which are libgomp's here) is not built with TSan, so its
# barriers and its thread pool's hand-offs are invisible to TSan and every parallel region reports races that are
# not there. The Threads tests therefore run with OMP_NUM_THREADS=1: each OpenMP region then runs on the calling
# thread and libgomp creates no threads, while the threads the tests start themselves (std::thread) are fully
# checked. What this leaves unchecked: races between the OpenMP workers inside one parallel region, which the
# kernels avoid by construction (each worker writes disjoint output rows) and the ASan build exercises.
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(asan tsan)
for m in "${modes[@]}"; do
  case $m in asan | tsan) ;; *) echo "usage: $0 [asan] [tsan]" >&2; exit 2 ;; esac
done
scripts/setup.sh
jobs=$(nproc)

configure() {  # build dir, sanitizer flags, extra cmake args
  local dir=$1 flags=$2
  shift 2
  CC=gcc CXX=g++ cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMLA_WITH_CUDA=OFF \
    -DCMAKE_CXX_FLAGS="$flags -fno-omit-frame-pointer" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
    -DCMAKE_SHARED_LINKER_FLAGS="$flags" "$@" >/dev/null
}

asan() {
  local start
  start=$(date +%s)
  configure build-asan "-fsanitize=address,undefined -fno-sanitize-recover=all"
  cmake --build build-asan -j"$jobs"
  echo "sanitize: asan built in $(( $(date +%s) - start )) s"
  start=$(date +%s)
  # Left out by name: install_consumer builds a separate project against the installed library with plain flags
  # (it cannot link an ASan-instrumented libmla.a) and tests packaging, not memory. The forced avx512/ and
  # avx512-bf16/ runs repeat the plain runs on a CPU whose best variant they are, and are skipped on a CPU without
  # them (on an AVX512-BF16 CPU the plain AVX-512 kernels then go unchecked here); they were 17% of the ASan test
  # time (docs/testing.md). The forced avx2/ and scalar/ runs stay: on an AVX-512 machine nothing else takes them.
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1 \
     UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j"$jobs" --timeout 1200 \
     -E '^install_consumer$|^avx512(-bf16)?/')
  echo "sanitize: asan tests passed in $(( $(date +%s) - start )) s"
}

tsan() {
  local start
  start=$(date +%s)
  # The test binaries that define the Threads suite (tests/CMakeLists.txt names each test_<file> after its file).
  local targets=()
  for f in tests/test_*.cpp; do
    grep -Eq '^ *TEST(_F|_P)? *\( *Threads *,' "$f" && targets+=("$(basename "$f" .cpp)")
  done
  if [ ${#targets[@]} -eq 0 ]; then
    echo "sanitize: tsan: no test file defines the gtest suite Threads (TEST(Threads, ...)); nothing to check" >&2
    return 1
  fi
  configure build-tsan "-fsanitize=thread" -DMLA_BUILD_TOOLS=OFF
  cmake --build build-tsan -j"$jobs" --target "${targets[@]}"
  echo "sanitize: tsan built ${targets[*]} in $(( $(date +%s) - start )) s"
  start=$(date +%s)
  local ran=0 log n
  for t in "${targets[@]}"; do
    log=build-tsan/$t.threads.log
    # OMP_NUM_THREADS=1: see the top of this file. halt_on_error: the first race fails the run.
    if ! OMP_NUM_THREADS=1 TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
         "build-tsan/tests/$t" --gtest_filter='Threads.*' 2>&1 | tee "$log"; then
      echo "sanitize: tsan: $t failed (log: $log)" >&2
      return 1
    fi
    n=$(sed -n 's/^\[==========\] \([0-9]*\) tests\{0,1\} from .* ran\..*/\1/p' "$log" | tail -1)
    ran=$(( ran + ${n:-0} ))
  done
  if [ "$ran" -eq 0 ]; then
    echo "sanitize: tsan: no Threads test ran" >&2
    return 1
  fi
  echo "sanitize: tsan: $ran Threads tests passed in $(( $(date +%s) - start )) s"
}

for m in "${modes[@]}"; do
  "$m"
done
