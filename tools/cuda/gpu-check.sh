#!/usr/bin/env bash
# Runs on the GPU machine, from the unpacked dist/gpu-check.tar.xz (`make gpu-check`):
#   tar -xJf gpu-check.tar.xz && gpu-check/gpu-check.sh
# Every stage has its own time limit (470 s in all, under the 8 minutes asked for), so a hang
# or an out-of-memory in one stage still leaves the others' results. The split is a first
# guess (nothing has run on a GPU yet): cuDNN's algorithm search at 512x1024 dominates the
# candle and PyTorch trunk stages' untimed warm-up. Results: OUT (default
# gpu-check/out): candle.jsonl, torch_trunk.jsonl, torch_dense.jsonl, torch_anchor.json and RESULTS-section.md,
# the section to paste into bench/RESULTS.md.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
rm -f "$out/candle.jsonl" "$out/torch_trunk.jsonl" "$out/torch_dense.jsonl" "$out/torch_anchor.json" "$out/torch_step.log"
# The driver's libcuda, the toolkit's cudart/cublas/curand, cuDNN 9 (../shared/GPU.md).
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64:/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# NCCL (the nccl stage; training with several ranks): PyTorch's wheel brings libnccl.so.2.
nccl_lib=$(python3 - 2>/dev/null <<'PY'
import glob, site
hits = [h for p in site.getsitepackages() for h in glob.glob(p + "/nvidia/**/libnccl.so.2", recursive=True)]
print(hits[0] if hits else "")
PY
)
# cudarc opens libnccl.so; the wheel has only libnccl.so.2: a link in a folder of our own.
if [[ -n $nccl_lib ]]; then
  mkdir -p "$out/nccl-lib" && ln -sf "$nccl_lib" "$out/nccl-lib/libnccl.so"
  export LD_LIBRARY_PATH=$out/nccl-lib:$(dirname "$nccl_lib"):$LD_LIBRARY_PATH
fi
echo "gpu-check: libnccl ${nccl_lib:-not found (the nccl stage will fail)}" >&2
# sm_90a code runs on compute capability 9.0 only; the sm_80 build's PTX is JIT-compiled by
# the driver for any later card.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -d '. ')
bin=$here/bin/sm80/poodle-train
[[ $cap == 90 && -x $here/bin/sm90/poodle-train ]] && bin=$here/bin/sm90/poodle-train
[[ -x $bin ]] || bin=$(ls "$here"/bin/sm*/poodle-train | head -1)
echo "gpu-check: compute capability ${cap:-unknown}, $bin" >&2

stage() { # seconds, name, command...
  local secs=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" "$@"
  local rc=$?
  echo "gpu-check: $name rc=$rc in $((SECONDS - t0)) s" >&2
  echo "{\"kind\": \"stage\", \"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $secs}" >> "$out/stages.jsonl"
}
rm -f "$out/stages.jsonl"
cp "$here/GIT_SHA" "$out/GIT_SHA" 2>/dev/null || true
stage 50 parity "$bin" gpu-check --out "$out" --only parity
stage 20 nccl "$bin" gpu-check --out "$out" --only nccl
stage 20 candle-dense "$bin" gpu-check --out "$out" --only dense
stage 20 torch-dense bash -c "python3 '$here/torch_dense_loss.py' >> '$out/torch_dense.jsonl'"
stage 125 candle-trunk "$bin" gpu-check --out "$out" --only trunk
stage 105 candle-step "$bin" gpu-check --out "$out" --only step
stage 50 torch-trunk bash -c "python3 '$here/torch_trunk.py' >> '$out/torch_trunk.jsonl'"
stage 80 torch-step bash -o pipefail -c "OUT='$out' python3 '$here/torch_poodle_step.py' train | tee '$out/torch_step.log'"
python3 "$here/gpu_check_report.py" "$out" > "$out/RESULTS-section.md"
cat "$out/RESULTS-section.md"
