#!/usr/bin/env python3
"""PyTorch reference forms of poodle-train's losses, sampler, AdamW and EMA.

Writes small safetensors fixtures that `poodle-train/tests/loss_parity.rs` checks the candle
implementation against (CI has no PyTorch; rerun this only to regenerate them):

    .venv-ref/bin/python tools/torch_reference_losses.py [OUT_DIR]

OUT_DIR defaults to poodle-train/tests/fixtures/loss. Needs torch and safetensors.

Reference forms (the candle code must agree with these, see its module docs):
- upsampling: F.interpolate(mode='bilinear', align_corners=False) to the crop size;
- sampling: F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True) at
  grid = 2 * p / (size - 1) - 1 for pixel coordinates p; masks are computed from p
  (inside [0, W-1] x [0, H-1]);
- dense loss (paper Eq. (1), docs/method.md): z_o(y) = up(pred)(A_o^-1 y),
  z_t(y) = up(proj)(A_t^-1 (y + flow(y))), m = valid_o * valid_t * (1 - occluded),
  per sample sum(m |n(z_o) - n(z_t)|^2) / (sum(m) + 1e-7), batch mean, n = F.normalize;
- pooled loss: mean over pairs of |n(q) - n(z)|^2;
- torch.optim.AdamW with a decay and a no-decay group; clip_grad_norm_; EMA.

The loss references run in float64 from float32 inputs (so they are exact up to f64
rounding); AdamW and EMA run in float32 as in training. Inputs are stored as float32.
"""

import math
import pathlib
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "poodle-train/tests/fixtures/loss"
GEN = torch.Generator().manual_seed(20240607)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float32)


def rand(*shape):
    return torch.rand(*shape, generator=GEN, dtype=torch.float32)


# --- geometry: same formulas, same operation order as poodle-train/src/geom.rs -------------

def about_centre(w, h, deg, scale, flip):
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    r = math.radians(deg)
    s, c = math.sin(r), math.cos(r)
    fx = -1.0 if flip else 1.0
    a, b, d, e = c * fx / scale, s / scale, -s * fx / scale, c / scale
    return [a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy]


def inverse(m):
    a, b, c, d, e, f = m
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return [ia, ib, -(ia * c + ib * f), id_, ie, -(id_ * c + ie * f)]


def apply(m, x, y):
    return m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]


def inside(x, y, h, w):
    return (x >= 0) & (y >= 0) & (x <= w - 1) & (y <= h - 1)


def to_grid(x, y, h, w):
    return torch.stack([2.0 * x / (w - 1) - 1.0, 2.0 * y / (h - 1) - 1.0], dim=-1)


def boundary_distance(x, y, h, w):
    """Smallest distance of any coordinate to the mask boundary (robustness of the fixture)."""
    d = torch.stack([x.abs(), (x - (w - 1)).abs(), y.abs(), (y - (h - 1)).abs()])
    return d.min().item()


def gs(x, grid):
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# --- dense loss ---------------------------------------------------------------------------

def dense_reference(pred, proj, a_on, a_tg, flow, occ, h, w):
    """Returns loss, mask, z_o, z_t (unnormalised), min boundary distance."""
    n = pred.shape[0]
    up_o = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)
    up_t = F.interpolate(proj, size=(h, w), mode="bilinear", align_corners=False)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    grids_o, grids_t, masks, dist = [], [], [], math.inf
    for b in range(n):
        px, py = apply(inverse(a_on[b]), xs, ys)
        valid_o = inside(px, py, h, w)
        qx = xs + flow[b, 0].double()
        qy = ys + flow[b, 1].double()
        tx, ty = apply(inverse(a_tg[b]), qx, qy)
        valid_t = inside(qx, qy, h, w) & inside(tx, ty, h, w)
        grids_o.append(to_grid(px, py, h, w))
        grids_t.append(to_grid(tx, ty, h, w))
        masks.append((valid_o & valid_t).double())
        dist = min(dist, boundary_distance(px, py, h, w), boundary_distance(qx, qy, h, w),
                   boundary_distance(tx, ty, h, w))
    z_o = gs(up_o, torch.stack(grids_o))
    z_t = gs(up_t, torch.stack(grids_t))
    m = torch.stack(masks).unsqueeze(1) * (1.0 - occ.double())
    d = ((F.normalize(z_o, dim=1) - F.normalize(z_t, dim=1)) ** 2).sum(1, keepdim=True)
    per = (m * d).sum((1, 2, 3)) / (m.sum((1, 2, 3)) + 1e-7)
    return per.mean(), m, z_o, z_t, dist, up_t, torch.stack(grids_o)


