#!/usr/bin/env python3
"""End-to-end prep throughput on a GPU against the flow model alone, in one run.

Runs ON THE GPU MACHINE from the bundle `make bench-prep-gpu` writes (bench/prep_gpu.sh
unpacks it and calls this). Three figures on the same 720x1280 pairs and batch size:

- prep: `poodle-prep prep --device cuda:0` end to end (decode + forward and backward flow +
  occlusion + write), pairs/s = pairs written / wall time of the job (model load included);
- ort: the same ONNX model through onnxruntime-gpu's Python API on the same batches
  (2 x batch images per call: forward then backward), inputs from host memory, output back
  to host, as prep does: pairs/s;
- torch: torchvision RAFT with the same weights in PyTorch eager, same batches: pairs/s.

Target (issue 13): prep >= 0.9 x ort. Prints a table and one JSON line.
Usage: prep_gpu.py --bundle DIR --out DIR [--batch 4] [--pairs-per-video 48] [--iters 12]
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path


def timed_pairs_per_s(fn, batches, batch, warmup=2):
    for b in batches[:warmup]:
        fn(b)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return len(batches) * batch / (time.perf_counter() - t0)


def real_batches(videos, batch, n_batches, h=720, w=1280):
    """Frame pairs from the sample clips (ffmpeg from the bundle), as uint8 (B, 3, H, W)."""
    import numpy as np
    frames = []
    for clip in sorted(Path(videos).glob("*.mp4")):
        raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(clip), "-vf",
                              f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                             capture_output=True, check=True).stdout
        frames += list(np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3).transpose(0, 3, 1, 2))
    out = []
    for k in range(n_batches):
        idx = [(k * batch + i) % (len(frames) - 20) for i in range(batch)]
        a = np.stack([frames[i] for i in idx])
        b = np.stack([frames[i + 20] for i in idx])
        out.append((a, b))
    return out


def ort_rate(onnx, card, batches, batch):
    import numpy as np
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx), providers=["CUDAExecutionProvider"])
    assert "CUDAExecutionProvider" in sess.get_providers(), sess.get_providers()
    lo, hi = card["value_range"]
    n1, n2 = card["inputs"]

    def run(ab):
        a, b = ab
        x = (np.concatenate([a, b]).astype(np.float32) * ((hi - lo) / 255.0) + lo)
        y = (np.concatenate([b, a]).astype(np.float32) * ((hi - lo) / 255.0) + lo)
        sess.run(None, {n1: x, n2: y})
    return timed_pairs_per_s(run, batches, batch)


def torch_rate(tools, arch, iters, batches, batch):
    import torch
    sys.path.insert(0, str(tools))
    from export_raft import build_model  # the exported weights: same seed, same builder
    model = build_model(arch, False, 0).cuda()

    @torch.no_grad()
    def run(ab):
        a, b = (torch.from_numpy(v).cuda().float() / 127.5 - 1.0 for v in ab)
        model(torch.cat([a, b]), torch.cat([b, a]), num_flow_updates=iters)[-1].cpu()
    return timed_pairs_per_s(run, batches, batch)


def prep_rate(bundle, out, card, batch, pairs_per_video):
    cfg = out / "bench720.json"
    cfg.write_text(json.dumps({
        "name": "bench720", "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": pairs_per_video,
                     "dt_min": 15, "dt_max": 20},
        "height": 720, "width": 1280, "pairs_per_shard": 16, "seed": 0}))
    # The ORT library of the wheel that run.sh installs into bundle/site (the Python API's own).
    libs = sorted((bundle / "site" / "onnxruntime" / "capi").glob("libonnxruntime.so.*"))
    if not libs:
        sys.exit(f"prep_gpu.py: no libonnxruntime.so.* in {bundle / 'site/onnxruntime/capi'} (run.sh installs the wheel there)")
    cmd = [str(bundle / "poodle-prep"), "prep", "--config", str(cfg), "--root",
           str(bundle / "video"), "--out", str(out / "prep"), "--model", str(card),
           "--device", "cuda:0", "--batch-size", str(batch), "--decode-workers", "8",
           "--ort-lib", str(libs[0]), "--quiet"]
    s = json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout)
    return s["pairs_written"] / s["wall_s"], s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pairs-per-video", type=int, default=48)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--arch", default="large")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    onnx = a.out / f"raft_{a.arch}.onnx"
    # Random weights (allowed for speed); opset 16: the legacy exporter at 17 is wrong for
    # raft_large (../shared/GPU.md). The script checks ONNX against PyTorch before the card.
    subprocess.run([sys.executable, str(a.bundle / "tools" / "export_raft.py"), "--arch", a.arch,
                    "--iters", str(a.iters), "--opset", "16", "--height", "360", "--width", "640",
                    "--out", str(onnx), "--check-pair", str(a.bundle / "flow" / "rubberwhale1.png"),
                    str(a.bundle / "flow" / "rubberwhale2.png")], check=True)
    card_path = onnx.with_suffix(".json")
    card = json.loads(card_path.read_text())
    batches = real_batches(a.bundle / "video", a.batch, 12)
    prep, summary = prep_rate(a.bundle, a.out, card_path, a.batch, a.pairs_per_video)
    ort_ps = ort_rate(onnx, card, batches, a.batch)
    torch_ps = torch_rate(a.bundle / "tools", a.arch, a.iters, batches, a.batch)
    res = {"card": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": f"raft_{a.arch} random weights, {a.iters} iterations", "size": [720, 1280],
           "batch_pairs": a.batch, "prep_pairs_per_s": prep, "ort_pairs_per_s": ort_ps,
           "torch_pairs_per_s": torch_ps, "prep_over_ort": prep / ort_ps,
           "prep_stages": {k: summary[k] for k in ("decode", "flow", "occlusion", "write")}}
    print(f"{'prep end to end':<20} {prep:8.2f} pairs/s ({prep / ort_ps:.2f} x ORT alone)")
    print(f"{'ORT alone':<20} {ort_ps:8.2f} pairs/s")
    print(f"{'torchvision RAFT':<20} {torch_ps:8.2f} pairs/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
