#!/usr/bin/env python3
"""PyTorch eager baseline of one dense-loss call, for `make gpu-check`'s `dense` stage.

The same size as poodle's `gpu-check --only dense`: 4 samples, 256 channels, stride-8 maps
(64 x 128) of a 512 x 1024 crop, forward and backward into the online map (the target map
is detached), f32 on CUDA. Two forms:

- `baseline`: the dense part of ../shared/bench/torch_poodle_step.py (upsample both maps with
  F.interpolate, warp the target with F.grid_sample, F.normalize, 2 - 2 cos, mean);
- `authors`: the authors' order as poodle's default follows it (their src/models/poodle.py):
  upsample, warp the target by the flow, undo the target view's affine with a second
  grid_sample, F.normalize, masked squared difference, per-sample masked mean.

Prints one JSON line per form (`error` instead where the form failed): seconds per call and peak allocated GiB
(torch.cuda.max_memory_allocated after reset_peak_memory_stats with the inputs allocated,
as the candle stage measures from its inputs). Needs torch with CUDA.
"""

import json
import math
import time

import torch
import torch.nn.functional as F

N, C, H, W = 4, 256, 512, 1024
dev = torch.device("cuda")


def base_grid(flow):
    """Normalised sampling grid (align_corners=True) of pixel + flow, flow in pixels."""
    yy, xx = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                            torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    x = xx[None] + flow[:, 0]
    y = yy[None] + flow[:, 1]
    return torch.stack((2 * x / (W - 1) - 1, 2 * y / (H - 1) - 1), -1)


def affine_grid(deg, scale):
    """Grid reading each output pixel at the inverse of a rotation+scale about the centre."""
    a = math.radians(deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin * H / W, 0.0], [sin * W / H, cos, 0.0]], device=dev)
    return F.affine_grid(theta[None].expand(N, 2, 3), (N, C, H, W), align_corners=True)


def baseline(q, t, flow, occ):
    grid = base_grid(flow)
    qu = F.interpolate(q, size=(H, W), mode="bilinear", align_corners=False)
    tu = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)
    tu = F.grid_sample(tu, grid, mode="bilinear", align_corners=True)
    return (2 - 2 * (F.normalize(qu, dim=1) * F.normalize(tu, dim=1)).sum(1)).mean()


def authors(q, t, flow, occ):
    grid = base_grid(flow)
    undo = affine_grid(10.0, 1.1)
    qu = F.interpolate(q, size=(H, W), mode="bilinear", align_corners=False)
    tu = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)
    warped = F.grid_sample(tu, grid, mode="bilinear", align_corners=True)
    tz = F.grid_sample(warped, undo, mode="bilinear", align_corners=True)
    inside = ((grid.abs() <= 1).all(-1) & (undo.abs() <= 1).all(-1)).float()[:, None]
    m = inside * (1 - occ)
    d = (F.normalize(qu, dim=1) - F.normalize(tz, dim=1)).pow(2).sum(1, keepdim=True)
    return ((d * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) + 1e-7)).mean()


def bench(name, fn, iters=5, warm=2):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(N, C, H // 8, W // 8, device=dev, generator=g).requires_grad_()
    t = torch.randn(N, C, H // 8, W // 8, device=dev, generator=g)
    flow = torch.randn(N, 2, H, W, device=dev, generator=g) * 3
    occ = (torch.randn(N, 1, H, W, device=dev, generator=g) > 1).float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warm):
        fn(q, t, flow, occ).backward()
        q.grad = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = fn(q, t, flow, occ)
        loss.backward()
        q.grad = None
    torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / iters
    print(json.dumps({"kind": "torch_dense", "form": name, "n": N, "c": C, "crop": [H, W], "s": s,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}),
          flush=True)
    del q, t, flow, occ
    torch.cuda.empty_cache()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, fn in (("baseline", baseline), ("authors", authors)):
        # One form's failure (an out-of-memory, say) must not cost the other its row: the
        # report takes its memory ratio against `authors`.
        try:
            bench(name, fn)
        except Exception as e:
            print(json.dumps({"kind": "torch_dense", "form": name, "error": repr(e)[:300]}), flush=True)
        torch.cuda.empty_cache()
