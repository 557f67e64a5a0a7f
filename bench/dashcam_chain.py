#!/usr/bin/env python3
"""How much of a sample dashcam pair leaves the frame at the dataset's gaps, estimated without
ground truth by chaining short-gap flows.

The forward-backward check marks a pixel occluded when its forward target is out of frame, so
even an exact flow scores that share. Flow over one frame (40 ms at 25 fps) is small and easy;
chaining the dt one-frame flows of the card's model, F(x) <- F(x) + f_k(x + F(x)), follows each
pixel of frame t to frame t+dt. Per pair of a `make demo` store (same videos, t and dt, frames
decoded with ffmpeg's area scaling like prep) it prints the share of pixels the chain loses out
of the frame, the chained flow's median magnitude, and the median endpoint distance between the
model's direct two-frame flow and the chained one over the pixels that stay in frame.
Chaining accumulates small errors (drift in textureless sky), so read it as an estimate.

    .venv-flow/bin/python bench/dashcam_chain.py [--card models/tvl1_flow.json] [--store S]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import zarr

from flow_vs_opencv import DATA, ROOT, STORE, OnnxFlow, bilinear  # bench/flow_vs_opencv.py
from machine import machine  # bench/machine.py


def decode(path, first, last, w, h):
    """RGB frames first..last (inclusive) at w x h, scaled by ffmpeg as prep scales them."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-vf",
         f"select='between(n\\,{first}\\,{last})',scale={w}:{h}:flags=area+accurate_rnd+full_chroma_int",
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    if len(frames) != last - first + 1:
        sys.exit(f"{path}: decoded {len(frames)} frames, wanted {last - first + 1}")
    return list(frames)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", default=str(ROOT / "models" / "tvl1_flow.json"))
    ap.add_argument("--store", default=str(STORE))
    a = ap.parse_args()
    model = OnnxFlow(a.card)
    g = zarr.open_group(a.store, mode="r")
    pairs, (_, _, _, h, w) = g["pairs"][:], g["frames"].shape
    name = Path(a.store).name.split("-part-")[0]
    man = json.loads((Path(a.store).parent / "manifest" / f"{name}-videos.json").read_text())
    root = ROOT / man["root"] if man.get("root") else DATA / "video"  # relative: the repo root
    videos = [root / v["path"] for v in man["videos"]["videos"]]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    rows = []
    for vid, t, dt in pairs:
        fr = decode(videos[vid], int(t), int(t + dt), w, h)
        F = np.zeros((h, w, 2))
        lost = np.zeros((h, w), bool)
        for k in range(dt):
            x, y = xs + F[..., 0], ys + F[..., 1]
            lost |= ~((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1))
            f = model(fr[k], fr[k + 1]).astype(np.float64)
            F = F + np.stack([bilinear(f[..., 0], x, y), bilinear(f[..., 1], x, y)], axis=2)
        x, y = xs + F[..., 0], ys + F[..., 1]
        lost |= ~((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1))
        direct = model(fr[0], fr[-1]).astype(np.float64)
        dist = np.sqrt(((direct - F) ** 2).sum(axis=2))[~lost]
        rows.append({"video": videos[vid].name, "t": int(t), "dt": int(dt),
                     "chained_out_of_frame": round(float(lost.mean()), 4),
                     "chained_median_px": round(float(np.median(np.sqrt((F ** 2).sum(axis=2)))), 2),
                     "direct_vs_chained_median_px": round(float(np.median(dist)), 2)})
        print(json.dumps(rows[-1]), flush=True)
    med = lambda k: round(float(np.median([r[k] for r in rows])), 4)
    print(f"machine: {machine()}; card {Path(a.card).name}; {len(rows)} pairs of {a.store}")
    print(f"median over pairs: chained out of frame {med('chained_out_of_frame'):.3f}, chained |F| "
          f"{med('chained_median_px'):.1f} px, direct vs chained {med('direct_vs_chained_median_px'):.1f} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
