#!/usr/bin/env bash
# The training data loader's throughput at the paper's configuration (issue: reads at training
# speed). Prepares a 720x1280 store from the shared dashcam clips (a few pairs per video, default
# flow model), then runs `poodle-train bench-loader --config paper` (512x1024 windows of the
# rescaled frames, K = 6 subcrops of 192 px per direction, the authors' colour and affine recipe)
# on 1 and on 2 threads. Each run prints one JSON object: pairs/s, pairs/s per core, and the
# store reads alone on one thread in the same run (the baseline the ratio refers to).
#
# Knobs: OUT (store folder, reused when present), PAIRS (pairs per video, default 4),
# BATCHES (timed batches of 4 pairs, default 8), THREADS (default "1 2").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench-loader}
PAIRS=${PAIRS:-4}
BATCHES=${BATCHES:-8}
THREADS=${THREADS:-1 2}
cargo build --release -q -p poodle-prep -p poodle-train
if [ ! -e "$OUT/bench720-part-00000-of-00001.zarr/zarr.json" ]; then
  manifest=$(mktemp --suffix=.json)
  trap 'rm -f "$manifest"' EXIT
  cat > "$manifest" <<JSON
{
  "name": "bench720",
  "layout": {"kind": "folder", "extensions": ["mp4"]},
  "sampling": {"kind": "per_video", "pairs_per_video": $PAIRS, "dt_min": 15, "dt_max": 30},
  "height": 720,
  "width": 1280,
  "pairs_per_shard": 4,
  "seed": 0,
  "default_root": "../shared/data/video"
}
JSON
  ./target/release/poodle-prep prep --config "$manifest" --out "$OUT" \
    --model models/tvl1_flow.json --device cpu --quiet
fi
python3 -c "import sys; sys.path.insert(0, 'bench'); import machine; print('machine:', machine.machine())"; date -u
for t in $THREADS; do
  ./target/release/poodle-train bench-loader --config paper \
    --stores "$OUT/bench720-part-00000-of-00001.zarr" \
    --threads "$t" --batches "$BATCHES"
done
