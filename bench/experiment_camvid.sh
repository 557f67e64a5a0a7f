#!/usr/bin/env bash
# make experiment-camvid: a small end-to-end PooDLe experiment on CamVid, CPU-sized.
#
#   1. poodle-prep: consecutive CamVid training frames (dt = 30 source frames) -> frame pairs
#      with forward/backward flow and occlusion (default flow model), stored at 180x240.
#   2. poodle-train: the same budget (STEPS optimiser steps, tiny config: ResNet-18 + SDM,
#      64x128 crops, batch 4) for PooDLe, dense-only (method.pooled=false) and pooled-only
#      (method.dense=false). optim.epochs is set so that the cosine schedule ends at STEPS.
#      Reruns resume (a larger STEPS continues the same runs).
#   3. poodle-train eval linear: frozen backbone + decoder, a 1x1-conv readout trained on
#      CamVid train (367 frames), evaluated on CamVid val (101 frames), for a random encoder
#      (scratch) and the three pre-trained ones.
#   4. A markdown table and a JSON summary: mIoU, pixel accuracy, small/large/rare/common
#      mIoU (the paper's class groups from the CamVid training labels), wall times.
#
# Knobs (environment): STEPS (pre-training budget per method, default 180), SCRATCH_SEEDS
# (further random encoders for the baseline's spread, default "1 2"), EVAL_SIZE
# (readout input HxW, default 128x160), EVAL_EPOCHS (readout epochs, default 20), SEED,
# STORE_H/STORE_W (stored frame size), CAMVID (data root), OUT (store folder), RUNS (prefix
# of the run folders), DEVICE (cpu or cuda:N), MODEL (flow model card), PY (python3).
# About 20 minutes on a 2-core CPU with the defaults (measured 18.4 min on the 2-core
# development machine with tests running beside it: prep 1.5 min, pre-training 9.2 / 3.3 /
# 2.0 min for PooDLe / dense / pooled, each readout ~40 s).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-180}
EVAL_SIZE=${EVAL_SIZE:-128x160}
EVAL_EPOCHS=${EVAL_EPOCHS:-20}
SEED=${SEED:-0}
SCRATCH_SEEDS=${SCRATCH_SEEDS-1 2}
STORE_H=${STORE_H:-180}
STORE_W=${STORE_W:-240}
CAMVID=${CAMVID:-../shared/data/camvid}
OUT=${OUT:-out/camvid}
RUNS=${RUNS:-runs/camvid}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-models/tvl1_flow.json}
PY=${PY:-python3}
PREP=./target/release/poodle-prep
TRAIN=./target/release/poodle-train

for b in "$PREP" "$TRAIN"; do
  [[ -x $b ]] || { echo "missing $b: cargo build --release -p poodle-prep -p poodle-train" >&2; exit 1; }
done
[[ -d $CAMVID/train && -d $CAMVID/valannot ]] || {
  echo "no CamVid at $CAMVID (set CAMVID=...; layout: ../shared/data/README.md)" >&2; exit 1; }
mkdir -p "$OUT" "$(dirname "$RUNS")"
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

echo "== 1/3 prep: CamVid train frame pairs at ${STORE_H}x${STORE_W} -> $OUT"
cat > "$OUT/camvid-frames.json" <<EOF
{"name": "camvid", "layout": {"kind": "frames", "extensions": ["png"]},
 "sampling": {"kind": "consecutive"}, "height": $STORE_H, "width": $STORE_W,
 "pairs_per_shard": 32, "seed": $SEED}
EOF
t=$(now)
"$PREP" prep --config "$OUT/camvid-frames.json" --root "$CAMVID/train" --out "$OUT" \
  --model "$MODEL" --device "$DEVICE" --quiet > "$OUT/prep-summary.json"
