#!/usr/bin/env bash
# Writes a copy of the registry's candle-core 0.11.1 to $1/candle-core with cudarc switched
# from `dynamic-linking` + `cuda-version-from-build-system` to `dynamic-loading` + `cuda-13000`,
# and with a backward pass that stores first gradients (patch_backprop.py).
# Why: upstream's choice needs every CUDA library (cublas, curand, nvrtc, ...) at link time;
# with dynamic loading the binary dlopens them on the GPU machine, so it builds here with
# nothing but nvcc. The copy is generated, never committed, and used only through
# `cargo --config patch...` by tools/cuda/build.sh, so CPU builds never see it.
set -euo pipefail
out=${1:?usage: patch-candle.sh OUT_DIR}
version=0.11.1
cargo_home=${CARGO_HOME:-$HOME/.cargo}

# The registry source comes from the lock file's checksum-verified download.
cargo fetch --locked >/dev/null
src=""
for d in "$cargo_home"/registry/src/*/candle-core-$version; do
  [[ -f $d/Cargo.toml ]] && src=$d && break
done
[[ -n $src ]] || { echo "patch-candle: candle-core-$version not in $cargo_home/registry/src" >&2; exit 1; }

rm -rf "$out/candle-core.tmp"
mkdir -p "$out"
cp -r "$src" "$out/candle-core.tmp"
toml=$out/candle-core.tmp/Cargo.toml
# Edit only inside the [dependencies.cudarc] table, and check that both edits happened.
python3 - "$toml" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
m = re.search(r'\[dependencies\.cudarc\]\n(.*?)(?=\n\[)', text, re.S)
if not m:
    sys.exit("patch-candle: no [dependencies.cudarc] table")
table = m.group(1)
new = table.replace('"cuda-version-from-build-system"', '"cuda-13000"').replace('"dynamic-linking"', '"dynamic-loading"')
for want in ('"cuda-13000"', '"dynamic-loading"'):
    if want not in new or new.count(want) != 1:
        sys.exit(f"patch-candle: expected one {want} after patching, table was:\n{table}")
open(path, "w").write(text[:m.start(1)] + new + text[m.end(1):])
PY
# The backward pass stores the first gradient instead of adding it into zeros (the script says
# why and checks the rules it rewrites).
python3 "$(dirname "$0")/patch_backprop.py" "$out/candle-core.tmp/src/backprop.rs"
# Keep an identical earlier copy: fresh mtimes would make cargo rebuild candle-core, candle-nn
# and everything above them on every `make build-cuda`.
if diff -rq "$out/candle-core.tmp" "$out/candle-core" >/dev/null 2>&1; then
  rm -rf "$out/candle-core.tmp"
else
  rm -rf "$out/candle-core"
  mv "$out/candle-core.tmp" "$out/candle-core"
fi
echo "$out/candle-core"
