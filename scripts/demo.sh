#!/usr/bin/env bash
# Fresh machine -> `mla demo`: installs what is missing, builds, runs the demo on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MLA_WITH_CUDA=${MLA_WITH_CUDA:-OFF} scripts/build.sh
./build/mla demo "$@"