PREP_S=$(since "$t")
PAIRS=$("$TRAIN" check-stores "$OUT"/*.zarr | tail -1 | awk '{print $1}')
BATCH=4  # data.batch_size of the tiny preset (drop_last)
PER_EPOCH=$(( PAIRS / BATCH ))
(( PER_EPOCH > 0 )) || { echo "no pairs prepared" >&2; exit 1; }
EPOCHS=$(( (STEPS + PER_EPOCH - 1) / PER_EPOCH ))
echo "   $PAIRS pairs in ${PREP_S} s; $PER_EPOCH steps per epoch -> optim.epochs=$EPOCHS, max_steps=$STEPS"

declare -A EXTRA=(
  [poodle]=""
  [dense]="--set method.pooled=false"
  [pooled]="--set method.dense=false"
)
declare -A TRAIN_S
echo "== 2/3 pre-training: $STEPS steps each"
for m in poodle dense pooled; do
  t=$(now)
  # shellcheck disable=SC2086  # EXTRA holds separate words
  "$TRAIN" train --config tiny --stores "$OUT" --run-dir "$RUNS-$m" --device "$DEVICE" \
    --set run.max_steps="$STEPS" --set optim.epochs="$EPOCHS" --set seed="$SEED" \
    --set run.log_every=10 --set run.checkpoint_every="$STEPS" ${EXTRA[$m]} --resume --quiet \
    > "$OUT/train-$m.json" 2> "$OUT/train-$m.log" \
    || { echo "training $m failed (log: $OUT/train-$m.log)" >&2; tail -5 "$OUT/train-$m.log" >&2; exit 1; }
  TRAIN_S[$m]=$(since "$t")
  echo "   $m: $(cat "$OUT/train-$m.json") (${TRAIN_S[$m]} s)"
done

echo "== 3/3 linear readout on CamVid (train -> val), input $EVAL_SIZE, $EVAL_EPOCHS epochs"
EVAL_ARGS=(--dataset camvid --root "$CAMVID" --size "$EVAL_SIZE" --epochs "$EVAL_EPOCHS"
  --device "$DEVICE" --quiet)
"$TRAIN" eval linear --scratch --checkpoint "$RUNS-poodle" --out "$RUNS-scratch/eval" \
  "${EVAL_ARGS[@]}" --seed "$SEED" > "$OUT/eval-scratch.md"
echo "   scratch: done"
for s in $SCRATCH_SEEDS; do
  "$TRAIN" eval linear --scratch --checkpoint "$RUNS-poodle" --out "$RUNS-scratch-seed$s/eval" \
    "${EVAL_ARGS[@]}" --seed "$s" > "$OUT/eval-scratch-seed$s.md"
  echo "   scratch (seed $s): done"
done
for m in poodle dense pooled; do
  "$TRAIN" eval linear --checkpoint "$RUNS-$m" --out "$RUNS-$m/eval" "${EVAL_ARGS[@]}" \
    --seed "$SEED" > "$OUT/eval-$m.md"
  echo "   $m: done"
done

SUMMARY_JSON="$RUNS-summary.json"
SUMMARY_MD="$RUNS-summary.md"
"$PY" - "$RUNS" "$SUMMARY_JSON" "$SUMMARY_MD" "$STEPS" "$PREP_S" \
  "${TRAIN_S[poodle]}" "${TRAIN_S[dense]}" "${TRAIN_S[pooled]}" $SCRATCH_SEEDS <<'PYEOF'
import json, sys
runs, out_json, out_md, steps, prep_s = sys.argv[1:6]
train_s = dict(zip(["poodle", "dense", "pooled"], map(float, sys.argv[6:9])))
extra_seeds = [int(x) for x in sys.argv[9:]]
rows = []
for m, label in [("scratch", "Scratch (random init)"), ("poodle", "PooDLe"),
                 ("dense", "Dense only"), ("pooled", "Pooled only")]:
    r = json.load(open(f"{runs}-{m}/eval/report.json"))
    g = r["groups"]
    rows.append({
        "method": label, "run": f"{runs}-{m}", "pretrain_steps": 0 if m == "scratch" else int(steps),
        "pretrain_s": train_s.get(m, 0.0), "miou": r["miou"], "pixel_acc": r["pixel_acc"],
        "small": g["small"]["miou"], "large": g["large"]["miou"], "rare": g["rare"]["miou"],
        "common": g["common"]["miou"], "readout_s": r["wall_s"],
        "groups": {k: g[k]["classes"] for k in ("small", "large", "rare", "common")},
        "iou": {c["name"]: c["iou"] for c in r["classes"]},
        "report": f"{runs}-{m}/eval/report.json",
    })
pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
lines = [
    f"CamVid linear readout (train 367 -> val 101 frames; pre-training {steps} steps per method, "
    f"prep {prep_s} s)", "",
    "| method | pre-train steps | mIoU | Acc | small | large | rare | common | pre-train s | readout s |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for x in rows:
    lines.append(
        f"| {x['method']} | {x['pretrain_steps']} | {pct(x['miou'])} | {pct(x['pixel_acc'])} | "
        f"{pct(x['small'])} | {pct(x['large'])} | {pct(x['rare'])} | {pct(x['common'])} | "
        f"{x['pretrain_s']:.0f} | {x['readout_s']:.0f} |")
spread = []
for s in extra_seeds:
    r = json.load(open(f"{runs}-scratch-seed{s}/eval/report.json"))
    spread.append({"seed": s, "miou": r["miou"], "pixel_acc": r["pixel_acc"]})
if spread:
    all_miou = [rows[0]["miou"]] + [x["miou"] for x in spread]
    lines += ["", "Random encoders with other seeds (the baseline's spread): " + ", ".join(
        f"seed {x['seed']}: {pct(x['miou'])} mIoU / {pct(x['pixel_acc'])} Acc" for x in spread)
        + f"; all {len(all_miou)}: {pct(min(all_miou))}-{pct(max(all_miou))} mIoU"]
gr = rows[0]["groups"]
lines += ["", "Groups (paper's thresholds on the CamVid training labels): " + "; ".join(
    f"{k}: {', '.join(v) if v else '(none)'}" for k, v in gr.items())]
names = list(rows[0]["iou"])
lines += ["", "| IoU | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
for x in rows:
    lines.append(f"| {x['method']} | " + " | ".join(pct(x["iou"][n]) for n in names) + " |")
md = "\n".join(lines) + "\n"
open(out_md, "w").write(md)
json.dump({"steps": int(steps), "prep_s": float(prep_s), "rows": rows, "scratch_seeds": spread}, open(out_json, "w"), indent=2)
print(md)
PYEOF
echo "summary: $SUMMARY_MD, $SUMMARY_JSON; reports and pictures: $RUNS-*/eval/"
