#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test mla (run as root, or with sudo available).
# The C++ build (demo.sh, test.sh): CMake, GCC, make, and the libraries' Debian packages (oneDNN's CMake package
# needs OpenCL's). MLA_SETUP_PYTHON=1 (python-tests.sh) adds Python with venv and headers, and the CA
# certificates that pip needs to reach PyPI over HTTPS. MLA_SETUP_CLANG=1 (fuzz.sh) adds clang 14 with its
# libFuzzer and sanitizer runtimes (libclang-rt-14-dev), its OpenMP (libomp-14-dev: the top-level
# find_package(OpenMP) needs it under clang) and llvm-14 (llvm-symbolizer-14: file:line in sanitizer reports).
# scripts/fresh-root-check.sh proves the base list on a minimal Debian 12 root.
set -euo pipefail
packages=(cmake g++ make libdnnl-dev ocl-icd-opencl-dev nlohmann-json3-dev libcli11-dev libgtest-dev)
[ "${MLA_SETUP_PYTHON:-0}" = 1 ] && packages+=(python3 python3-venv python3-dev ca-certificates)
[ "${MLA_SETUP_CLANG:-0}" = 1 ] && packages+=(clang libclang-rt-14-dev libomp-14-dev llvm-14)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}"
  start=$(date +%s)
  log=$(mktemp)
  # dpkg's unpacking chatter goes to a log, shown when something fails; apt's errors reach stderr.
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
         --no-install-recommends "${missing[@]}"; } >"$log"; then
    tail -30 "$log"
    rm -f "$log"
    echo "setup: apt-get failed" >&2
    exit 1
  fi
  rm -f "$log"
  echo "setup: installed in $(( $(date +%s) - start )) s"
fi
