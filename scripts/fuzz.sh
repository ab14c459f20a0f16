#!/usr/bin/env bash
# libFuzzer on the parsers of untrusted files (fuzz/: safetensors header and data offsets, the shard index,
# config.json): installs clang and its sanitizer runtimes when missing (setup.sh), builds the fuzzers with ASan
# and UBSan into build-fuzz/, then runs each for MLA_FUZZ_SECONDS (default 60) from its seed corpus
# fuzz/corpus/<target> (read only; inputs that reach new code go to build-fuzz/corpus/<target>).
#
#   scripts/fuzz.sh [safetensors] [index] [config]     (default: all three, one after the other)
#
# Exits non-zero when any target fails: a crash, a sanitizer report, an exception other than mla::Error, a leak,
# one input running over 10 s (-timeout) or the process over 2 GiB (-rss_limit_mb, which also bounds any single
# allocation). The input that failed is kept as build-fuzz/artifacts/<target>/crash-* (or leak-, timeout-, oom-),
# and the command that replays it is printed. Prints inputs tried, exec/s and coverage per target.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${MLA_FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors index config)
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_$t.cpp" ] || { echo "fuzz: no target '$t' (fuzz/fuzz_$t.cpp)" >&2; exit 2; }
done

MLA_SETUP_CLANG=1 scripts/setup.sh
start=$(date +%s)
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMLA_WITH_CUDA=OFF \
  -DMLA_BUILD_TESTS=OFF -DMLA_BUILD_TOOLS=OFF -DMLA_BUILD_FUZZERS=ON >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/#/fuzz_}"
echo "fuzz: built in $(( $(date +%s) - start )) s"

export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Debian installs only the versioned name; without a symbolizer the reports give addresses, not file:line.
[ -x /usr/bin/llvm-symbolizer-14 ] && export ASAN_SYMBOLIZER_PATH=${ASAN_SYMBOLIZER_PATH:-/usr/bin/llvm-symbolizer-14}
failed=()
summary=()
for t in "${targets[@]}"; do
  corpus=build-fuzz/corpus/$t
  artifacts=build-fuzz/artifacts/$t
  log=build-fuzz/logs/$t.log
  # fuzz_index.cpp makes its checkpoint folder under TMPDIR: kept inside the build tree, removed each run.
  tmp=build-fuzz/tmp/$t
  rm -rf "$artifacts" "$tmp"
  mkdir -p "$corpus" "$artifacts" "$tmp" "$(dirname "$log")"
  echo "fuzz: $t for $seconds s"
  rc=0
  TMPDIR=$PWD/$tmp "build-fuzz/fuzz/fuzz_$t" "$corpus" "fuzz/corpus/$t" -dict="fuzz/dict/$t.dict" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$artifacts/" \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
  line=$(printf '%-12s %10s inputs  %7s exec/s  %-22s peak %s MB' "$t" "${runs:-?}" "${rate:-?}" "${cov:-cov: ?}" \
         "${rss:-?}")
  if [ "$rc" != 0 ]; then
    failed+=("$t")
    summary+=("$line  FAILED (rc $rc)")
    echo "fuzz: $t FAILED (rc $rc); the end of $log:" >&2
    tail -60 "$log" >&2
    for a in "$artifacts"/*; do
      [ -f "$a" ] || continue
      echo "fuzz: failing input $a; replay: TMPDIR=/tmp build-fuzz/fuzz/fuzz_$t $a" >&2
    done
  else
    summary+=("$line  ok")
  fi
  rm -rf "$tmp"
done
echo "fuzz: summary ($seconds s each, $(nproc) cores):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: passed after $(( $(date +%s) - start )) s"