def dense_fixture():
    n, c, h8, w8, h, w = 2, 8, 4, 6, 16, 24
    pred = randn(n, c, h8, w8)
    proj = randn(n, c, h8, w8)
    # (degrees, scale, flip) per sample and branch.
    p_on = [(7.0, 1.08, 1.0), (-9.5, 0.95, 0.0)]
    p_tg = [(-5.0, 0.93, 0.0), (3.0, 1.1, 1.0)]
    a_on = [about_centre(w, h, d, s, f > 0.5) for d, s, f in p_on]
    a_tg = [about_centre(w, h, d, s, f > 0.5) for d, s, f in p_tg]
    # A smooth flow with a per-sample drift: some vectors leave the crop.
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    flow = torch.zeros(n, 2, h, w)
    flow[0, 0] = 2.5 + 1.7 * torch.sin(2 * math.pi * ys / h + 0.3)
    flow[0, 1] = 0.8 * torch.cos(2 * math.pi * xs / w)
    flow[1, 0] = -1.3 * torch.cos(math.pi * ys / h) + 0.4 * torch.sin(xs / 3.0)
    flow[1, 1] = -2.2 + 1.1 * torch.sin(2 * math.pi * xs / w + 1.0)
    flow = flow + 0.05 * randn(n, 2, h, w)
    occ = (rand(n, 1, h, w) < 0.15).float()

    pred64 = pred.double().requires_grad_(True)
    proj64 = proj.double().requires_grad_(True)
    loss, m, z_o, z_t, dist, up_t, grid_o = dense_reference(pred64, proj64, a_on, a_tg, flow, occ, h, w)
    assert dist > 1e-5, f"a sample point lies {dist} from a mask boundary; change the fixture"
    gp, gq = torch.autograd.grad(loss, [pred64, proj64])
    # Sanity: detaching the target leaves the online gradient unchanged.
    loss_d, *_ = dense_reference(pred64, proj64.detach(), a_on, a_tg, flow, occ, h, w)
    (gp_d,) = torch.autograd.grad(loss_d, [pred64])
    assert torch.allclose(gp, gp_d)
    frac = m.mean().item()
    assert 0.3 < frac < 0.9, frac
    out_t = ((m == 0) & (occ == 0)).double().mean().item()
    print(f"dense: loss {loss.item():.6f}, mask fraction {frac:.3f}, "
          f"non-occluded but out of bounds {out_t:.3f}, min boundary distance {dist:.2e}")

    # For information only: the paper-literal two-pass form (resample the target onto the crop
    # grid with A_t^-1, then warp that by the flow) against the one-pass composition used here.
    ys64, xs64 = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    two = []
    for b in range(n):
        tx, ty = apply(inverse(a_tg[b]), xs64, ys64)
        stage1 = gs(up_t[b:b + 1], to_grid(tx, ty, h, w)[None])
        qx, qy = xs64 + flow[b, 0].double(), ys64 + flow[b, 1].double()
        two.append(gs(stage1, to_grid(qx, qy, h, w)[None])[0])
    two = torch.stack(two)
    d2 = ((F.normalize(z_o, dim=1) - F.normalize(two, dim=1)) ** 2).sum(1, keepdim=True)
    loss2 = ((m * d2).sum((1, 2, 3)) / (m.sum((1, 2, 3)) + 1e-7)).mean()
    print(f"dense: two-pass (resample twice) form gives {loss2.item():.6f} (not a fixture)")

    # Upsampling alone (identity affines, zero flow): z = F.interpolate(x).
    up_in = randn(1, 3, 5, 7)
    up_ref = F.interpolate(up_in.double(), size=(13, 17), mode="bilinear", align_corners=False)

    return {
        "pred": pred,
        "proj": proj,
        "flow": flow,
        "occluded": occ,
        "params_online": torch.tensor(p_on, dtype=torch.float64),
        "params_target": torch.tensor(p_tg, dtype=torch.float64),
        "affine_online": torch.tensor(a_on, dtype=torch.float64),
        "affine_target": torch.tensor(a_tg, dtype=torch.float64),
        "crop": torch.tensor([h, w], dtype=torch.int64),
        "loss": loss.detach().reshape(()),
        "grad_pred": gp,
        "grad_proj": gq,
        "mask": m,
        "z_online_masked": (z_o * m).detach().float(),
        "z_target_masked": (z_t * m).detach().float(),
        "up_in": up_in,
        "up_ref": up_ref,
    }


# --- sampler ------------------------------------------------------------------------------

def sampler_fixture():
    n, c, h, w, ho, wo = 2, 3, 5, 7, 6, 9
    x = randn(n, c, h, w)
    coords = torch.empty(n, ho, wo, 2)
    coords[..., 0] = rand(n, ho, wo) * (w + 0.4) - 0.7  # [-0.7, w - 0.3]
    coords[..., 1] = rand(n, ho, wo) * (h + 0.4) - 0.7
    coords[0, 0, 0] = torch.tensor([w - 1.0, h - 1.0])  # exact corner: inside
    coords[0, 0, 1] = torch.tensor([0.0, 2.0])  # exact edge: inside
    coords[1, 0, 0] = torch.tensor([3.0, 2.0])  # integer point: exact pixel
    cx, cy = coords[..., 0].double(), coords[..., 1].double()
    mask = inside(cx, cy, h, w).double().unsqueeze(1)
    x64 = x.double().requires_grad_(True)
    out = gs(x64, to_grid(cx, cy, h, w)) * mask
    g = randn(n, c, ho, wo)
    (gx,) = torch.autograd.grad((out * g.double()).sum(), [x64])
    frac = mask.mean().item()
    assert 0.4 < frac < 0.95, frac
    print(f"sampler: {frac:.2f} of points inside")
    return {"x": x, "coords": coords, "out": out.detach(), "mask": mask, "g": g, "grad_x": gx}


