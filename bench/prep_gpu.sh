#!/usr/bin/env bash
# `make bench-prep-gpu`: writes out/bench-prep-gpu/, a self-contained bundle for the GPU
# machine (../shared/GPU.md: python3 with torch/torchvision/onnx, CUDA 13 + cuDNN 9, but no
# Rust, no ffmpeg, no internet), and prints how to run it there. It does not run the benchmark:
# the development machine has no GPU.
#
# Bundle: the release poodle-prep binary; ffmpeg/ffprobe with the shared libraries they load
# (from this machine); onnxruntime-gpu's libraries from PyPI (the wheel named by ORT_GPU_WHEEL,
# else `pip download onnxruntime-gpu==1.31.1`, 256 MB); the sample clips; the RubberWhale pair
# for the export check; tools/export_raft.py; bench/prep_gpu.py; run.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out/bench-prep-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"/{bin,lib,ort,video,flow,tools}
cargo build --release -p poodle-prep
cp "$ROOT/target/release/poodle-prep" "$OUT/"
strip "$OUT/poodle-prep" || true
for t in ffmpeg ffprobe; do
  cp "$(command -v $t)" "$OUT/bin/"
  # Every shared library but the C runtime, which the GPU machine has.
  ldd "$(command -v $t)" | awk '/=> \//{print $3}' | grep -vE '/lib(c|m|pthread|dl|rt)\.so' \
    | xargs -r -I{} cp -Ln {} "$OUT/lib/"
done
WHEEL=${ORT_GPU_WHEEL:-}
if [ -z "$WHEEL" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    onnxruntime-gpu==1.31.1 -d "$OUT/wheel"
  WHEEL=$(ls "$OUT"/wheel/onnxruntime_gpu-*.whl)
fi
cp "$WHEEL" "$OUT/" # the Python API for the ORT-alone baseline, installed there offline
"$PY" -m zipfile -e "$WHEEL" "$OUT/wheel-x"
cp "$OUT"/wheel-x/onnxruntime/capi/libonnxruntime*.so* "$OUT/ort/"
rm -rf "$OUT/wheel-x" "$OUT/wheel"
cp "$ROOT"/../shared/data/video/*.mp4 "$OUT/video/"
cp "$ROOT"/../shared/data/flow/rubberwhale{1,2}.png "$OUT/flow/"
cp "$ROOT/tools/export_raft.py" "$OUT/tools/"
cp "$ROOT/bench/prep_gpu.py" "$OUT/"
cat > "$OUT/run.sh" <<'RUN'
#!/usr/bin/env bash
# On the GPU machine: bash run.sh [prep_gpu.py options]; results in ./result/.
set -euo pipefail
B=$(cd "$(dirname "$0")" && pwd)
export PATH="$B/bin:$PATH"
export LD_LIBRARY_PATH="$B/lib:$B/ort:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
python3 -m venv --system-site-packages "$B/venv"
"$B/venv/bin/pip" install -q --no-deps --no-index "$B"/onnxruntime_gpu-*.whl
"$B/venv/bin/python" "$B/prep_gpu.py" --bundle "$B" --out "$B/result" "$@"
RUN
chmod +x "$OUT/run.sh"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1)); on the GPU machine: bash $(basename "$OUT")/run.sh"
