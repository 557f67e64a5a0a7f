#!/usr/bin/env python3
"""Store codec measurement: bytes per pair and encode/decode speed of candidate codecs.

Run with the project venv (numpy and zarr only):

    .venv/bin/python bench/store_codecs.py                 # preps a 360x640 store first
    .venv/bin/python bench/store_codecs.py --store S.zarr  # frames from an existing store

Data, chosen to be realistic rather than convenient:
- frames: the real `frames` of a poodle store (default: the sample dashcam clips prepared
  at 360x640, 2 pairs per video, 4 pairs per shard, by `poodle-prep prep`);
- flow: not the store's flow (the random-weight RAFT's output is noise, which compresses
  nothing like real flow) but the dense Middlebury RubberWhale ground truth
  (../shared/data/flow/Middlebury_flow_gt.flo; unknown values > 1e9 set to 0), resized
  (bilinear, aspect kept, flow scaled with it) and centre-cropped to the frame size, one
  flip per pair, quantised like the store (int16 at 1/32 px). RubberWhale's motion is small
  (median 1.2 px, max 4.6 px), dashcam pairs 15-30 frames apart move far more, so the same
  field is also measured with its motion times 8 ("x8");
- occlusion: the GT's unknown-flow mask (mostly occlusions, 1.6 % of pixels) as the bool mask.

Each candidate is written with zarr-python into an in-memory store with the poodle layout
(sharding codec, one pair per inner chunk, pairs_per_shard pairs per shard) and read back.
Bytes are the stored bytes (shard index included) over the pairs; MB/s are raw (decoded)
megabytes (1e6 bytes) per second, best of --repeats, through zarr-python (its own thread
pool), and single-threaded through the same numcodecs codec on each pair's chunk (per-core
rate; blosc threads off). Speeds on a shared machine are noisy: rerun and compare. 720p numbers are an EXTRAPOLATION: bytes scaled by the pixel count
(1280*720 / (H*W)); higher resolutions are usually a little more compressible per pixel.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from machine import cpu_name  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLO = os.path.join(REPO, "..", "shared", "data", "flow", "Middlebury_flow_gt.flo")
VIDEOS = os.path.join(REPO, "..", "shared", "data", "video")
FLOW_SCALE = 1.0 / 32.0
P720 = 720 * 1280


# ---------------------------------------------------------------------------------- data


def read_flo(path):
    """Middlebury .flo: 'PIEH' (float 202021.25), width, height (int32), then (u, v) float32."""
    with open(path, "rb") as f:
        raw = f.read()
    tag = np.frombuffer(raw[:4], "<f4")[0]
    if tag != np.float32(202021.25):
        sys.exit(f"{path}: not a .flo file (tag {tag})")
    w, h = (int(x) for x in np.frombuffer(raw[4:12], "<i4"))
    flow = np.frombuffer(raw[12:12 + 8 * w * h], "<f4").reshape(h, w, 2).astype(np.float32)
    unknown = (np.abs(flow) > 1e9).any(axis=-1)
    flow = flow.copy()
    flow[unknown] = 0.0
    return flow, unknown


def _coords(n_in, n_out):
    """Source coordinates of output pixel centres (align_corners=False, like flowmath)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(img, out_h, out_w):
    y0, y1, fy = _coords(img.shape[0], out_h)
    x0, x1, fx = _coords(img.shape[1], out_w)
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def resize_nearest(mask, out_h, out_w):
    ys = np.minimum(((np.arange(out_h) + 0.5) * mask.shape[0] / out_h).astype(np.int64), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(out_w) + 0.5) * mask.shape[1] / out_w).astype(np.int64), mask.shape[1] - 1)
    return mask[ys][:, xs]


