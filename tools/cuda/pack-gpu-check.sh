#!/usr/bin/env bash
# `make gpu-check`: dist/gpu-check.tar.xz for a GPU machine without Rust: the stripped
# poodle-train of one compute capability (GPU_CHECK_CAP, default 90: the device tool lends
# H100s and H200s, cap 9.0; from dist/cuda-sm<cap>/, `make build-cuda`), tools/cuda/
# gpu-check.sh and the PyTorch baselines. poodle-prep and other caps stay out: unused there,
# and the tarball travels with the working tree under the device tool's 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
cap=${GPU_CHECK_CAP:-90}
stage=dist/gpu-check
tarball=dist/gpu-check.tar.xz
rm -rf "$stage" "$tarball"
src=dist/cuda-sm$cap
[[ -x $src/poodle-train ]] || { echo "gpu-check: no $src/poodle-train: run make build-cuda CUDA_CAPS=$cap" >&2; exit 1; }
mkdir -p "$stage/bin/sm$cap"
cp "$src/poodle-train" "$src/build-time.txt" "$stage/bin/sm$cap/"
baseline=${TORCH_BASELINE:-../shared/bench/torch_poodle_step.py}
[[ -f $baseline ]] || { echo "gpu-check: PyTorch baseline $baseline not found (TORCH_BASELINE=...)" >&2; exit 1; }
cp tools/cuda/gpu-check.sh bench/torch_trunk.py bench/torch_dense_loss.py bench/gpu_check_report.py "$baseline" "$stage/"
# The commit the results belong to; -dirty when the tree had uncommitted changes (the binary's
# own POODLE_GIT_SHA says the same, build.rs). The report uses it when the binary wrote none.
git describe --always --dirty > "$stage/GIT_SHA" 2>/dev/null || echo unknown > "$stage/GIT_SHA"
tar -C dist -cf - gpu-check | xz -T0 -9 > "$tarball"
rm -rf "$stage"
size=$(stat -c %s "$tarball")
# What travels to the device machine: the working tree (tracked and untracked, not ignored)
# plus the carried tarball, 64 MiB at most.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
echo "gpu-check: $tarball $size bytes, sm$cap; with the working tree (${tree:-?} bytes): $((size + ${tree:-0})) of the device tool's $limit" >&2
if ((size + ${tree:-0} > limit - 4 * 1024 * 1024)); then
  echo "gpu-check: $tarball plus the working tree leave under 4 MiB of the device tool's 64 MiB carry limit: it may not travel" >&2
  exit 1
fi
echo "on the GPU machine (the device tool's call, docs/cuda.md): tar -xJf $tarball -C /tmp && bash /tmp/gpu-check/gpu-check.sh" >&2
