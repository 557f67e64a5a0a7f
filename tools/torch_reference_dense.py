#!/usr/bin/env python3
"""An independent PyTorch reference for poodle's dense loss (issue 10, item 1).

Unlike tools/torch_reference_losses.py (which restates poodle's own formulas), this script
builds the loss the way the authors' forward pass does (agentic-learning-ai-lab/poodle,
src/models/poodle.py `Poodle.forward`, src/utils/flow.py `warp`/`flow_to_warp`/
`mask_invalid`), with kornia's own augmentation modules for the affine and the flip, and the
paper's Eq. (1) order as a second form. It writes one small safetensors fixture that
poodle-train/tests/dense_reference.rs checks candle against (CI has no PyTorch):

    .venv-ref/bin/python tools/torch_reference_dense.py [OUT_DIR]

OUT_DIR defaults to poodle-train/tests/fixtures/dense. Needs torch, kornia, safetensors.

The case: N=2 samples, C=4 channels, feature maps 3x5 (stride 8) upsampled to a 24x40 crop,
random features, a smooth flow with pixels flowing out of the frame, an occluded block, and
per branch a rotation + scale (kornia `RandomAffine(degrees=10, scale=(0.9, 1.1), p=1.0)`,
as configs/exp/poodle.yaml) and a horizontal flip (`RandomHorizontalFlip`), with FIXED
parameters passed through `params=` so that the Rust test can rebuild them with
`Affine::about_centre`. The network is left out: `pred` stands for the online predictor's
output and `proj` for the target projector's output, each on its own (affine, flipped) view.

(a) authors' order, as their forward does it:
    online:  hflip-undo(pred) at feature resolution -> F.interpolate(bilinear,
             align_corners=False) to the crop -> RandomAffine.inverse -> F.normalize;
    target:  hflip-undo(proj) -> F.interpolate -> warp by the flow (grid_sample at
             grid = 2 (y + flow(y)) / (size - 1) - 1) -> RandomAffine.inverse -> F.normalize;
    mask:    [y + flow(y) in crop] * target affine mask * (1 - occluded) * online affine mask;
    loss:    per sample sum(mask |z_o - z_t|^2) / (sum(mask) + 1e-7), batch mean.
(b) the paper's order, Eq. (1) `M o A_2^-1`: z_t(y) = up(f_t)(A_t^-1 (y + flow(y))), one
    bilinear lookup of the upsampled target map (flip undone as in (a)) at the affine image of
    the flowed point (the kornia forward matrix applied to y + flow(y)); mask
    [y + flow(y) in crop] * [A_t^-1 (y + flow(y)) in view] * (1 - occluded) * online mask.

Conventions, read from kornia 0.9.0's source and docs (tools/requirements-reference.txt):
- `RandomAffine` draws `center = ((W-1)/2, (H-1)/2)` and builds its input->output matrix with
  `get_affine_matrix2d`, which rotates by `-angle` in `get_rotation_matrix2d`: the forward
  map is `c + s R(angle) (x - c)` with `R = [[cos, -sin], [sin, cos]]` in y-down pixels (a
  positive angle turns the picture clockwise). `warp_affine` samples `dst(x) = src(M^-1 x)`,
  so the sampling map of a view is `M^-1`: `A_k(x) = c + R(-angle) (x - c) / s`.
  `RandomHorizontalFlip` is the exact index reversal `x -> W-1-x` (`hflip`), applied after
  the affine, so the view is `view(x) = image(A_k(F x))`; poodle's
  `Affine::about_centre(W, H, angle, s, flip)` should be that map.
- kornia 0.9.0 normalises pixel coordinates with the same `align_corners` flag that it hands
  to `grid_sample`, so `RandomAffine`'s default `align_corners=False` and `True` give the same
  pixel map (checked below). The authors pinned kornia 0.7.2, whose `warp_affine` normalised
  with `(size - 1)` whatever the flag and then sampled with `align_corners=False`: in pixel
  terms its sampling map was `phi^-1 o A_k o phi`, `phi(x) = c + D (x - c)`,
  `D = diag((W-1)/W, (H-1)/H)`. The variant `kornia072` emulates that path.

Flow warp: the authors' `warp(..., grid_sample=True)` normalises by `(size - 1)` but calls
`grid_sample(align_corners=False)`, which samples pixel `p W/(W-1) - 1/2` instead of `p` (a
sub-pixel scaling about the centre). The references (a) and (b) use `align_corners=True`
(exact pixel coordinates, what poodle implements); the variant `literal_warp` keeps the
authors' call as written.

Affine masks: the authors' `apply_affine_aug` makes the mask by a round trip, warping a ones
map forward and back and keeping `|m - 1| < 1e-3`; bilinear taps at the view's and the crop's
edges erode it by about a pixel. (a) and (b) use the one-way form (`RandomAffine.inverse` of a
ones map, `|m - 1| < 1e-3`), which is `[A^-1 y in view]` (checked against that inequality
below); the variant `literal_mask` keeps the round trip.

`zero_outside` (not one of the authors' quirks but poodle's sampler rule): the flow-warped
map is 0 wherever y + flow(y) leaves the crop, where `grid_sample(padding_mode='zeros')`
still blends the in-crop taps of a point less than a pixel outside. It matters in the
authors' order only (the affine undo mixes those values into pixels whose mask is 1).

All reference arithmetic is float64 (inputs are stored float32 and cast up); gradients are
w.r.t. `pred` (the target is under stop-gradient, as in the authors' `torch.no_grad()`).
"""

