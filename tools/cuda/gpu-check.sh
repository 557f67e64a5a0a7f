#!/usr/bin/env bash
# Runs on the GPU machine, from the unpacked dist/gpu-check.tar.xz (`make gpu-check`); the
# device tool's exact call is in docs/cuda.md ("make gpu-check").
#
# Every stage has its own time limit, so a hang or an out-of-memory in one stage still leaves
# the others' results; each precision of the trunk and step benchmarks is its own process,
# bf16 first (the figure that matters most). The limits add up to 470 s, and no stage runs
# past GPU_CHECK_BUDGET_S (default 470) from the first stage's start, so the script ends
# within 8 minutes whatever hangs. The split is a first guess (nothing has run on a GPU yet):
# cuDNN's algorithm search at 512x1024 dominates the benchmarks' untimed warm-up.
#
# Results in OUT (default gpu-check/out), 7 files (the device tool returns at most 8, no
# links): candle.jsonl, stages.jsonl, stages.log (every stage's stdout and stderr: the error
# messages), torch_dense.jsonl, torch_trunk.jsonl, torch_step.log and RESULTS-section.md,
# the section to paste into bench/RESULTS.md. Nothing else may be written there.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
rm -f "$out"/{candle.jsonl,stages.jsonl,stages.log,torch_dense.jsonl,torch_trunk.jsonl,torch_step.log,RESULTS-section.md}
export PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-470}

# The Rust binary's libraries: the driver's libcuda, the toolkit's cudart/cublas/curand,
# cuDNN 9 (../shared/GPU.md). Only its stages get this path: PyTorch brings its own cuBLAS
# and cuDNN, which a system cuDNN ahead of them could break.
cuda_ld=/usr/local/nvidia/lib64:/usr/local/cuda/lib64:/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# NCCL (the nccl stage; training with several ranks): PyTorch's wheel brings libnccl.so.2.
nccl_lib=$(python3 - 2>/dev/null <<'PY'
import glob, site
hits = [h for p in site.getsitepackages() for h in glob.glob(p + "/nvidia/**/libnccl.so.2", recursive=True)]
print(hits[0] if hits else "")
PY
)
# cudarc opens libnccl.so; the wheel has only libnccl.so.2: a link in a folder of our own,
# outside OUT (links do not come back, and they would count against its 8 files).
if [[ -n $nccl_lib ]]; then
  nccl_dir=$(mktemp -d /tmp/gpu-check-nccl.XXXXXX)
  ln -sf "$nccl_lib" "$nccl_dir/libnccl.so"
  cuda_ld=$nccl_dir:$(dirname "$nccl_lib"):$cuda_ld
fi
echo "gpu-check: libnccl ${nccl_lib:-not found (the nccl stage will fail)}" >&2
# sm_90a code runs on compute capability 9.0 only; an sm_80 build's PTX (if packed,
# GPU_CHECK_CAP=80) is JIT-compiled by the driver for any later card.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -d '. ')
bin=$here/bin/sm80/poodle-train
[[ $cap == 90 && -x $here/bin/sm90/poodle-train ]] && bin=$here/bin/sm90/poodle-train
[[ -x $bin ]] || bin=$(ls "$here"/bin/sm*/poodle-train 2>/dev/null | head -1)
# An extraction without tar (python's tarfile, docs/cuda.md) may not keep the mode bits.
chmod +x "$here"/bin/sm*/poodle-train 2>/dev/null
echo "gpu-check: compute capability ${cap:-unknown}, ${bin:-no poodle-train in $here/bin}" >&2
candle=(env "LD_LIBRARY_PATH=$cuda_ld" "$bin" gpu-check --out "$out")

t_start=$SECONDS
stage() { # seconds, name, command...
  local planned=$1 secs=$1 name=$2; shift 2
  local left=$((budget - (SECONDS - t_start))) t0=$SECONDS from rc
  ((secs > left)) && secs=$left
  if ((secs < 5)); then
    echo "gpu-check: $name skipped (budget of $budget s spent)" | tee -a "$out/stages.log" >&2
    echo "{\"kind\": \"stage\", \"stage\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"limit\": $planned}" >> "$out/stages.jsonl"
    return
  fi
  echo "=== $name (limit $secs s): $*" >> "$out/stages.log"
  from=$(($(wc -l < "$out/stages.log") + 1))
  timeout --kill-after=5 "$secs" "$@" >> "$out/stages.log" 2>&1
  rc=$?
  # 124: the limit; 137: killed (by --kill-after, or the kernel's OOM killer).
  echo "gpu-check: $name rc=$rc in $((SECONDS - t0)) s (limit $secs)" | tee -a "$out/stages.log" >&2
  # The stage's last lines that are not result JSON: the error, for the output tail.
  ((rc == 0)) || tail -n "+$from" "$out/stages.log" | grep -v '^{' | grep -v "^gpu-check: $name rc=" | tail -n 6 | cut -c1-400 | sed 's/^/    /' >&2
  echo "{\"kind\": \"stage\", \"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $secs}" >> "$out/stages.jsonl"
}
: > "$out/stages.log"
stage 45 parity "${candle[@]}" --only parity
stage 25 batchnorm-nccl "${candle[@]}" --only batchnorm,nccl
stage 20 candle-dense "${candle[@]}" --only dense
stage 25 torch-dense bash -c "python3 '$here/torch_dense_loss.py' >> '$out/torch_dense.jsonl'"
for p in bf16 tf32 f32; do
  stage 25 "candle-trunk-$p" "${candle[@]}" --only trunk --precisions "$p"
done
for p in bf16 tf32 f32; do
  stage 50 "candle-step-$p" "${candle[@]}" --only step --precisions "$p"
done
stage 40 torch-trunk bash -c "python3 '$here/torch_trunk.py' bf16 tf32 f32 >> '$out/torch_trunk.jsonl'"
# torch_poodle_step.py's own `train` runs fp32 first and writes its JSON only at the end: its
# bench_train per mode instead, bf16 first, each a TRAIN or TRAIN-FAIL line in the log.
stage 90 torch-step bash -o pipefail -c "cd '$here' && python3 -c '
import torch_poodle_step as t
for mode in (\"bf16\", \"tf32\", \"fp32\"):
    try:
        t.bench_train(mode)
    except Exception as e:
        print(\"TRAIN-FAIL\", mode, repr(e)[:300], flush=True)
' | tee '$out/torch_step.log'"
GPU_CHECK_SHA=$(cat "$here/GIT_SHA" 2>/dev/null) GPU_CHECK_CARD=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1) \
  python3 "$here/gpu_check_report.py" "$out" > "$out/RESULTS-section.md" 2>> "$out/stages.log" \
  || echo "gpu-check: gpu_check_report.py failed (see stages.log)" >&2
[[ -n ${nccl_dir:-} ]] && rm -rf "$nccl_dir"
cat "$out/RESULTS-section.md"
echo "gpu-check: done in $((SECONDS - t_start)) s; results in $out" >&2
