#!/usr/bin/env bash
# Configures and builds into build/ (CUDA when nvcc is found; MLA_WITH_CUDA=OFF|ON overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
args=(-DCMAKE_BUILD_TYPE=Release)
[ -n "${MLA_WITH_CUDA:-}" ] && args+=(-DMLA_WITH_CUDA="$MLA_WITH_CUDA")
cmake -S . -B build "${args[@]}" >/dev/null
cmake --build build -j"$(nproc)"
