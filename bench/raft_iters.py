#!/usr/bin/env python3
"""RAFT-large with 12 against 24 refinement iterations on the shared pairs (issue 13 item 2).

The authors run torchvision RAFT-large with 24 updates; `tools/export_raft.py` defaults to 24
and 12 would be the cheaper default only if it stays within a small error of 24. This script
exports pretrained RAFT-large once per iteration count with the repo's own exporter (its
ONNX-vs-PyTorch check included), then runs each model the way poodle-prep feeds it (the
card's size multiple, bilinear resize) on:

- RubberWhale and KITTI (ground truth): AEE and KITTI Fl-all;
- the dashcam pairs of a `make demo` store (no ground truth): median occluded fraction
  (forward-backward check, as prep derives it);
- every pair: the mean end-point distance between the two iteration counts' flows.

Needs torch, torchvision, onnx, onnxruntime, opencv-python-headless, zarr
(tools/requirements-export.txt + tools/requirements-flow.txt) and the pretrained weights:
`--weights FILE` (torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth, fetched where there is
internet) or `--pretrained` (downloads them). CPU is enough (minutes per model at 360x640).

    python bench/raft_iters.py --weights raft_large_C_T_SKHT_V2-ff5fadd5.pth --out out/raft-iters
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_vs_opencv import FLOW, PAIRS, STORE, OnnxFlow, errors, occluded, read_gt, read_rgb, store_pairs  # noqa: E402
from machine import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def export(iters, a):
    onnx = a.out / f"raft_large_i{iters}.onnx"
    src = ["--pretrained"] if a.pretrained else ["--weights", str(a.weights)]
    subprocess.run([sys.executable, str(ROOT / "tools" / "export_raft.py"), "--arch", "large",
                    *src, "--iters", str(iters), "--height", "360", "--width", "640",
                    "--out", str(onnx)], check=True)
    return OnnxFlow(onnx.with_suffix(".json"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="torchvision's RAFT-large state dict (.pth)")
    src.add_argument("--pretrained", action="store_true", help="download the weights")
    p.add_argument("--iters", type=int, nargs=2, default=[12, 24])
    p.add_argument("--store", type=Path, default=STORE, help="a prep store of dashcam pairs")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "raft-iters")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.store.exists():
        sys.exit(f"{a.store}: no store (run make demo, or pass --store)")
    models = {n: export(n, a) for n in a.iters}
    gt_pairs = {k: (read_rgb(FLOW / f1), read_rgb(FLOW / f2), read_gt(FLOW / g))
                for k, (f1, f2, g) in PAIRS.items()}
    _, dash = store_pairs(a.store)
    res = {"machine": machine(), "iters": a.iters, "models": {}, "between": {}}
    flows = {}
    for n, model in models.items():
        row = {}
        for k, (im1, im2, (gt, valid)) in gt_pairs.items():
            f = model(im1, im2)
            flows[(n, k)] = f
            row[k] = dict(zip(("aee", "fl_all"), errors(f, gt, valid)))
        occ = []
        for i, (_, _, _, im1, im2) in enumerate(dash):
            f, b = model(im1, im2), model(im2, im1)
            flows[(n, i)] = f
            occ.append(occluded(f.astype(np.float64), b.astype(np.float64))[0])
        row["dashcam_median_occluded"] = float(np.median(occ))
        res["models"][n] = row
    lo, hi = a.iters
    for key in list(PAIRS) + ["dashcam"]:
        keys = [key] if key in PAIRS else range(len(dash))
        d = [np.sqrt(((flows[(lo, k)] - flows[(hi, k)]) ** 2).sum(axis=2)).mean() for k in keys]
        res["between"][key] = float(np.mean(d))
    (a.out / "raft_iters.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"\n| iterations | RubberWhale AEE | KITTI AEE | KITTI Fl-all % | dashcam median occluded |")
    print("| --- | --- | --- | --- | --- |")
    for n, r in res["models"].items():
        print(f"| {n} | {r['RubberWhale']['aee']:.3f} | {r['KITTI']['aee']:.2f} | "
              f"{r['KITTI']['fl_all']:.1f} | {r['dashcam_median_occluded']:.3f} |")
    print(f"\nmean end-point distance {lo} vs {hi} iterations: " +
          ", ".join(f"{k} {v:.3f} px" for k, v in res["between"].items()))


if __name__ == "__main__":
    main()
