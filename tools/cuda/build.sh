#!/usr/bin/env bash
# `make build-cuda`: poodle-train (feature `cuda`) and poodle-prep built on a machine without a
# GPU or CUDA toolkit, for GPU machines without Rust. Recipe and reasons: ../shared/GPU.md.
#   CUDA_CAPS="90 80"  one build per compute capability (candle-kernels compiles its PTX and
#                      its static MoE library for a single cap per build), each in its own
#                      target dir so that switching caps never rebuilds the other.
# Output: dist/cuda-sm<cap>/{poodle-train,poodle-prep} (stripped) and build-time.txt (appended).
# `build.sh clippy` (`make clippy-cuda`): cargo clippy -D warnings on the CUDA code instead,
# first cap only, in the same target dir (the dependencies' build scripts are reused).
set -euo pipefail
mode=${1:-build}
cd "$(dirname "$0")/../.."
root=$PWD
venv=${CUDA_VENV:-$root/.venv-cuda}
caps=${CUDA_CAPS:-90 80}
tdir=$root/target-cuda

# 1. nvcc 13.0 from PyPI at pinned versions (tools/cuda/requirements-nvcc.txt).
if [[ ! -f $venv/.ok || tools/cuda/requirements-nvcc.txt -nt $venv/.ok ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tools/cuda/requirements-nvcc.txt
  touch "$venv/.ok"
fi
cu=$(echo "$venv"/lib/python3.*/site-packages/nvidia/cu13)
[[ -x $cu/bin/nvcc ]] || { echo "build-cuda: no nvcc in $cu" >&2; exit 1; }
export CUDA_ROOT=$cu CUDA_HOME=$cu CUDA_PATH=$cu NVCC=$cu/bin/nvcc PATH=$cu/bin:$PATH
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}

# 2. candle-core with cudarc's dynamic loading, generated from the registry source.
patched=$(tools/cuda/patch-candle.sh "$tdir/patched")

# 3. candle-kernels' MoE library links -lcudart; the wheel ships only libcudart.so.13.
mkdir -p "$tdir/link"
ln -sf "$cu/lib/libcudart.so.13" "$tdir/link/libcudart.so"
export RUSTFLAGS="-L native=$tdir/link"

# The patch rewrites candle-core's entry in Cargo.lock: keep the committed lock as it is.
cp Cargo.lock "$tdir/Cargo.lock.keep"
trap 'cp "$tdir/Cargo.lock.keep" "$root/Cargo.lock"' EXIT

if [[ $mode == clippy ]]; then
  cap=${caps%% *}
  CUDA_COMPUTE_CAP=$cap cargo clippy --release -p poodle-train -p poodle-prep \
    --features poodle-train/cuda \
    --config "patch.crates-io.candle-core.path=\"$patched\"" \
    --target-dir "$tdir/sm$cap" -- -D warnings
  exit 0
fi

for cap in $caps; do
  start=$(date +%s)
  # A new cap starts from another cap's target dir when there is one: only candle-kernels
  # (whose build script reruns on a new CUDA_COMPUTE_CAP) and the crates above it rebuild.
  if [[ ! -d $tdir/sm$cap ]]; then
    for other in "$tdir"/sm*; do
      [[ -d $other/release ]] && { cp -a "$other" "$tdir/sm$cap"; break; }
    done
  fi
  CUDA_COMPUTE_CAP=$cap cargo build --release -p poodle-train -p poodle-prep \
    --features poodle-train/cuda \
    --config "patch.crates-io.candle-core.path=\"$patched\"" \
    --target-dir "$tdir/sm$cap"
  secs=$(( $(date +%s) - start ))
  out=dist/cuda-sm$cap
  mkdir -p "$out"
  for bin in poodle-train poodle-prep; do
    strip -o "$out/$bin" "$tdir/sm$cap/release/$bin"
  done
  # Appended: the file keeps the cold build's time beside later incremental ones.
  echo "sm_$cap: cargo build ${secs}s on $(nproc) cores ($(date -u '+%F %H:%M UTC')), $(du -sh "$out" | cut -f1) stripped" \
    | tee -a "$out/build-time.txt"
done
