#!/usr/bin/env bash
# `make check-candle-patch`: the CUDA build's patched candle-core checked on the CPU, where the
# registry's is the reference (the backward-pass rewrite of patch_backprop.py is the same code
# on every device; only the kernels differ).
#   1. candle-core's own gradient, custom-op, convolution and tensor tests on the patched copy;
#   2. one training step of the PRESET (default paper: ResNet-50, full decoder) at
#      PAIRS x HEIGHT x WIDTH on both builds: every parameter gradient must be equal, and each
#      build's median forward and backward seconds are printed.
# PRESET, PAIRS, HEIGHT, WIDTH, REPEATS and SET (config overrides) pick the step. candle-core's
# tests build in target-patched/, the example in target/ (both candle-cores side by side).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
preset=${PRESET:-paper}
pairs=${PAIRS:-2}
height=${HEIGHT:-128}
width=${WIDTH:-256}
repeats=${REPEATS:-3}
# Config overrides (the paper's 6 subcrops of 192 px take 15 GB on the CPU at this size).
read -r -a overrides <<< "${SET:-augment.subcrops.size=64}"
tdir=$root/target-patched
patched=$(tools/cuda/patch-candle.sh "$root/target-cuda/patched")

# The patch rewrites candle-core's entry in Cargo.lock: keep the committed lock as it is.
mkdir -p "$tdir"
cp Cargo.lock "$tdir/Cargo.lock.keep"
trap 'cp "$tdir/Cargo.lock.keep" "$root/Cargo.lock"' EXIT

echo "== candle-core's tests on $patched"
cargo test --release --manifest-path "$patched/Cargo.toml" --target-dir "$tdir/candle" \
  --test grad_tests --test custom_op_tests --test conv_tests --test tensor_tests

echo "== one $preset step, $pairs pairs at ${height}x$width (${overrides[*]}), registry candle-core then patched"
# Both builds share target/: the patched candle-core is another package to cargo, so it and
# everything above it get their own artifacts beside the registry build's; only the example's
# binary is shared, hence the copies.
cargo build --release -p poodle-train --example backward_check
cp target/release/examples/backward_check "$tdir/backward_check-registry"
cargo build --release -p poodle-train --example backward_check \
  --config "patch.crates-io.candle-core.path=\"$patched\""
cp target/release/examples/backward_check "$tdir/backward_check-patched"
grads=$tdir/registry-grads.safetensors
step=("$preset" "$pairs" "$height" "$width" "$repeats")
"$tdir/backward_check-registry" "${step[@]}" --write "$grads" "${overrides[@]}"
"$tdir/backward_check-patched" "${step[@]}" --compare "$grads" "${overrides[@]}"
echo "check-candle-patch: the patched candle-core passes candle's tests and gives the same gradients"
