#!/usr/bin/env bash
# Data-parallel training on CPU processes (MPI): step time of one process with a global batch
# of 4 pairs against `mpirun -np 2` with 2 pairs per rank (the same global batch, the same
# pairs), and the bytes each rank all-reduces per step, both for the demo config and for the
# paper's ResNet-50 model (whose traffic does not depend on the crop size, so it is measured
# at small crops on CPU).
#
# Needs the demo store (`make demo`) and Open MPI (apt-get install openmpi-bin libopenmpi-dev
# libclang-dev). Knobs: STORE (default out/sample), STEPS (timed steps, default 8).
# Prints one JSON object per configuration: median pairs/s over the logged steps, the ratio
# world 2 / world 1 measured in the same run, and the all-reduce bytes and calls per step.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-out/sample}
STEPS=${STEPS:-8}
[ -d "$STORE" ] || { echo "no $STORE: run make demo first (or set STORE)"; exit 1; }
cargo build --release -q -p poodle-train --features mpi
BIN=./target/release/poodle-train
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
python3 -c "import sys; sys.path.insert(0, 'bench'); import machine; print('machine:', machine.machine())"; date -u
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(train --quiet --stores "$STORE" --set run.picture_every=null
  --set "run.max_steps=$((STEPS + 1))" --set run.checkpoint_every=100000)

# $1 name, $2 world size, then the config arguments.
run() {
  local name=$1 np=$2; shift 2
  if [ "$np" = 1 ]; then
    RAYON_NUM_THREADS=2 "$BIN" "${common[@]}" --run-dir "$work/$name" "$@" >/dev/null
  else
    # One core per rank: the two ranks together use the machine as the single process does.
    RAYON_NUM_THREADS=1 mpirun -np "$np" --bind-to none "$BIN" "${common[@]}" \
      --run-dir "$work/$name" "$@" >/dev/null
  fi
}

# Median pairs/s over the steps after the first, and the traffic of the last step.
summary() {
  python3 - "$work/$1/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
print(json.dumps({
    "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rows),
    "allreduce_bytes": rows[-1]["allreduce_bytes"],
    "allreduce_calls": rows[-1]["allreduce_calls"],
}))
PY
}

# Every stored pair once per pass (16 in the demo store: 4 global batches of 4).
every_pair='data.sampling={"unit":"pair","pairs_per_visit":1,"visits_per_pass":1,"keep_visits_together":false}'
tiny=(--config tiny --set "$every_pair")
run tiny1 1 "${tiny[@]}" --set data.batch_size=4
run tiny2 2 "${tiny[@]}" --set data.batch_size=2
python3 - "$(summary tiny1)" "$(summary tiny2)" <<'PY'
import json, sys
one, two = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"config": "tiny (ResNet-18, 64x128, global batch 4)", "world1": one,
                  "world2": two, "speed_ratio_world2_over_world1":
                  round(two["pairs_per_s"] / one["pairs_per_s"], 3)}))
PY

# The paper's model (ResNet-50, decoder, projectors, K = 6) at 64x128 crops: the gradient
# and SyncBN payload are those of the 512x1024 run.
paper=(--config paper --set augment.out_height=64 --set augment.out_width=128
  --set "augment.global_crop.initial_size=[135,240]" --set augment.subcrops.size=32
  --set "$every_pair" --set data.batch_size=1 --set data.workers=1
  --set run.log_every=1 --set "run.max_steps=2")
run paper2 2 "${paper[@]}"
python3 - "$work/paper2/metrics.jsonl" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
b = r["allreduce_bytes"]
print(json.dumps({"config": "paper model (ResNet-50 + decoder + projectors, K = 6)",
                  "allreduce_bytes_per_step": b, "allreduce_mib_per_step": round(b / 2**20, 1),
                  "allreduce_calls_per_step": r["allreduce_calls"]}))
PY
