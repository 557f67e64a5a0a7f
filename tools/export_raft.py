#!/usr/bin/env python3
"""Export torchvision RAFT optical flow to a self-contained ONNX model plus a model card.

What it does
------------
1. Builds torchvision's ``raft_large`` or ``raft_small`` (pretrained weights with
   ``--pretrained``, which downloads them and needs internet, or ``--weights FILE``, the same
   state dict saved beforehand, for offline machines; otherwise random weights from
   ``--seed``).
2. Wraps it in a small module that runs ``--iters`` refinement iterations and returns
   only the last (upsampled) flow. The default, 24, is the authors' setting (their
   configs run torchvision RAFT-large with 24 updates). Whether 12 is close enough on the
   shared pairs is measured by ``bench/raft_iters.py`` where the pretrained weights can be
   had; until it has been measured, 24 stays the default.
3. Exports it to ONNX with inputs ``image1``/``image2`` (float32, N x 3 x H x W, RGB in
   [-1, 1], H and W multiples of ``--size-multiple``, 8 or a multiple of 8, which the card
   records so that poodle-prep resizes frames to it) and output ``flow`` (float32,
   N x 2 x H x W, pixels
   of the input, channel 0 = u = dx, channel 1 = v = dy). Batch, height and width are
   dynamic axes. The file is re-saved without external data so it is one file.
4. Checks the ONNX model against PyTorch before anything is published: both are run
   (onnxruntime on CPU) on a real frame pair resized to the trace size, and again on
   the pair padded to the size multiple at its native size with batch 2, which proves
   the dynamic axes. If any relative L2 error exceeds ``--tolerance`` the script deletes
   the .onnx, writes no card and exits non-zero.
5. Only after the check passes, writes the model card ``<out stem>.json`` beside the
   model (name, layout, value range, opset, sha256, measured parity, ...).

Example (the committed test fixture)::

    python tools/export_raft.py --arch small --iters 4 --seed 0 \\
        --height 128 --width 224 --out models/raft_small_random.onnx

Note on opsets: raft_large exported with the legacy (TorchScript) exporter at opset 17
was measured to give wrong output; opset 16 (legacy) was right, so it is the default
for large. raft_small defaults to opset 17. The parity check catches such problems
either way, so never skip it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAIR = (
    REPO_ROOT / ".." / "shared" / "data" / "flow" / "rubberwhale1.png",
    REPO_ROOT / ".." / "shared" / "data" / "flow" / "rubberwhale2.png",
)
DEFAULT_OPSET = {"large": 16, "small": 17}
# RAFT's correlation pyramid needs feature maps of at least 16 x 16, i.e. images of
# at least 128 x 128 (torchvision raises otherwise).
MIN_SIZE = 128


class LastFlow(nn.Module):
    """torchvision RAFT returning only the final refinement's flow (N x 2 x H x W)."""

    def __init__(self, raft: nn.Module, iters: int):
        super().__init__()
        self.raft = raft
        self.iters = iters

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        return self.raft(image1, image2, num_flow_updates=self.iters)[-1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Export torchvision RAFT to ONNX, verify it against PyTorch, write its model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=("large", "small"), default="small",
                   help="torchvision raft_large or raft_small")
    p.add_argument("--pretrained", action="store_true",
                   help="load torchvision's pretrained weights (C_T_SKHT_V2 for large, C_T_V2 "
                        "for small; downloads, needs internet). Default: random weights")
    p.add_argument("--weights", type=Path, default=None,
                   help="a local copy of torchvision's pretrained state dict (.pth, e.g. "
                        "raft_large_C_T_SKHT_V2-ff5fadd5.pth), for machines without internet")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed for the random weights (ignored with --pretrained/--weights)")
    p.add_argument("--iters", type=int, default=24,
                   help="refinement iterations baked into the graph (the loop is unrolled); "
                        "24 is the authors' setting")
    p.add_argument("--size-multiple", type=int, default=8,
                   help="frames are resized to multiples of this (8 or a multiple of 8); "
                        "written into the card")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset; default 16 for large, 17 for small")
    p.add_argument("--height", type=int, default=128,
                   help="trace height (multiple of 8, >= 128); the exported height axis is dynamic")
    p.add_argument("--width", type=int, default=224,
                   help="trace width (multiple of 8, >= 128); the exported width axis is dynamic")
    p.add_argument("--out", type=Path, required=True,
                   help="output .onnx path; the card goes to the same path with .json")
    p.add_argument("--check-pair", nargs=2, type=Path, default=list(DEFAULT_PAIR),
                   metavar=("FRAME1", "FRAME2"),
                   help="two RGB image files (PNG) used for the PyTorch-vs-ONNX parity check")
    p.add_argument("--note", default="",
                   help="extra sentence appended to the card's notes (e.g. why these settings)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="maximum relative L2 error ||onnx - torch|| / ||torch|| allowed")
    args = p.parse_args(argv)

    if args.opset is None:
        args.opset = DEFAULT_OPSET[args.arch]
    if args.size_multiple < 8 or args.size_multiple % 8:
        p.error(f"--size-multiple must be a multiple of 8 (RAFT works at 1/8 scale), "
                f"got {args.size_multiple}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v % args.size_multiple or v < MIN_SIZE:
            p.error(f"--{name} must be a multiple of --size-multiple ({args.size_multiple}) "
                    f"and >= {MIN_SIZE}, got {v}")
    if args.pretrained and args.weights:
        p.error("--pretrained and --weights are exclusive")
    if args.weights and not args.weights.is_file():
        p.error(f"--weights: no file {args.weights}")
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.out.suffix != ".onnx":
        p.error("--out must end in .onnx")
    return args


def build_model(arch: str, pretrained: bool, seed: int, weights: Path | None = None) -> nn.Module:
    """torchvision RAFT: pretrained (download), a local state dict, or random from seed."""
    from torchvision.models.optical_flow import (
        Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small)

    torch.manual_seed(seed)
    if arch == "large":
        model = raft_large(weights=Raft_Large_Weights.C_T_SKHT_V2 if pretrained else None)
    else:
        model = raft_small(weights=Raft_Small_Weights.C_T_V2 if pretrained else None)
    if weights is not None:
        # strict: a file for the other architecture fails here, naming the keys.
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def load_rgb(path: Path) -> torch.Tensor:
    """Read an image as float32 1 x 3 x H x W RGB in [-1, 1]."""
    from torchvision.io import ImageReadMode, read_image

    img = read_image(str(path), mode=ImageReadMode.RGB)  # uint8 3 x H x W
    return (img.float() / 255.0 * 2.0 - 1.0).unsqueeze(0)


def resize_to(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Centre-crop to the aspect ratio h:w, then resize to h x w (bilinear, antialiased)."""
    _, _, ih, iw = img.shape
    if ih * w > iw * h:  # too tall
        ch, cw = iw * h // w, iw
    else:
        ch, cw = ih, ih * w // h
    top, left = (ih - ch) // 2, (iw - cw) // 2
    img = img[:, :, top:top + ch, left:left + cw]
    return F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True).clamp(-1.0, 1.0)


def pad_to_multiple(img: torch.Tensor, multiple: int = 8, minimum: int = MIN_SIZE) -> torch.Tensor:
    """Replicate-pad bottom/right so H and W are multiples of `multiple` and >= `minimum`."""
    _, _, h, w = img.shape
    nh = max(-(-h // multiple) * multiple, minimum)
    nw = max(-(-w // multiple) * multiple, minimum)
    return F.pad(img, (0, nw - w, 0, nh - h), mode="replicate")


def export_onnx(wrapper: nn.Module, h: int, w: int, opset: int, out: Path) -> None:
    dummy = (torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        wrapper, dummy, str(out),
        dynamo=False,  # legacy TorchScript exporter: dynamic_axes, unrolled iteration loop
        input_names=["image1", "image2"],
        output_names=["flow"],
        dynamic_axes={"image1": axes, "image2": axes, "flow": axes},
        opset_version=opset,
        do_constant_folding=True,
    )
    # Re-save as one self-contained file whatever the exporter did.
    import onnx

    model = onnx.load(str(out), load_external_data=True)
    # The exporter leaves the flow's channel axis symbolic (it comes out of a Reshape);
    # it is always 2 (u, v), so say so in the graph's declared output shape.
    (flow_out,) = model.graph.output
    flow_out.type.tensor_type.shape.dim[1].Clear()
    flow_out.type.tensor_type.shape.dim[1].dim_value = 2
    onnx.save(model, str(out), save_as_external_data=False)
    onnx.checker.check_model(str(out))


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = np.linalg.norm(got.astype(np.float64) - ref)
    den = np.linalg.norm(ref)
    return float(err / den) if den > 0 else float(err)


def parity_checks(wrapper: nn.Module, out: Path, args: argparse.Namespace) -> float:
    """Run ONNX (onnxruntime CPU) and PyTorch on the check pair; return the worst rel L2."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    f1, f2 = (load_rgb(p) for p in args.check_pair)
    if f1.shape != f2.shape:
        raise SystemExit(f"check pair frames differ in size: {tuple(f1.shape)} vs {tuple(f2.shape)}")

    a = pad_to_multiple(f1, args.size_multiple)
    b = pad_to_multiple(f2, args.size_multiple)
    if a.shape[-2:] == (args.height, args.width):
        # Native size equals trace size: take a second, smaller size instead.
        m = args.size_multiple
        a, b = (resize_to(x, args.height + m, args.width + 2 * m) for x in (f1, f2))
    cases = [
        # (label, image1, image2)
        ("trace size, batch 1",
         resize_to(f1, args.height, args.width), resize_to(f2, args.height, args.width)),
        # Different H, W and batch 2 (pair + reversed pair): exercises every dynamic axis.
        ("other size, batch 2", torch.cat([a, b]), torch.cat([b, a])),
    ]
    worst = 0.0
    for label, i1, i2 in cases:
        with torch.no_grad():
            ref = wrapper(i1, i2).numpy()
        got = sess.run(["flow"], {"image1": i1.numpy(), "image2": i2.numpy()})[0]
        if got.shape != ref.shape:
            print(f"  {label}: shape mismatch onnx {got.shape} vs torch {ref.shape}")
            return float("inf")
        err = rel_l2(got, ref)
        print(f"  {label} {tuple(i1.shape)}: rel L2 = {err:.3e}, max abs = "
              f"{np.abs(got - ref).max():.3e}, |flow| rms = {np.sqrt((ref ** 2).mean()):.3e}")
        if not np.isfinite(err):
            return float("inf")
        worst = max(worst, err)
    return worst


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    card_path = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if card_path.exists():
        card_path.unlink()  # never leave a stale card beside a new model

    model = build_model(args.arch, args.pretrained, args.seed, args.weights)
    wrapper = LastFlow(model, args.iters).eval()
    print(f"exporting raft_{args.arch} (pretrained={args.pretrained}, iters={args.iters}, "
          f"opset={args.opset}, trace {args.height}x{args.width}) -> {out}")
    export_onnx(wrapper, args.height, args.width, args.opset, out)

    print("parity check, onnxruntime CPU vs PyTorch:")
    try:
        worst = parity_checks(wrapper, out, args)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    if not worst <= args.tolerance:
        out.unlink(missing_ok=True)
        print(f"FAILED: rel L2 {worst:.3e} > tolerance {args.tolerance:.1e}; "
              f"deleted {out}, no card written", file=sys.stderr)
        return 1

    trained = args.pretrained or args.weights is not None
    if args.pretrained:
        weights = "pretrained torchvision weights"
    elif args.weights is not None:
        weights = f"pretrained torchvision weights from {args.weights.name}"
    else:
        weights = f"random weights (seed {args.seed})"
    card = {
        "name": out.stem,
        "architecture": f"torchvision raft_{args.arch}",
        "onnx": out.name,
        "inputs": ["image1", "image2"],
        "input_layout": "NCHW",
        "channel_order": "RGB",
        "value_range": [-1.0, 1.0],
        "size_multiple": args.size_multiple,
        "min_size": 128,
        "output": "flow",
        "output_layout": "N2HW",
        "units": "pixels",
        "iterations": args.iters,
        "pretrained": trained,
        "opset": args.opset,
        "sha256": sha256_of(out),
        "parity_rel_l2": worst,
        "notes": (f"tools/export_raft.py: torchvision raft_{args.arch}, {weights}, {args.iters} "
                  f"refinement iterations, legacy exporter opset {args.opset}, traced at "
                  f"{args.height}x{args.width} with dynamic batch/height/width; checked against "
                  f"PyTorch with onnxruntime CPU (torch {torch.__version__.split('+')[0]})"
                  + (f". {args.note}" if args.note else "")),
    }
    with open(card_path, "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    print(f"ok: worst rel L2 {worst:.3e}; wrote {out} ({os.path.getsize(out)} bytes) and {card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
