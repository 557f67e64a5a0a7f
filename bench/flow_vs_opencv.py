#!/usr/bin/env python3
"""Accuracy and CPU time of the default ONNX flow model against OpenCV's DIS and Farneback,
all measured in the same run on the same machine.

- Accuracy on the real pairs with ground truth in ../shared/data/flow (see its README):
  Middlebury RubberWhale (dense GT) and the KITTI pair (sparse GT, flows up to 184 px).
  AEE = average endpoint error over valid GT pixels; Fl-all = % of valid pixels whose error
  is > 3 px and > 5 % of the GT magnitude (the KITTI outlier rate).
- Time per 720p pair: frames 0 and 20 of ../shared/data/video/dashcam-highway-720p.mp4
  (1280x720, decoded with ffmpeg), median of --reps runs after one warm-up, from uint8 RGB
  frames to a float flow field (input conversion included for every method). Also printed:
  the median flow magnitude and the mean grey-level error after warping frame 20 back with
  each flow (a ground-truth-free plausibility check; lower is better, occlusions included).
- Consistency on the sample dashcam pairs: the frames of a store written by `make demo`
  (--store; manifests/sample.json: 16 pairs at 360x640, dt 15-30 frames), forward and
  backward flow per pair, occluded fraction by prep's rule (|f + b'|^2 > 0.1 (|f|^2 + |b'|^2)
  + 0.5 or forward target out of frame, b' = backward flow read bilinearly at x + f); median
  over the pairs, per clip, and the out-of-frame share. Ground-truth free and blind to
  degenerate answers (zero flow scores 0), so it only means something next to the AEEs.

The ONNX model is fed the way poodle-prep feeds it: its card's value range and channel
order, frames resized (bilinear) to the nearest multiple of size_multiple (at least
min_size), the flow resized back with its vectors rescaled; onnxruntime CPU, all cores.
OpenCV: DIS with the MEDIUM preset and Farneback (pyr_scale 0.5, 3 levels, window 15,
3 iterations, poly_n 5, sigma 1.2 - OpenCV's sample values) on grey frames, OpenCV's own
threading. DIS's result on the KITTI pair depends on the OpenCV version: measured here
with opencv-python-headless 4.10.0 it is AEE 24.3 px (close to the data README's 23.7),
with 5.0.0 38.5 px; RubberWhale and Farneback agree across both versions.

Run with a venv holding onnxruntime, numpy, zarr and opencv-python-headless
(tools/requirements-flow.txt; and ffmpeg on PATH), after `make demo`:

    .venv-flow/bin/python bench/flow_vs_opencv.py [--card models/tvl1_flow.json] [--reps 3]

Prints a table with the machine and date, then one JSON line.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import zarr

from machine import machine  # bench/machine.py

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FLOW = DATA / "flow"
VIDEO = DATA / "video" / "dashcam-highway-720p.mp4"
STORE = ROOT / "out" / "sample" / "sample-part-00000-of-00001.zarr"  # make demo
PAIRS = {
    "RubberWhale": ("rubberwhale1.png", "rubberwhale2.png", "Middlebury_flow_gt.flo"),
    "KITTI": ("KITTI_frame1.png", "KITTI_frame2.png", "KITTI_flow_gt.png"),
}


# ---- data ------------------------------------------------------------------------------
def read_rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        sys.exit(f"cannot read {path}")
    return np.ascontiguousarray(img[..., ::-1])


def read_gt(path):
    """(H x W x 2 flow, H x W valid mask) from a Middlebury .flo or a KITTI 16-bit PNG."""
    if str(path).endswith(".flo"):
        with open(path, "rb") as f:
            if f.read(4) != b"PIEH":
                sys.exit(f"{path}: not a .flo file")
            w, h = (int(x) for x in np.fromfile(f, np.int32, 2))
            flow = np.fromfile(f, np.float32, 2 * w * h).reshape(h, w, 2).astype(np.float64)
        return flow, (np.abs(flow) < 1e9).all(axis=2)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # uint16, BGR order
    if raw is None or raw.dtype != np.uint16:
        sys.exit(f"{path}: not a 16-bit KITTI flow PNG")
    r, g, b = raw[..., 2].astype(np.float64), raw[..., 1].astype(np.float64), raw[..., 0]
    return np.stack([(r - 32768.0) / 64.0, (g - 32768.0) / 64.0], axis=2), b > 0


def decode_frames(path, indices):
    """RGB uint8 frames at the given indices, decoded by ffmpeg."""
    sel = "+".join(f"eq(n\\,{i})" for i in indices)
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height", "-of", "json", str(path)],
                           capture_output=True, check=True, text=True)
    st = json.loads(probe.stdout)["streams"][0]
    w, h = st["width"], st["height"]
    raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-vf", f"select='{sel}'",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    if len(frames) != len(indices):
        sys.exit(f"{path}: decoded {len(frames)} frames, wanted {len(indices)}")
    return list(frames)


def errors(pred, gt, valid):
    err = np.sqrt(((pred - gt) ** 2).sum(axis=2))[valid]
    mag = np.sqrt((gt ** 2).sum(axis=2))[valid]
    return float(err.mean()), float(100.0 * ((err > 3.0) & (err > 0.05 * mag)).mean())


def warp_error(im1, im2, flow):
    """Mean |grey(im2)(x + flow) - grey(im1)(x)| over pixels that land inside the frame."""
    g1 = cv2.cvtColor(im1, cv2.COLOR_RGB2GRAY).astype(np.float32)
    g2 = cv2.cvtColor(im2, cv2.COLOR_RGB2GRAY).astype(np.float32)
    h, w = g1.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, my = xs + flow[..., 0], ys + flow[..., 1]
    warped = cv2.remap(g2, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return float(np.abs(warped - g1)[inside].mean())


def bilinear(m, x, y):
    """m (H x W) at points (x, y) as poodle's warp samples it inside [0, W-1] x [0, H-1];
    points outside are clamped to the border (callers mask them)."""
    h, w = m.shape
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    return (m[y0, x0] * (1 - fx) * (1 - fy) + m[y0, x1] * fx * (1 - fy)
            + m[y1, x0] * (1 - fx) * fy + m[y1, x1] * fx * fy)


def occluded(f, b):
    """prep's occlusion of frame t (poodle_common::flowmath::occlusion_fb with 0.1, 0.5):
    (occluded fraction, out-of-frame fraction) for forward f and backward b (H x W x 2)."""
    h, w = f.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = xs + f[..., 0], ys + f[..., 1]
    out = ~((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1))
    bu, bv = bilinear(b[..., 0], x, y), bilinear(b[..., 1], x, y)
    lhs = (f[..., 0] + bu) ** 2 + (f[..., 1] + bv) ** 2
    rhs = 0.1 * (f[..., 0] ** 2 + f[..., 1] ** 2 + bu ** 2 + bv ** 2) + 0.5
    return float((out | (lhs > rhs)).mean()), float(out.mean())


def store_pairs(path):
    """(video names, [(video index, t, dt, frame t RGB, frame t+dt RGB)]) of a prep store."""
    g = zarr.open_group(str(path), mode="r")
    frames, pairs, valid = g["frames"], g["pairs"][:], g["valid"][:]
    name = Path(path).name.split("-part-")[0]
    videos = json.loads((Path(path).parent / "manifest" / f"{name}-videos.json").read_text())
    names = [Path(v["path"]).name for v in videos["videos"]["videos"]]
    rgb = lambda x: np.ascontiguousarray(x.transpose(1, 2, 0))
    return names, [(int(p[0]), int(p[1]), int(p[2]), rgb(frames[i, 0]), rgb(frames[i, 1]))
                   for i, p in enumerate(pairs) if valid[i]]


# ---- methods -----------------------------------------------------------------------------
class OnnxFlow:
    """The card's model, fed like poodle-prep feeds it."""

    def __init__(self, card_path):
        self.card = json.loads(Path(card_path).read_text())
        onnx_path = Path(card_path).parent / self.card["onnx"]
        data = onnx_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if self.card.get("sha256") and self.card["sha256"] != digest:
            sys.exit(f"{onnx_path} has sha256 {digest}, the card says {self.card['sha256']}")
        self.sess = ort.InferenceSession(data, ort.SessionOptions(), providers=["CPUExecutionProvider"])
        self.name = self.card["name"]

    def _size(self, x):
        m, lo = self.card["size_multiple"], self.card.get("min_size", 0)
        return max(max(1, math.floor(x / m + 0.5)) * m, -(-lo // m) * m)

    def __call__(self, im1, im2):
        h, w = im1.shape[:2]
        mh, mw = self._size(h), self._size(w)
        lo, hi = self.card["value_range"]

        def prep(im):
            if (mh, mw) != (h, w):
                im = cv2.resize(im, (mw, mh), interpolation=cv2.INTER_LINEAR)
            if self.card["channel_order"] == "BGR":
                im = im[..., ::-1]
            x = im.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
            return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

        a, b = self.card["inputs"]
        f = self.sess.run([self.card["output"]], {a: prep(im1), b: prep(im2)})[0][0].transpose(1, 2, 0)
        if (mh, mw) != (h, w):
            f = cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)
            f[..., 0] *= w / mw
            f[..., 1] *= h / mh
        return f


def grey(im):
    return cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)


