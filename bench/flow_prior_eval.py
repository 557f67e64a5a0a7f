#!/usr/bin/env python3
"""Tuning helper for tools/make_flow_model.py: build a variant in memory and print, in one
line, the three figures of issue 13 item 5 (sample dashcam median occluded fraction,
RubberWhale and KITTI AEE after the card resize), plus per-clip medians and seconds.
With --prior-only (a variant with --set prior=...), the dashcam figure is also computed for
the parametric prior alone: its field at the matching level, upsampled bilinearly, as the
whole answer in both directions ("prior_only_occ_median").

    .venv-flow/bin/python bench/flow_prior_eval.py [--store S] [--set key=value ...]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_flow_model as mfm  # noqa: E402
from flow_vs_opencv import STORE, occluded, store_pairs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(STORE))
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of DEFAULTS")
    ap.add_argument("--no-dash", action="store_true")
    ap.add_argument("--prior-only", action="store_true")
    a = ap.parse_args()
    p = dict(mfm.DEFAULTS)
    for kv in a.set:
        k, v = kv.split("=")
        p[k] = type(mfm.DEFAULTS[k])(v)
    model = mfm.build(p)
    data = model.SerializeToString()
    prior_sess = None
    if a.prior_only:
        from onnx import TensorProto, helper
        model.graph.output.append(helper.make_tensor_value_info(mfm.DEBUG["prior"], TensorProto.FLOAT, None))
        prior_sess = mfm.session(model.SerializeToString())
    t0 = time.perf_counter()
    acc = mfm.evaluate(data, mfm.SIZE_MULTIPLE, mfm.MIN_SIZE)
    res = {"rw": acc["middlebury_rubberwhale"]["aee"], "kitti": acc["kitti"]["aee"],
           "kitti_fl": acc["kitti"]["fl_all"]}
    if not a.no_dash:
        sess = mfm.session(data)
        names, dash = store_pairs(a.store)
        occ, per, pocc = [], {}, []
        for vid, t, dt, im1, im2 in dash:
            f = mfm.run_model(sess, im1, im2, mfm.SIZE_MULTIPLE, mfm.MIN_SIZE).astype(np.float64)
            b = mfm.run_model(sess, im2, im1, mfm.SIZE_MULTIPLE, mfm.MIN_SIZE).astype(np.float64)
            o, _ = occluded(f, b)
            if prior_sess is not None:
                import cv2
                t = lambda x: x.astype(np.float32).transpose(2, 0, 1)[None]
                h, w = im1.shape[:2]

                def up(x, y):
                    pr = prior_sess.run([mfm.DEBUG["prior"]], {"image1": t(x), "image2": t(y)})[0][0]
                    sy, sx = h / pr.shape[1], w / pr.shape[2]
                    pr = cv2.resize(pr.transpose(1, 2, 0), (w, h), interpolation=cv2.INTER_LINEAR)
                    return (pr * np.array([sx, sy], np.float32)).astype(np.float64)
                pocc.append(occluded(up(im1, im2), up(im2, im1))[0])
            occ.append(o)
            per.setdefault(names[vid], []).append(o)
        res["dash_occ_median"] = round(float(np.median(occ)), 4)
        res["per_clip"] = {n: round(float(np.median(v)), 3) for n, v in per.items()}
        res["per_pair"] = [round(o, 3) for o in occ]
        if pocc:
            res["prior_only_occ_median"] = round(float(np.median(pocc)), 4)
    res["secs"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"set": a.set, **res}), flush=True)


if __name__ == "__main__":
    main()
