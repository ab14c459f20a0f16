#!/usr/bin/env bash
# The Python package's tests as a user meets them: a fresh virtual environment in build-venv/, `pip install .`
# (scikit-build-core + nanobind from PyPI, the C++ core compiled in), then pytest python/tests.
# NumPy only by default; tests that need torch or transformers skip. MLA_PY_TORCH=1 also installs torch and
# transformers (large downloads) so that those tests run. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

# A Debian python3 needs the venv module, the headers and CA certificates for pip (setup.sh installs them as root).
if ! "$python" -c 'import ensurepip, venv, sysconfig, ssl, os, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
         or ssl.get_default_verify_paths().cafile is None)' 2>/dev/null; then
  MLA_SETUP_PYTHON=1 scripts/setup.sh
fi

venv=build-venv
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q numpy pytest
if [ "${MLA_PY_TORCH:-0}" = 1 ]; then
  "${pip[@]}" install -q torch transformers
fi
start=$(date +%s)
"${pip[@]}" install -q .
echo "python-tests: pip install . took $(( $(date +%s) - start )) s"
# The repository root has no mla/ folder, so pytest imports the installed package.
"$venv/bin/python" -m pytest python/tests -q -p no:cacheprovider