def gt_flow(h_out, w_out):
    """Middlebury GT resized to cover (h_out, w_out) with its aspect kept, centre-cropped.
    Returns flow (2, H, W) float32 in output pixels and the unknown mask (H, W)."""
    flow, unknown = read_flo(FLO)
    h, w = unknown.shape
    s = max(h_out / h, w_out / w)
    nh, nw = max(h_out, round(h * s)), max(w_out, round(w * s))
    f = resize_bilinear(flow, nh, nw)
    f[..., 0] *= nw / w
    f[..., 1] *= nh / h
    m = resize_nearest(unknown, nh, nw)
    y, x = (nh - h_out) // 2, (nw - w_out) // 2
    f = f[y:y + h_out, x:x + w_out]
    m = m[y:y + h_out, x:x + w_out]
    return np.ascontiguousarray(f.transpose(2, 0, 1)).astype(np.float32), m


def flow_pairs(base, mask, n, gain):
    """n pairs of (2, H, W) flow and (H, W) masks: the GT field times gain, flipped per pair."""
    flows, masks = [], []
    for k in range(n):
        f, m = base * gain, mask
        if k % 2 == 1:  # horizontal flip: u changes sign
            f = f[:, :, ::-1] * np.array([-1, 1], np.float32)[:, None, None]
            m = m[:, ::-1]
        if (k // 2) % 2 == 1:  # vertical flip: v changes sign
            f = f[:, ::-1, :] * np.array([1, -1], np.float32)[:, None, None]
            m = m[::-1, :]
        flows.append(f)
        masks.append(m)
    return np.ascontiguousarray(np.stack(flows)), np.ascontiguousarray(np.stack(masks))


def quantize(flow_px):
    """Like flowmath::quantize_flow: round(flow / scale), saturated to int16."""
    q = np.rint(flow_px / FLOW_SCALE)
    return np.clip(q, -32768, 32767).astype(np.int16)


def find_prep_binary():
    """The newer of target/release and target/debug poodle-prep."""
    found = [os.path.join(REPO, "target", p, "poodle-prep") for p in ("release", "debug")]
    found = [p for p in found if os.access(p, os.X_OK)]
    if not found:
        sys.exit("no poodle-prep binary: run `cargo build -p poodle-prep` (or pass --store)")
    return max(found, key=os.path.getmtime)


def prep_store(work, height, width, pairs_per_shard, pairs_per_video):
    if not os.path.isdir(VIDEOS):
        sys.exit(f"sample videos not found at {VIDEOS}; pass --store with a prepared store")
    cfg = {
        "name": "codecs",
        "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": pairs_per_video,
                     "dt_min": 15, "dt_max": 30},
        "height": height, "width": width, "pairs_per_shard": pairs_per_shard, "seed": 0,
    }
    cfg_path = os.path.join(work, "codecs.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    out = os.path.join(work, "out")
    cmd = [find_prep_binary(), "prep", "--config", cfg_path, "--root", VIDEOS, "--out", out,
           "--quiet"]
    print("preparing frames:", " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"poodle-prep failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return os.path.join(out, "codecs-part-00000-of-00001.zarr")


# ---------------------------------------------------------------------------- measuring


def stored_bytes(store):
    """Bytes of all chunk/shard objects of an in-memory store (metadata excluded)."""
    return sum(len(v) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))


def measure_zarr(data, compressor, pairs_per_shard, repeats):
    """Write `data` (N, ...) into a sharded in-memory array like poodle's and read it back."""
    n = data.shape[0]
    best_enc = best_dec = float("inf")
    nbytes = None
    for _ in range(repeats):
        store = zarr.storage.MemoryStore()
        arr = zarr.create_array(
            store=store, shape=data.shape, dtype=data.dtype,
            chunks=(1,) + data.shape[1:], shards=(pairs_per_shard,) + data.shape[1:],
            compressors=[compressor], filters=None, fill_value=0,
        )
        t0 = time.perf_counter()
        arr[:] = data
        best_enc = min(best_enc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = arr[:]
        best_dec = min(best_dec, time.perf_counter() - t0)
        if not np.array_equal(back, data):
            sys.exit(f"round trip mismatch for {compressor}")
        nbytes = stored_bytes(store)
    return nbytes / n, data.nbytes / best_enc / 1e6, data.nbytes / best_dec / 1e6


def measure_1t(data, codec, repeats):
    """Single-thread codec rate over every pair's inner chunk (numcodecs, blosc threads off),
    best of `repeats` passes after one warm-up pass."""
    chunks = [np.ascontiguousarray(p) for p in data]
    raw = sum(c.nbytes for c in chunks)
    enc_t = dec_t = float("inf")
    for i in range(max(repeats, 3) + 1):
        t0 = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        t2 = time.perf_counter()
        if i > 0:
            enc_t, dec_t = min(enc_t, t1 - t0), min(dec_t, t2 - t1)
    return raw / enc_t / 1e6, raw / dec_t / 1e6


def zstd(level):
    return f"zstd {level}", ZstdCodec(level=level), numcodecs.Zstd(level=level)


def blosc(clevel, shuffle, typesize):
    nc_shuffle = {"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[shuffle]
    # c-blosc maps its clevel to zstd's as 2*clevel - 1: clevel 2 is zstd level 3.
    return (f"blosc-zstd c{clevel} {shuffle}",
            BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=typesize),
            numcodecs.Blosc(cname="zstd", clevel=clevel, shuffle=nc_shuffle))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="poodle store whose frames to use (default: prep one)")
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--pairs-per-video", type=int, default=2)
    ap.add_argument("--pairs-per-shard", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", help="folder for the prepared store (default: a temp folder)")
    args = ap.parse_args()
    numcodecs.blosc.use_threads = False

    store_path = args.store
    tmp = None
    if store_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="poodle-codecs-") if args.work is None else None
        work = args.work or tmp.name
        os.makedirs(work, exist_ok=True)
        store_path = prep_store(work, args.height, args.width, args.pairs_per_shard,
                                args.pairs_per_video)
    root = zarr.open_group(store_path, mode="r")
    frames = root["frames"][:]
    valid = root["valid"][:]
    frames = frames[valid]
    if frames.shape[0] == 0:
        sys.exit(f"{store_path}: no valid pairs")
    n, _, _, h, w = frames.shape
    pps = int(dict(root.attrs)["poodle"]["geometry"]["pairs_per_shard"])
    scale720 = P720 / (h * w)

    base_flow, base_mask = gt_flow(h, w)
    datasets = {}  # name -> (array data, kind, float flow for error, note)
    datasets["frames"] = (frames, "frames uint8")
    for gain, tag in ((1.0, "x1"), (8.0, "x8")):
        fpx, masks = flow_pairs(base_flow, base_mask, n, gain)
        datasets[f"flow_{tag}"] = (quantize(fpx), f"flow int16 {tag}", fpx)
        datasets[f"flow_{tag}_f16"] = (fpx.astype(np.float16), f"flow float16 {tag}", fpx)
        if tag == "x1":
            datasets["occlusion"] = (masks.astype(bool), "occlusion bool")

    plan = [
        ("frames", [zstd(1), zstd(3), zstd(9), blosc(2, "shuffle", 1), blosc(2, "bitshuffle", 1)]),
    ]
    for tag in ("x1", "x8"):
        plan.append((f"flow_{tag}", [zstd(1), zstd(3), zstd(9), blosc(2, "shuffle", 2),
                                     blosc(2, "bitshuffle", 2)]))
        plan.append((f"flow_{tag}_f16", [zstd(3)]))
    plan.append(("occlusion", [zstd(3)]))

    rows = []
    for key, codecs in plan:
        entry = datasets[key]
        data, kind = entry[0], entry[1]
        raw = data[0].nbytes
        max_err = None
        if len(entry) > 2:
            max_err = float(np.abs(data.astype(np.float32) * (FLOW_SCALE if data.dtype == np.int16 else 1.0)
                                   - entry[2]).max())
        for name, zc, nc in codecs:
            bpp, enc, dec = measure_zarr(data, zc, pps, args.repeats)
            enc1, dec1 = measure_1t(data, nc, args.repeats)
            rows.append({
                "data": kind, "codec": name, "raw_bytes_per_pair": raw,
                "bytes_per_pair": round(bpp), "ratio": raw / bpp,
                "bytes_per_pair_720p": round(bpp * scale720),
                "raw_bytes_per_pair_720p": round(raw * scale720),
                "enc_mb_s": enc, "dec_mb_s": dec, "enc_mb_s_1t": enc1, "dec_mb_s_1t": dec1,
                "max_err_px": max_err,
            })

    mag = np.hypot(base_flow[0], base_flow[1])
    print(f"store codecs: {n} pairs of {h}x{w} frames from {store_path}, {pps} pairs/shard, "
          f"inner chunk = 1 pair")
    print(f"flow: Middlebury GT at {h}x{w}: median |f| {np.median(mag):.2f} px, max {mag.max():.2f} px "
          f"(x8: {8 * np.median(mag):.1f} / {8 * mag.max():.1f} px); occlusion = GT unknown mask, "
          f"{base_mask.mean() * 100:.1f} % of pixels")
    print(f"zarr-python {zarr.__version__}, numcodecs {numcodecs.__version__}, numpy {np.__version__}; "
          f"{cpu_name()}, {os.cpu_count()} CPUs; {datetime.date.today().isoformat()}")
    print(f"720p columns: EXTRAPOLATED, bytes x {scale720:g} (pixel count {P720} / {h * w})")
    hdr = (f"{'data':<18} {'codec':<26} {'raw/pair':>10} {'bytes/pair':>10} {'ratio':>6} "
           f"{'720p raw':>10} {'720p est':>10} {'enc MB/s':>9} {'dec MB/s':>9} "
           f"{'enc 1t':>7} {'dec 1t':>7} {'max err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        err = f"{r['max_err_px']:.4f}" if r["max_err_px"] is not None else ""
        print(f"{r['data']:<18} {r['codec']:<26} {r['raw_bytes_per_pair']:>10} {r['bytes_per_pair']:>10} "
              f"{r['ratio']:>6.2f} {r['raw_bytes_per_pair_720p']:>10} {r['bytes_per_pair_720p']:>10} "
              f"{r['enc_mb_s']:>9.1f} {r['dec_mb_s']:>9.1f} {r['enc_mb_s_1t']:>7.1f} "
              f"{r['dec_mb_s_1t']:>7.1f} {err:>8}")

    def pick(data, codec):
        return next(r for r in rows if r["data"] == data and r["codec"] == codec)

    # A whole pair at the store's default codecs (frames zstd 3, flow zstd 3), 720p estimate.
    totals = {}
    for tag in ("x1", "x8"):
        fr, fl, oc = pick("frames uint8", "zstd 3"), pick(f"flow int16 {tag}", "zstd 3"), pick("occlusion bool", "zstd 3")
        totals[tag] = {
            "forward_only_720p": fr["bytes_per_pair_720p"] + fl["bytes_per_pair_720p"] + oc["bytes_per_pair_720p"],
            "with_backward_720p": fr["bytes_per_pair_720p"] + 2 * fl["bytes_per_pair_720p"] + oc["bytes_per_pair_720p"],
        }
    raw720 = 6 * P720 + 8 * P720  # uint8 frames + float32 forward flow (pipeline's raw_bytes_per_pair)
    print(f"720p pair at zstd 3 (estimate; frames + forward flow + occlusion): "
          f"{totals['x1']['forward_only_720p'] / 1e6:.2f} MB (x1 motion), "
          f"{totals['x8']['forward_only_720p'] / 1e6:.2f} MB (x8); with backward "
          f"{totals['x1']['with_backward_720p'] / 1e6:.2f} / {totals['x8']['with_backward_720p'] / 1e6:.2f} MB; "
          f"raw (uint8 frames + float32 flow) {raw720 / 1e6:.2f} MB")
    print(json.dumps({
        "bench": "store_codecs", "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "pairs": int(n), "height": int(h), "width": int(w),
        "pairs_per_shard": pps, "scale_to_720p": scale720, "extrapolated_720p": True,
        "rows": rows, "totals_720p_zstd3": totals, "raw_720p_float32_flow": raw720,
    }))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
