#!/usr/bin/env python3
"""Convert a poodle-train backbone export to a PyTorch checkpoint for downstream tools.

The input is what `poodle-train export --format torchvision` writes (see
poodle-train/src/export.rs): a safetensors file with torchvision ResNet names
(`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., every BatchNorm with
`num_batches_tracked`), no `fc`.

    python tools/to_pth.py backbone.safetensors backbone.pth                 # torchvision
    python tools/to_pth.py backbone.safetensors backbone_d2.pkl --detectron2  # detectron2

Formats
-------
default
    `torch.save` of the torchvision `state_dict` (an OrderedDict of tensors). Loads with
    `model.load_state_dict(torch.load(p), strict=True)` after `model.fc = nn.Identity()`,
    and is what mmsegmentation / mmdetection read as a backbone checkpoint: use their plain
    `ResNet` backbone (`type='ResNet', depth=50, style='pytorch'`; not `ResNetV1c`, whose deep
    stem has other tensors) with `init_cfg=dict(type='Pretrained', checkpoint='backbone.pth')`.
    mmcv's loader takes a bare state_dict; keys it does not use (num_batches_tracked is used)
    are only reported. If torchvision is installed the file is verified by loading it into
    the matching torchvision ResNet with strict=True (skip with --no-verify).

--detectron2
    detectron2 names, as its own tools/convert-torchvision-to-d2.py writes them:
    `stem.conv1.*`, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`, `downsample.0` ->
    `shortcut`, `downsample.1` -> `shortcut.norm`; `num_batches_tracked` is dropped
    (detectron2's FrozenBatchNorm2d has none). The file is a pickle of numpy arrays,
    `{"model": ..., "__author__": "poodle", "matching_heuristics": True}`, and must end in
    `.pkl`: for `.pkl` files DetectionCheckpointer returns this dict as is and, because of
    `matching_heuristics`, matches each name as a suffix of the model's
    (`backbone.bottom_up.res2.0.conv1.weight`); no Caffe2 renaming is applied (the author is
    not "Caffe2"). Config for a torchvision-style backbone:
        MODEL.WEIGHTS: backbone_d2.pkl
        MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]
        MODEL.PIXEL_STD: [58.395, 57.120, 57.375]
        MODEL.RESNETS.DEPTH: 50
        MODEL.RESNETS.STRIDE_IN_1X1: False   # torchvision (v1.5): stride on the 3x3 conv
        INPUT.FORMAT: RGB
    (poodle-train normalises RGB in [0, 1] with ImageNet mean/std; the values above are the
    same in 0..255.) A FlowE-style dilated backbone (layer3 and layer4 dilated) has no exact
    detectron2 equivalent: detectron2 only dilates res5 (MODEL.RESNETS.RES5_DILATION: 2).

Needs torch and safetensors (numpy for --detectron2); torchvision only for the check.
Outputs are written to a temporary file and renamed into place.
"""

import argparse
import collections
import os
import pickle
import re
import sys
import tempfile


def load_export(path):
    from safetensors.torch import load_file

    sd = load_file(path)
    if "conv1.weight" not in sd or not any(k.startswith("layer1.") for k in sd):
        sys.exit(
            f"{path}: no torchvision ResNet names (conv1.weight, layer1.*); is it an export of "
            "`poodle-train export --format torchvision`?"
        )
    # A stable, torchvision-like order: stem, then layers, then anything else.
    def order(k):
        m = re.match(r"layer(\d+)\.(\d+)\.(.*)", k)
        return (1, int(m.group(1)), int(m.group(2)), m.group(3)) if m else (0, 0, 0, k)

    return collections.OrderedDict((k, sd[k]) for k in sorted(sd, key=order))


def torchvision_arch(sd):
    """torchvision's constructor name for this key set (ResNet-18/34/50/101/152), or None."""
    blocks = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(len(idx))
    bottleneck = "layer1.0.conv3.weight" in sd
    table = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
        (True, (3, 8, 36, 3)): "resnet152",
    }
    if sd["conv1.weight"].shape[0] != 64:
        return None
    return table.get((bottleneck, tuple(blocks)))


def to_detectron2(sd):
    out = collections.OrderedDict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked") or k.startswith("fc."):
            continue
        n = k
        if "layer" not in n:
            n = "stem." + n
        for t in (1, 2, 3, 4):
            n = n.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            n = n.replace(f"bn{t}", f"conv{t}.norm")
        n = n.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[n] = v.detach().cpu().numpy()  # e.g. bn1.weight -> stem.conv1.norm.weight
    return out


def write_atomic(path, write):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify_torchvision(sd, dilated):
    try:
        import torch
        import torchvision
    except ImportError:
        print("torchvision not installed: skipping the strict load check", file=sys.stderr)
        return
    arch = torchvision_arch(sd)
    if arch is None:
        print("not a standard torchvision ResNet: skipping the strict load check", file=sys.stderr)
        return
    kw = {"replace_stride_with_dilation": [False, True, True]} if dilated else {}
    m = getattr(torchvision.models, arch)(**kw)
    m.fc = torch.nn.Identity()
    m.load_state_dict(sd, strict=True)
    print(f"verified: torchvision.models.{arch}() loads it with strict=True", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="safetensors written by `poodle-train export`")
    ap.add_argument("out", help="output .pth (default) or .pkl (--detectron2)")
    ap.add_argument("--detectron2", action="store_true", help="detectron2 names, .pkl")
    ap.add_argument("--no-verify", action="store_true", help="skip the torchvision check")
    ap.add_argument(
        "--dilated",
        action="store_true",
        help="verify against replace_stride_with_dilation=[False, True, True] (FlowE)",
    )
    args = ap.parse_args()

    sd = load_export(args.export)
    if args.detectron2:
        if not args.out.endswith(".pkl"):
            sys.exit("--detectron2: name the output *.pkl (DetectionCheckpointer reads .pkl "
                     "files as detectron2-format pickles)")
        model = to_detectron2(sd)
        obj = {"model": model, "__author__": "poodle", "matching_heuristics": True}
        write_atomic(args.out, lambda f: pickle.dump(obj, f))
        print(f"{args.out}: {len(model)} tensors, detectron2 names", file=sys.stderr)
        return
    import torch

    if not args.no_verify:
        verify_torchvision(sd, args.dilated)
    write_atomic(args.out, lambda f: torch.save(sd, f))
    print(f"{args.out}: {len(sd)} tensors, torchvision names", file=sys.stderr)


if __name__ == "__main__":
    main()
