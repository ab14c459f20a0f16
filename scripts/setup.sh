#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test mla (run as root, or with sudo available).
set -euo pipefail
packages=(cmake g++ make libdnnl-dev ocl-icd-opencl-dev nlohmann-json3-dev libcli11-dev libgtest-dev)
[ "${MLA_SETUP_PYTHON:-0}" = 1 ] && packages+=(python3 python3-venv python3-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
