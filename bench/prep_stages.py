#!/usr/bin/env python3
"""Per-stage throughput of `poodle-prep prep` on the sample dashcam clips, with baselines
measured in the same run on the same machine:

- decode: ffmpeg decoding every frame of the same clips to null at the same output size
  (what a naive "decode everything" loader costs), as frames/s;
- flow: the same ONNX model and batch through PyPI's onnxruntime Python API (no Rust), as
  pairs/s (forward + backward flow per pair, as prep computes).

Run: make bench (builds release, uses .venv). Prints a table and one JSON line.
"""
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from machine import machine  # bench/machine.py

ROOT = Path(__file__).resolve().parent.parent
VIDEOS = ROOT.parent / "shared" / "data" / "video"
BIN = ROOT / "target" / "release" / "poodle-prep"
CARD = ROOT / "models" / "raft_small_random.json"


def ffmpeg_decode_fps(h, w):
    frames, secs = 0, 0.0
    for clip in sorted(VIDEOS.glob("*.mp4")):
        t0 = time.perf_counter()
        out = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(clip), "-vf", f"scale={w}:{h}",
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        secs += time.perf_counter() - t0
        frames += len(out) // (h * w * 3)
    return frames / secs


def python_ort_pairs_per_s(h, w, batch, threads, reps=3):
    import numpy as np
    import onnxruntime as ort
    card = json.load(open(CARD))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(CARD.parent / card["onnx"]), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2 * batch, 3, h, w)).astype(np.float32)
    b = rng.uniform(-1, 1, (2 * batch, 3, h, w)).astype(np.float32)
    feeds = {card["inputs"][0]: a, card["inputs"][1]: b}
    sess.run(None, feeds)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feeds)
    return reps * batch / (time.perf_counter() - t0)


def main():
    if not VIDEOS.exists():
        sys.exit(f"{VIDEOS} is absent: the benchmark needs the real sample clips")
    cfg = json.load(open(ROOT / "manifests" / "sample.json"))
    h, w = cfg["height"], cfg["width"]
    batch, threads = 2, os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="poodle-bench-"))
    try:
        t0 = time.perf_counter()
        res = subprocess.run([str(BIN), "prep", "--config", str(ROOT / "manifests" / "sample.json"),
                              "--out", str(out), "--quiet", "--batch-size", str(batch),
                              "--flow-threads", str(threads)], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(res.stderr)
        s = json.loads(res.stdout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    dec_fps = ffmpeg_decode_fps(h, w)
    ort_py = python_ort_pairs_per_s(h, w, batch, threads)
    rows = [
        ("decode", s["decode"]["per_s"], "pairs/s", f"{dec_fps:.1f} frames/s ffmpeg full decode"),
        ("flow", s["flow"]["per_s"], "pairs/s", f"{ort_py:.3f} pairs/s onnxruntime-python, ratio {s['flow']['per_s'] / ort_py:.2f}"),
        ("write", s["write"]["per_s"], "pairs/s", ""),
    ]
    print(f"machine: {machine()}; {s['pairs_written']} pairs at {h}x{w}, batch {batch}, wall {wall:.1f} s")
    print(f"{'stage':<8}{'rate':>10}  unit     baseline (same run)")
    for name, rate, unit, base in rows:
        print(f"{name:<8}{rate:>10.3f}  {unit:<8} {base}")
    print(f"bytes/pair {s['bytes_per_pair']:.0f} of raw {s['raw_bytes_per_pair']:.0f} ({100 * s['bytes_per_pair'] / s['raw_bytes_per_pair']:.1f}%)")
    print(json.dumps({"machine": machine(), "pairs": s["pairs_written"], "size": [h, w], "batch": batch,
                      "decode_pairs_per_s": s["decode"]["per_s"], "ffmpeg_full_decode_frames_per_s": dec_fps,
                      "flow_pairs_per_s": s["flow"]["per_s"], "onnxruntime_python_pairs_per_s": ort_py,
                      "flow_ratio_vs_python": s["flow"]["per_s"] / ort_py, "write_pairs_per_s": s["write"]["per_s"],
                      "bytes_per_pair": s["bytes_per_pair"], "raw_bytes_per_pair": s["raw_bytes_per_pair"]}))


if __name__ == "__main__":
    main()