import math
import pathlib
import sys

import kornia
import kornia.augmentation as KA
import torch
import torch.nn.functional as F
from kornia.geometry.conversions import normalize_homography
from kornia.geometry.transform import hflip
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "poodle-train/tests/fixtures/dense"
GEN = torch.Generator().manual_seed(20250110)
D64 = torch.float64

N, C, h, w = 2, 4, 3, 5
H, W = 24, 40
# (angle degrees, scale, flip) per sample; each branch has one flipped and one plain sample.
PARAMS_ONLINE = [(7.0, 1.08, True), (-6.0, 0.95, False)]
PARAMS_TARGET = [(-9.0, 0.93, False), (8.5, 1.06, True)]


# --- kornia modules with fixed parameters --------------------------------------------------

def affine_module(align_corners=False):
    # As the authors: KA.RandomAffine(**{degrees: [-10, 10], scale: [0.9, 1.1]}, p=1.0).
    return KA.RandomAffine(degrees=10, scale=(0.9, 1.1), p=1.0, align_corners=align_corners)


def affine_params(mod, params):
    p = mod.forward_parameters(torch.Size((N, C, H, W)))
    p["angle"] = torch.tensor([a for a, _, _ in params], dtype=D64)
    p["scale"] = torch.tensor([[s, s] for _, s, _ in params], dtype=D64)
    for k in ("translations", "center", "shear_x", "shear_y"):
        p[k] = p[k].to(D64)
    assert torch.all(p["translations"] == 0) and torch.all(p["shear_x"] == 0)
    assert torch.allclose(p["center"], torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=D64))
    return p


def flip_flags(params):
    return torch.tensor([f for _, _, f in params])


def undo_flip(x, flags):
    """`RandomHorizontalFlip.inverse` at feature resolution: `hflip` on the flipped samples.

    kornia 0.9 refuses a mixed-gate inverse on a tensor of another size than the forward
    input (the authors' kornia 0.7.2 did not check), so the gate is applied here by hand with
    kornia's own `hflip`."""
    return torch.where(flags[:, None, None, None], hflip(x), x)


def forward_matrix(mod, params):
    """kornia's input->output 3x3 matrix of the affine (the view is `image(M^-1 x)`)."""
    x = torch.zeros(N, 1, H, W, dtype=D64)
    return mod.get_transformation_matrix(x, params=params).to(D64)


def flip_matrix(mod, flags):
    fp = {"batch_prob": flags.to(D64), "forward_input_shape": torch.tensor([N, 1, H, W])}
    x = torch.zeros(N, 1, H, W, dtype=D64)
    m = mod.compute_transformation(x, fp, mod.flags)
    eye = torch.eye(3, dtype=D64).expand(N, 3, 3)
    return torch.where(flags[:, None, None], m, eye)


