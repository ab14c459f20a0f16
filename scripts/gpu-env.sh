# Sourced by the GPU scripts on the device machine: $OUT for results, and the build dependencies (oneDNN,
# nlohmann-json, CLI11, GoogleTest) unpacked from .deps/debs into .deps/root, never into / ($root, LD_LIBRARY_PATH).
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
root=$PWD/.deps/root
if [[ -d .deps/debs ]]; then
  mkdir -p "$root"
  for f in .deps/debs/*.deb; do dpkg -x "$f" "$root"; done
  export LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
