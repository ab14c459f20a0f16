#!/usr/bin/env bash
# Fresh machine -> all tests: installs what is missing, builds, runs ctest (C++) and pytest (Python package).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 600)
if [ -x scripts/python-tests.sh ]; then
  scripts/python-tests.sh
fi