def warp_affine_072(x, m3):
    """kornia 0.7.2's `warp_affine(align_corners=False)`: corner-aligned normalisation of the
    matrix, then `affine_grid`/`grid_sample` with `align_corners=False`."""
    nm = normalize_homography(m3, (H, W), (H, W), align_corners=True)
    grid = F.affine_grid(torch.linalg.inv(nm)[:, :2, :], [x.shape[0], x.shape[1], H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Affine:
    """One branch's affine in one of the two kornia behaviours."""

    def __init__(self, params, kornia072=False):
        self.mod = affine_module()
        self.p = affine_params(self.mod, params)
        self.m3 = forward_matrix(self.mod, self.p)
        self.kornia072 = kornia072

    def forward(self, x):
        if self.kornia072:
            return warp_affine_072(x, self.m3)
        return self.mod(x, params=self.p)

    def inverse(self, x):
        if self.kornia072:
            return warp_affine_072(x, torch.linalg.inv(self.m3))
        return self.mod.inverse(x, params=self.p)

    def mask(self, round_trip):
        ones = torch.ones(N, 1, H, W, dtype=D64)
        m = self.inverse(self.forward(ones)) if round_trip else self.inverse(ones)
        return ((m - 1.0).abs() < 1e-3).to(D64)


# --- flow helpers, as src/utils/flow.py -------------------------------------------------------

def pixel_grid():
    ys, xs = torch.meshgrid(torch.arange(H, dtype=D64), torch.arange(W, dtype=D64), indexing="ij")
    return torch.stack((xs, ys))[None].expand(N, 2, H, W)


def to_grid(p):
    """pixel (N, 2, H, W) -> grid_sample grid (N, H, W, 2), normalised by (size - 1)."""
    gx = p[:, 0] / (W - 1) * 2 - 1
    gy = p[:, 1] / (H - 1) * 2 - 1
    return torch.stack((gx, gy), dim=-1)


def inside(p):
    """`mask_invalid(..., for_grid_sample=True)` on the normalised coordinates."""
    g = to_grid(p)
    return ((g >= -1) & (g <= 1)).all(dim=-1, keepdim=False)[:, None].to(D64)


def sample(x, p, align_corners=True):
    return F.grid_sample(x, to_grid(p), mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def up(x):
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)


# --- the loss --------------------------------------------------------------------------------

def masked_loss(zo, zt, mask):
    zo, zt = F.normalize(zo, p=2, dim=1), F.normalize(zt, p=2, dim=1)
    d = (zo - zt).pow(2).sum(dim=1, keepdim=True) * mask
    per = d.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) + 1e-7)
    return per.mean(), per


def online_branch(pred, aff_o, flags_o):
    return aff_o.inverse(up(undo_flip(pred, flags_o)))


def authors(pred, proj, flow, visible, variant=()):
    """(a) with the exact conventions, or with the literal ones named in `variant`.

    `zero_outside` is not the authors' but poodle's sampler rule: the flow-warped map is 0
    wherever y + flow(y) leaves the crop, where `grid_sample` still blends the in-crop taps of
    a point less than a pixel outside. In the paper's order such points are masked out and
    the rule cannot matter; in the authors' order the affine undo mixes them into pixels
    whose own mask is 1, so it changes the loss."""
    k072 = "kornia072" in variant
    aff_o = Affine(PARAMS_ONLINE, k072)
    aff_t = Affine(PARAMS_TARGET, k072)
    round_trip = "literal_mask" in variant
    exact_warp = "literal_warp" not in variant
    zo = online_branch(pred, aff_o, flip_flags(PARAMS_ONLINE))
    moved = pixel_grid() + flow
    warped = sample(up(undo_flip(proj, flip_flags(PARAMS_TARGET))), moved, align_corners=exact_warp)
    if "zero_outside" in variant:
        warped = warped * inside(moved)
    zt = aff_t.inverse(warped)
    mask = inside(moved) * aff_t.mask(round_trip) * visible * aff_o.mask(round_trip)
    loss, per = masked_loss(zo, zt, mask)
    return loss, per, zo, zt, mask


def paper(pred, proj, flow, visible, variant=()):
    """(b) Eq. (1): z_t(y) = up(f_t)(A_t^-1 (y + flow(y)))."""
    aff_o = Affine(PARAMS_ONLINE)
    aff_t = Affine(PARAMS_TARGET)
    zo = online_branch(pred, aff_o, flip_flags(PARAMS_ONLINE))
    moved = pixel_grid() + flow
    # A_t^-1 of the rotation/scale part is kornia's forward matrix (crop -> view pixels); the
    # flip is undone on the feature map, as in (a).
    q = kornia.geometry.linalg.transform_points(aff_t.m3, moved.permute(0, 2, 3, 1).reshape(N, -1, 2))
    q = q.reshape(N, H, W, 2).permute(0, 3, 1, 2)
    zt = sample(up(undo_flip(proj, flip_flags(PARAMS_TARGET))), q)
    mask = inside(moved) * inside(q) * visible * aff_o.mask(False)
    loss, per = masked_loss(zo, zt, mask)
    return loss, per, zo, zt, mask


# --- inputs ---------------------------------------------------------------------------------

def make_inputs():
    pred = torch.randn(N, C, h, w, generator=GEN)
    proj = torch.randn(N, C, h, w, generator=GEN)
    g = pixel_grid()
    xs, ys = g[:, 0], g[:, 1]
    b = torch.arange(N, dtype=D64)[:, None, None]
    # Smooth, a few pixels, with a drift that pushes the right columns (sample 0) or the left
    # ones and the bottom rows (sample 1) out of the frame.
    fx = 3.9 * torch.sin(2 * math.pi * ys / H + 0.7 * b) + 2.85 * (1 - 2 * b) + 0.9 * torch.cos(xs / 7.0)
    fy = 2.7 * torch.cos(2 * math.pi * xs / W + 0.3) + 1.35 * b * ys / (H - 1) + 0.5
    flow = torch.stack((fx, fy), dim=1).to(torch.float32)
    occ = torch.zeros(N, 1, H, W)
    occ[0, 0, 6:12, 14:23] = 1.0
    occ[1, 0, 13:19, 4:11] = 1.0
    return pred, proj, flow, occ


