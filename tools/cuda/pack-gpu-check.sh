#!/usr/bin/env bash
# `make gpu-check`: dist/gpu-check.tar.xz with the stripped CUDA binaries of every built
# compute capability (dist/cuda-sm*/, from `make build-cuda`), tools/cuda/gpu-check.sh and
# the PyTorch baselines, for a GPU machine without Rust.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=dist/gpu-check
rm -rf "$stage" dist/gpu-check.tar.xz
mkdir -p "$stage/bin"
found=0
for d in dist/cuda-sm*; do
  [[ -x $d/poodle-train ]] || continue
  cap=${d#dist/cuda-}
  mkdir -p "$stage/bin/$cap"
  cp "$d/poodle-train" "$d/poodle-prep" "$d/build-time.txt" "$stage/bin/$cap/"
  found=1
done
[[ $found == 1 ]] || { echo "gpu-check: no dist/cuda-sm*/poodle-train: run make build-cuda" >&2; exit 1; }
baseline=${TORCH_BASELINE:-../shared/bench/torch_poodle_step.py}
[[ -f $baseline ]] || { echo "gpu-check: PyTorch baseline $baseline not found (TORCH_BASELINE=...)" >&2; exit 1; }
cp tools/cuda/gpu-check.sh bench/torch_trunk.py bench/torch_dense_loss.py bench/gpu_check_report.py "$baseline" "$stage/"
git rev-parse HEAD > "$stage/GIT_SHA" 2>/dev/null || true
tar -C dist -cf - gpu-check | xz -T2 -6 > dist/gpu-check.tar.xz
ls -l dist/gpu-check.tar.xz
echo "on the GPU machine: tar -xJf gpu-check.tar.xz && gpu-check/gpu-check.sh" >&2
