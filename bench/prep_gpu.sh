#!/usr/bin/env bash
# `make bench-prep-gpu`: writes out/bench-prep-gpu/, a self-contained bundle for the GPU
# machine (../shared/GPU.md: python3 with torch/torchvision/onnx, CUDA 13 + cuDNN 9, but no
# Rust, no ffmpeg, no internet), and prints how to run it there and its size. It does not run
# the benchmark: the development machine has no GPU.
#
# Bundle: the release poodle-prep binary; ffmpeg/ffprobe with the shared libraries they load
# (from this machine), each behind a wrapper that gives only them the bundled lib/ folder;
# the onnxruntime-gpu wheel from PyPI (ORT_GPU_WHEEL, else `pip download
# onnxruntime-gpu==1.31.1`), installed there with `pip --target` (the image's python3 is
# itself a venv, so a venv made from it would not see torch or numpy); poodle-prep loads the
# ORT library from that install, so the ORT payload travels once; the sample clips; the
# RubberWhale pair for the export check; tools/export_raft.py; bench/prep_gpu.py; run.sh.
#
# It does not fit the device tool in one call. That tool carries at most 64 MiB a call (the
# working tree and the carried paths together); this bundle is about 500 MB: the wheel alone
# is 256 MB (libonnxruntime_providers_cuda.so is 271 MiB unpacked, 186 MB even with xz), and
# ffmpeg's 200-odd shared libraries of this machine about 240 MB. What running it would take,
# none of it done here: (a) an ffmpeg built small (static, only the h264 decoder and the
# rawvideo/mp4 parts prep uses: a few MB instead of 240); (b) the wheel split into <= 60 MiB
# pieces carried over 5 or so back-to-back calls on one warm machine (ignored files already
# there are kept between calls, but the machine goes back after 30 s idle, and every call's
# transfer counts against the session's 15 minutes of device time), joined there, then run;
# or a session whose GPU machine has onnxruntime-gpu already. Shrinking ORT itself is out of
# scope.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out/bench-prep-gpu}
PY=${PY:-python3}
# Only the bundle's own parts are cleared (OUT may name a folder with other things in it);
# ort/ is the layout before the wheel was installed there.
rm -rf "$OUT"/{bin,lib,ort,site,video,flow,tools,result} "$OUT"/onnxruntime_gpu-*.whl
mkdir -p "$OUT"/{bin,lib,video,flow,tools}
cargo build --release -p poodle-prep
cp "$ROOT/target/release/poodle-prep" "$OUT/"
strip "$OUT/poodle-prep" || true
for t in ffmpeg ffprobe; do
  exe=$(command -v $t) || { echo "bench-prep-gpu: no $t on the PATH (make setup installs it)" >&2; exit 1; }
  cp "$exe" "$OUT/bin/$t.bin"
  # Every shared library but the C runtime, which the GPU machine has.
  ldd "$exe" | awk '/=> \//{print $3}' | grep -vE '/lib(c|m|pthread|dl|rt)\.so' \
    | xargs -r -I{} cp -Ln {} "$OUT/lib/"
  # Only ffmpeg/ffprobe see this machine's libraries (libstdc++, libgomp, libssl, ...): on
  # the LD_LIBRARY_PATH of every process they could shadow torch's or the image's own.
  cat > "$OUT/bin/$t" <<WRAP
#!/bin/sh
d=\$(dirname "\$0")
LD_LIBRARY_PATH="\$d/../lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$d/$t.bin" "\$@"
WRAP
  chmod +x "$OUT/bin/$t"
done
WHEEL=${ORT_GPU_WHEEL:-}
if [ -z "$WHEEL" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    onnxruntime-gpu==1.31.1 -d "$OUT"
else
  cp "$WHEEL" "$OUT/"
fi
ls "$OUT"/onnxruntime_gpu-*.whl > /dev/null || { echo "bench-prep-gpu: no onnxruntime_gpu wheel in $OUT" >&2; exit 1; }
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
# The image's python3 is a venv (/opt/torch/.venv): no new venv (it would not see torch or
# numpy), the wheel into a folder of its own, ahead of the image's CPU onnxruntime.
python3 -m pip install -q --no-index --no-deps --no-compile --target "$B/site" "$B"/onnxruntime_gpu-*.whl
export PYTHONPATH="$B/site${PYTHONPATH:+:$PYTHONPATH}"
# ORT's CUDA provider (in prep_gpu.py's process and in poodle-prep) needs CUDA 13; cuDNN 9 is
# on the default path (../shared/GPU.md), so that stays behind torch's own libraries.
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 "$B/prep_gpu.py" --bundle "$B" --out "$B/result" "$@"
RUN
chmod +x "$OUT/run.sh"
size=$(du -sb "$OUT" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "bundle: $OUT, $size bytes ($(du -sh "$OUT" | cut -f1)); on the GPU machine: bash $(basename "$OUT")/run.sh"
if ((size > limit)); then
  echo "bench-prep-gpu: the bundle is $((size / 1024 / 1024)) MiB, over the device tool's 64 MiB carry limit: it cannot travel in one call (this script's header says what it would take)" >&2
fi