def main():
    pred32, proj32, flow32, occ32 = make_inputs()
    proj = proj32.to(D64)
    flow = flow32.to(D64)
    visible = 1.0 - occ32.to(D64)

    # kornia 0.9: align_corners False/True give the same pixel map for RandomAffine.
    probe = torch.randn(N, C, H, W, generator=GEN, dtype=D64)
    m_f, m_t = affine_module(False), affine_module(True)
    pf, pt = affine_params(m_f, PARAMS_ONLINE), affine_params(m_t, PARAMS_ONLINE)
    assert torch.allclose(m_f(probe, params=pf), m_t(probe, params=pt), atol=1e-12)

    # Sampling maps (view pixel -> crop pixel) as kornia builds them: (Flip M)^-1.
    sampling = {}
    for name, prm in (("online", PARAMS_ONLINE), ("target", PARAMS_TARGET)):
        a = Affine(prm)
        fm = flip_matrix(KA.RandomHorizontalFlip(), flip_flags(prm))
        sampling[name] = torch.linalg.inv(fm @ a.m3)[:, :2, :].reshape(N, 6)
        # The one-way mask is the inequality [A^-1 y in view] (nothing within 1e-3 of an edge).
        q = kornia.geometry.linalg.transform_points(a.m3, pixel_grid().permute(0, 2, 3, 1).reshape(N, -1, 2))
        qx, qy = q[..., 0], q[..., 1]
        strict = ((qx >= 0) & (qx <= W - 1) & (qy >= 0) & (qy <= H - 1)).to(D64).reshape(N, 1, H, W)
        assert torch.equal(strict, a.mask(False)), name
        edge = torch.minimum(torch.minimum(qx.abs(), (qx - (W - 1)).abs()),
                             torch.minimum(qy.abs(), (qy - (H - 1)).abs()))
        assert edge.min() > 1e-3, (name, edge.min())

    out = {
        "pred": pred32, "proj": proj32, "flow": flow32, "occluded": occ32,
        "crop": torch.tensor([H, W], dtype=torch.int64),
        "params_online": torch.tensor(PARAMS_ONLINE, dtype=D64),
        "params_target": torch.tensor(PARAMS_TARGET, dtype=D64),
        "sampling_online": sampling["online"], "sampling_target": sampling["target"],
    }
    forms = (
        ("authors", authors, ()),
        ("authors_zero_outside", authors, ("zero_outside",)),
        ("paper", paper, ()),
    )
    for key, fn, *v in forms:
        pred = pred32.to(D64).requires_grad_(True)
        loss, per, zo, zt, mask = fn(pred, proj, flow, visible, *v)
        (grad,) = torch.autograd.grad(loss, pred)
        out[f"loss_{key}"] = loss.detach().reshape(1)
        out[f"per_sample_{key}"] = per.detach()
        out[f"grad_{key}"] = grad
        out[f"zt_{key}"] = zt.detach().to(torch.float32)
        out[f"mask_{key}"] = mask.to(torch.float32)
        out["zo"] = zo.detach().to(torch.float32)
        print(f"{key:21s} loss {loss.item():.6f} per sample {per.tolist()} mask {mask.mean().item():.4f}")

    with torch.no_grad():
        pred = pred32.to(D64)
        variants = {
            "literal_warp": ("literal_warp",),
            "literal_mask": ("literal_mask",),
            "kornia072": ("kornia072",),
            "kornia072_zero_outside": ("kornia072", "zero_outside"),
            "literal_all": ("literal_warp", "literal_mask", "kornia072"),
        }
        for name, v in variants.items():
            loss, per, _, _, mask = authors(pred, proj, flow, visible, v)
            out[f"loss_{name}"] = loss.reshape(1)
            out[f"per_sample_{name}"] = per
            rel = abs(loss.item() - out["loss_authors"].item()) / out["loss_authors"].item()
            print(f"{name:22s} loss {loss.item():.6f} (rel. change vs (a) {rel:.2e}) mask {mask.mean().item():.4f}")
        # The online affine valid fraction, exact vs round trip (the erosion).
        a = Affine(PARAMS_ONLINE)
        print("online affine mask: one-way", a.mask(False).mean().item(), "round trip", a.mask(True).mean().item())

    OUT.mkdir(parents=True, exist_ok=True)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(OUT / "dense_reference.safetensors"))
    print("wrote", OUT / "dense_reference.safetensors", (OUT / "dense_reference.safetensors").stat().st_size, "bytes")


if __name__ == "__main__":
    main()