def dis_flow():
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return lambda im1, im2: dis.calc(grey(im1), grey(im2), None)


def farneback(im1, im2):
    return cv2.calcOpticalFlowFarneback(grey(im1), grey(im2), None, 0.5, 3, 15, 3, 5, 1.2, 0)


def timed(fn, im1, im2, reps):
    fn(im1, im2)  # warm-up
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(im1, im2)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", default=str(ROOT / "models" / "tvl1_flow.json"))
    ap.add_argument("--reps", type=int, default=3, help="timed runs per method (median)")
    ap.add_argument("--store", default=str(STORE),
                    help="prep store of the sample dashcam pairs (make demo writes the default)")
    a = ap.parse_args()
    for p in [FLOW / f for pair in PAIRS.values() for f in pair] + [VIDEO]:
        if not p.exists():
            sys.exit(f"missing {p} (real data: see ../shared/data/README.md)")
    if not Path(a.store).is_dir():
        sys.exit(f"missing {a.store}: run `make demo` (or pass --store)")

    model = OnnxFlow(a.card)
    # zero flow: the floor of the consistency figure (nothing is occluded but the frame edge)
    zero = lambda im1, im2: np.zeros(im1.shape[:2] + (2,), np.float32)
    methods = {model.name: model, "opencv_dis_medium": dis_flow(), "opencv_farneback": farneback,
               "zero_flow": zero}

    results = {m: {} for m in methods}
    for pname, (f1, f2, fgt) in PAIRS.items():
        im1, im2 = read_rgb(FLOW / f1), read_rgb(FLOW / f2)
        gt, valid = read_gt(FLOW / fgt)
        for m, fn in methods.items():
            aee, fl = errors(fn(im1, im2).astype(np.float64), gt, valid)
            results[m][pname] = {"aee": round(aee, 4), "fl_all": round(fl, 2)}

    names, dash = store_pairs(a.store)
    for m, fn in methods.items():
        rows = []
        for vid, t, dt, im1, im2 in dash:
            occ, out = occluded(fn(im1, im2).astype(np.float64), fn(im2, im1).astype(np.float64))
            rows.append({"video": names[vid], "t": t, "dt": dt, "occluded": round(occ, 4),
                         "out_of_frame": round(out, 4)})
        med = lambda key, rs: round(float(np.median([r[key] for r in rs])), 4)
        results[m]["dashcam"] = {
            "pairs": len(rows), "occluded_median": med("occluded", rows),
            "out_of_frame_median": med("out_of_frame", rows),
            "per_clip": {n: med("occluded", [r for r in rows if r["video"] == n])
                         for n in names if any(r["video"] == n for r in rows)},
            "per_pair": rows}

    v1, v2 = decode_frames(VIDEO, [0, 20])
    for m, fn in methods.items():
        secs, f = timed(fn, v1, v2, a.reps)
        results[m]["720p"] = {"seconds_per_pair": round(secs, 4),
                              "median_flow_px": round(float(np.median(np.sqrt((f ** 2).sum(axis=2)))), 2),
                              "warp_error": round(warp_error(v1, v2, f), 2)}

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"machine: {machine()}; {date}")
    print(f"onnxruntime {ort.__version__} (CPU, {os.cpu_count()} threads max), OpenCV {cv2.__version__} "
          f"({cv2.getNumThreads()} threads); 720p pair: {VIDEO.name} frames 0 and 20, "
          f"median of {a.reps}; model card {Path(a.card).name} (size_multiple "
          f"{model.card['size_multiple']}); dashcam: {len(dash)} pairs of {a.store}")
    head = (f"{'method':<22}{'RW AEE':>8}{'RW Fl%':>8}{'KITTI AEE':>11}{'KITTI Fl%':>11}"
            f"{'720p s/pair':>13}{'720p |f| med':>14}{'720p warp err':>15}{'dash occ med':>14}"
            f"{'(out of frame)':>16}  per clip")
    print(head)
    print("-" * len(head))
    for m, r in results.items():
        rw, k, v = r["RubberWhale"], r["KITTI"], r["720p"]
        print(f"{m:<22}{rw['aee']:>8.3f}{rw['fl_all']:>8.2f}{k['aee']:>11.2f}{k['fl_all']:>11.2f}"
              f"{v['seconds_per_pair']:>13.3f}{v['median_flow_px']:>14.2f}{v['warp_error']:>15.2f}"
              f"{r['dashcam']['occluded_median']:>14.3f}{r['dashcam']['out_of_frame_median']:>16.3f}  "
              + ", ".join(f"{n} {x:.3f}" for n, x in r["dashcam"]["per_clip"].items()))
    print(json.dumps({"machine": machine(), "date": date, "onnxruntime": ort.__version__,
                      "opencv": cv2.__version__, "card": Path(a.card).name,
                      "sha256": model.card.get("sha256"), "reps": a.reps, "store": a.store,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