# --- pooled loss --------------------------------------------------------------------------

def pooled_fixture():
    m, d = 12, 16  # N = 2 pairs of frames x K = 6 subcrops
    q = randn(m, d)
    z = randn(m, d) + 0.8 * q  # correlated, like a half-trained pair
    q64 = q.double().requires_grad_(True)
    z64 = z.double().requires_grad_(True)
    loss = ((F.normalize(q64, dim=1) - F.normalize(z64, dim=1)) ** 2).sum(1).mean()
    gq, gz = torch.autograd.grad(loss, [q64, z64])
    cos = F.cosine_similarity(q64, z64, dim=1)
    assert torch.allclose(loss, (2 - 2 * cos).mean())
    print(f"pooled: loss {loss.item():.6f}")
    return {"q": q, "z": z, "loss": loss.detach().reshape(()), "grad_q": gq, "grad_z": gz}


# --- AdamW, clipping, EMA -----------------------------------------------------------------

def adamw_fixture():
    w0, b0 = randn(4, 5), randn(5)
    g1w, g1b, g2w, g2b = randn(4, 5), 0.1 * randn(5), 3.0 * randn(4, 5), randn(5)
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(b0.clone())
    lr1, lr2, wd = 1e-3, 5e-4, 0.01
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
        lr=lr1, betas=(0.9, 0.999), eps=1e-6, foreach=False,
    )
    out = {"w0": w0, "b0": b0, "g1w": g1w, "g1b": g1b, "g2w": g2w, "g2b": g2b,
           "lr": torch.tensor([lr1, lr2], dtype=torch.float64),
           "weight_decay": torch.tensor(wd, dtype=torch.float64)}
    w.grad, b.grad = g1w.clone(), g1b.clone()
    opt.step()
    out.update({"w1": w.detach().clone(), "b1": b.detach().clone(),
                "m1w": opt.state[w]["exp_avg"].clone(), "v1w": opt.state[w]["exp_avg_sq"].clone(),
                "m1b": opt.state[b]["exp_avg"].clone(), "v1b": opt.state[b]["exp_avg_sq"].clone()})
    for group in opt.param_groups:
        group["lr"] = lr2
    w.grad, b.grad = g2w.clone(), g2b.clone()
    opt.step()
    out.update({"w2": w.detach().clone(), "b2": b.detach().clone(),
                "m2w": opt.state[w]["exp_avg"].clone(), "v2w": opt.state[w]["exp_avg_sq"].clone()})
    assert int(opt.state[w]["step"]) == 2

    # Global-norm clipping.
    pa, pb = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(6))
    ga, gb = 2.0 * randn(3, 4), randn(6)
    pa.grad, pb.grad = ga.clone(), gb.clone()
    total = torch.nn.utils.clip_grad_norm_([pa, pb], max_norm=1.0)
    assert total.item() > 1.0
    out.update({"clip_ga": ga, "clip_gb": gb, "clip_max_norm": torch.tensor(1.0, dtype=torch.float64),
                "clip_total": total.double().reshape(()), "clip_ga_out": pa.grad.clone(),
                "clip_gb_out": pb.grad.clone()})
    print(f"adamw: |w2 - w0|max {(out['w2'] - w0).abs().max().item():.2e}, clip total {total.item():.3f}")
    return out


def ema_fixture():
    step, total, m0 = 3, 10, 0.996
    mom = 1 - (1 - m0) * (math.cos(math.pi * step / total) + 1) / 2
    target, online = randn(3, 4), randn(3, 4)
    t = target.clone()
    t.mul_(mom).add_(online, alpha=1 - mom)  # solo-learn / BYOL form
    return {"target": target, "online": online, "out": t,
            "step_total_m0": torch.tensor([step, total, m0], dtype=torch.float64),
            "momentum": torch.tensor(mom, dtype=torch.float64)}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    fixtures = {
        "dense": dense_fixture(),
        "sampler": sampler_fixture(),
        "pooled": pooled_fixture(),
        "adamw": adamw_fixture(),
        "ema": ema_fixture(),
    }
    size = 0
    for name, tensors in fixtures.items():
        path = OUT / f"{name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"generator": "tools/torch_reference_losses.py", "torch": torch.__version__})
        size += path.stat().st_size
    print(f"wrote {len(fixtures)} fixtures to {OUT} ({size / 1024:.1f} KiB)")
    assert size < 300 * 1024


if __name__ == "__main__":
    main()
