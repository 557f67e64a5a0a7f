#!/usr/bin/env python3
"""PyTorch reference fixtures for poodle-train's model code (poodle-train/src/model/).

Writes small safetensors files (and two JSON key lists) to
poodle-train/tests/fixtures/model/, read by poodle-train/tests/model_parity.rs. CI has no
PyTorch: rerun this only when the reference changes, and commit the output.

    .venv-ref/bin/python tools/torch_reference_model.py [--out DIR]

Every case runs in float64 from float32-representable weights and inputs, then stores
float32, so the fixture is the exact answer and the Rust f32 result is compared against it.
Modules run in training mode (batch statistics, running statistics updated). Keys:

  param.<name>     weights and BN running statistics before the step (PyTorch names,
                   no num_batches_tracked)
  in.<name>        inputs
  r.<name>         fixed random weights R; the loss is sum over outputs of sum(out * R)
  out.<name>       training-mode outputs
  grad.in.<name>   gradient of the loss w.r.t. an input
  grad.<name>      gradient of the loss w.r.t. parameter <name>
  after.<name>     BN running statistics after the training forward(s)
  eval.<name>      evaluation-mode outputs computed after the update (where present)
  paper.<name>     decoder_authors only: the paper-order output (training mode) of the same
                   starting weights

decoder.safetensors is poodle's decoder in the paper's order on uneven sizes (poodle names);
decoder_authors.safetensors is the authors' decoder module (their names, their order, their
torchvision Bottleneck); encoder_tiny's decoder runs in the authors' order (poodle default).

The module configurations are fixed here and mirrored in model_parity.rs.
"""

import argparse
import copy
import json
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "poodle-train" / "tests" / "fixtures" / "model"


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32).double()


def randomize_bn(module):
    """Non-trivial BN affine parameters and running statistics (PyTorch starts at 1/0/0/1)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * randn(c))
                m.bias.copy_(0.1 * randn(c))
                m.running_mean.copy_(0.1 * randn(c))
                m.running_var.copy_(1 + 0.5 * torch.rand(c, dtype=torch.float32).double())


def prepare(module):
    """float32 init -> float64, BN randomised, training mode."""
    module.double()
    randomize_bn(module)
    module.train()
    return module


def state(module, prefix):
    return {
        f"{prefix}{k}": v.detach().float().contiguous()
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def buffers(module, prefix):
    return {
        f"{prefix}{k}": v.detach().float().contiguous()
        for k, v in module.state_dict().items()
        if k.endswith("running_mean") or k.endswith("running_var")
    }


def run_case(module, inputs, forward, eval_forward=None, input_grads=True):
    """inputs: name -> float64 tensor. forward(module, inputs) -> name -> output."""
    out = state(module, "param.")
    xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    for k, v in xs.items():
        out[f"in.{k}"] = v.detach().float()
    outputs = forward(module, xs)
    loss = 0.0
    for k, y in outputs.items():
        r = randn(*y.shape)
        out[f"r.{k}"] = r.float()
        out[f"out.{k}"] = y.detach().float().contiguous()
        loss = loss + (y * r).sum()
    loss.backward()
    for k, v in xs.items():
        if input_grads:
            out[f"grad.in.{k}"] = v.grad.float()
    for k, p in module.named_parameters():
        assert p.grad is not None, k
        out[f"grad.{k}"] = p.grad.float().contiguous()
    out.update(buffers(module, "after."))
    if eval_forward is not None:
        module.eval()
        with torch.no_grad():
            for k, y in eval_forward(module, {k: v.detach() for k, v in xs.items()}).items():
                out[f"eval.{k}"] = y.float().contiguous()
        module.train()
    return out


# ---------------------------------------------------------------- modules mirrored in Rust


class TinyResNet(nn.Module):
    """torchvision's ResNet with custom stage widths, built by torchvision's own _make_layer
    (same names, same dilation rule); returns C3, C4, C5."""

    def __init__(self, block, layers, stem, widths, dilated):
        super().__init__()
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, 1, 64
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        mk = ResNet._make_layer
        self.layer1 = mk(self, block, widths[0], layers[0])
        self.layer2 = mk(self, block, widths[1], layers[1], stride=2)
        self.layer3 = mk(self, block, widths[2], layers[2], stride=2, dilate=dilated)
        self.layer4 = mk(self, block, widths[3], layers[3], stride=2, dilate=dilated)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c3, c4, c5


class DecoderBottleneck(Bottleneck):
    """torchvision Bottleneck with inner width = channels / 8 (planes = in / 8, out = in)."""

    expansion = 8


class DecoderBlock(nn.Module):
    """poodle's decoder block (poodle names). order "paper": upsample, bottleneck, + lateral
    (Eq. 3); "authors": bottleneck, upsample, + lateral (their Poodle.forward). The upsampling
    goes to the lateral's size, which is their scale_factor=2 when the sizes are exact."""

    def __init__(self, ch, skip_ch, top_down=True, lateral=True, order="paper"):
        super().__init__()
        self.order = order
        self.bottleneck = DecoderBottleneck(ch, ch // 8) if top_down else None
        self.lateral = nn.Conv2d(skip_ch, ch, kernel_size=1, bias=True) if lateral else None

    def forward(self, z, skip):
        def g(t):
            return t if self.bottleneck is None else self.bottleneck(t)

        def up(t):
            return F.interpolate(t, size=skip.shape[-2:], mode="bilinear", align_corners=False)

        y = up(g(z)) if self.order == "authors" else g(up(z))
        if self.lateral is not None:
            y = y + self.lateral(skip)
        return y


class Decoder(nn.Module):
    def __init__(self, c3, c4, c5, top_down=True, lateral=True, order="paper"):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                DecoderBlock(c5, c4, top_down, lateral, order),
                DecoderBlock(c5, c3, top_down, lateral, order),
            ]
        )

    def forward(self, c3, c4, c5):
        return self.blocks[1](self.blocks[0](c5, c4), c3)


class Mlp(nn.Module):
    def __init__(self, dense, i, h, o):
        super().__init__()
        if dense:
            layer, bn = (lambda a, b: nn.Conv2d(a, b, kernel_size=1)), nn.BatchNorm2d
        else:
            layer, bn = nn.Linear, nn.BatchNorm1d
        self.net = nn.Sequential(layer(i, h), bn(h), nn.ReLU(), layer(h, o))

    def forward(self, x):
        return self.net(x)


class Online(nn.Module):
    """poodle-train's Online: backbone, decoder (authors' order, poodle's default),
    projectors, predictors (same names)."""

    def __init__(self, block, layers, stem, widths, hidden, out):
        super().__init__()
        self.backbone = TinyResNet(block, layers, stem, widths, dilated=False)
        e = block.expansion
        c3, c4, c5 = widths[1] * e, widths[2] * e, widths[3] * e
        self.decoder = Decoder(c3, c4, c5, order="authors")
        self.dense_projector = Mlp(True, c5, hidden, out)
        self.pooled_projector = Mlp(False, c5, hidden, out)
        self.dense_predictor = Mlp(True, out, hidden, out)
        self.pooled_predictor = Mlp(False, out, hidden, out)

    def dense(self, x):
        c3, c4, c5 = self.backbone(x)
        return self.dense_projector(self.decoder(c3, c4, c5))

    def pooled(self, x):
        c5 = self.backbone(x)[2]
        return self.pooled_projector(c5.mean(dim=(2, 3)))


# ---------------------------------------------------------------- cases


def case_bottleneck():
    torch.manual_seed(1)
    down = nn.Sequential(nn.Conv2d(16, 32, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(32))
    m = prepare(Bottleneck(16, 8, stride=2, downsample=down))
    x = randn(2, 16, 12, 10)
    return run_case(m, {"x": x}, lambda m, i: {"y": m(i["x"])}, lambda m, i: {"y": m(i["x"])})


def case_decoder():
    torch.manual_seed(2)
    m = prepare(Decoder(4, 8, 16))
    # C5 -> C4 exactly 2x; C4 -> C3 not (5x7 -> 11x13), as with odd input sizes.
    inputs = {"c3": randn(2, 4, 11, 13), "c4": randn(2, 8, 5, 7), "c5": randn(2, 16, 3, 4)}

    def fwd(m, i):
        return {"y": m(i["c3"], i["c4"], i["c5"])}

    # Wrapped in a parent so names carry the `decoder.` prefix used in the Encoder.
    parent = nn.Module()
    parent.decoder = m
    return run_case(parent, inputs, lambda p, i: fwd(p.decoder, i))


class AuthorsDecoder(nn.Module):
    """The decoder exactly as the authors build and run it (src/models/poodle.py): torchvision's
    own Bottleneck(C5, planes=C5 // 4, base_width=64 * 0.5) per block, nn.Conv2d 1x1 laterals
    with bias, attribute names decoder_blocks / decoder_laterals; forward: block, upsample
    scale_factor=2, + lateral."""

    def __init__(self, c3, c4, c5, hidden_factor=0.5):
        super().__init__()
        self.decoder_blocks = nn.ModuleList(
            [Bottleneck(c5, c5 // 4, base_width=int(64 * hidden_factor)) for _ in range(2)]
        )
        self.decoder_laterals = nn.ModuleList(
            [nn.Conv2d(c4, c5, kernel_size=1), nn.Conv2d(c3, c5, kernel_size=1)]
        )

    def forward(self, c3, c4, c5):
        z, feats = c5, [c4, c3]
        for block, lateral, f in zip(self.decoder_blocks, self.decoder_laterals, feats):
            z = block(z)
            z = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
            z = z + lateral(f)
        return z

    def forward_paper(self, c3, c4, c5):
        """The paper's Eq. (3) with the same modules: upsample, block, + lateral."""
        z, feats = c5, [c4, c3]
        for block, lateral, f in zip(self.decoder_blocks, self.decoder_laterals, feats):
            z = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
            z = block(z) + lateral(f)
        return z


def case_decoder_authors():
    """Authors' names and order; `paper.y` is the paper order's training output from the same
    starting weights and running statistics (a copy of the module)."""
    torch.manual_seed(7)
    # C5 = 32: planes 8, base_width 32 -> inner width 4 (C5 / 8, as 2048 -> 256).
    m = prepare(AuthorsDecoder(8, 16, 32))
    assert m.decoder_blocks[0].conv2.weight.shape == (4, 4, 3, 3)
    inputs = {"c3": randn(1, 8, 8, 16), "c4": randn(1, 16, 4, 8), "c5": randn(1, 32, 2, 4)}
    paper = copy.deepcopy(m)
    with torch.no_grad():
        y_paper = paper.forward_paper(inputs["c3"], inputs["c4"], inputs["c5"])
    out = run_case(m, inputs, lambda m, i: {"y": m(i["c3"], i["c4"], i["c5"])})
    out["paper.y"] = y_paper.float().contiguous()
    return out


def case_maxpool():
    torch.manual_seed(3)
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inputs = {"a": randn(2, 3, 9, 8), "b": randn(1, 2, 6, 11)}
    return run_case(nn.Module(), inputs, lambda _, i: {k: pool(v) for k, v in i.items()})


def case_upsample():
    torch.manual_seed(4)
    x = randn(2, 3, 5, 7)
    sizes = {"up": (12, 16), "down": (3, 4), "x2": (10, 14), "mixed": (4, 20)}

    def fwd(_, i):
        return {
            k: F.interpolate(i["x"], size=s, mode="bilinear", align_corners=False)
            for k, s in sizes.items()
        }

    return run_case(nn.Module(), {"x": x}, fwd)


RESNET_CASES = {
    # name: (block, layers, stem, widths, dilated, input shape)
    # (The plain bottleneck ResNet is the backbone of encoder_tiny.)
    "resnet_tiny_dilated": (Bottleneck, [1, 1, 2, 2], 4, [2, 4, 8, 16], True, (2, 3, 29, 34)),
    "resnet_tiny_basic": (BasicBlock, [2, 1, 1, 1], 4, [2, 4, 8, 16], False, (2, 3, 38, 29)),
}


def case_resnet(name):
    torch.manual_seed(5)
    block, layers, stem, widths, dilated, shape = RESNET_CASES[name]
    m = prepare(TinyResNet(block, layers, stem, widths, dilated))

    def fwd(m, i):
        c3, c4, c5 = m(i["x"])
        return {"c3": c3, "c4": c4, "c5": c5}

    return run_case(m, {"x": randn(*shape)}, fwd, fwd)


def case_encoder():
    torch.manual_seed(6)
    m = prepare(Online(Bottleneck, [1, 1, 1, 1], 4, [2, 4, 8, 16], hidden=16, out=8))
    # 40x48 -> C3 5x6, C4 3x3, C5 2x2: mixed parities and non-2x decoder steps.
    inputs = {"x": randn(2, 3, 40, 48), "xs": randn(3, 3, 33, 33)}

    def fwd(m, i):
        p_dense = m.dense(i["x"])
        q_dense = m.dense_predictor(p_dense)
        p_pooled = m.pooled(i["xs"])
        q_pooled = m.pooled_predictor(p_pooled)
        return {"p_dense": p_dense, "q_dense": q_dense, "p_pooled": p_pooled, "q_pooled": q_pooled}

    def fwd_eval(m, i):
        return {"p_dense": m.dense(i["x"]), "p_pooled": m.pooled(i["xs"])}

    return run_case(m, inputs, fwd, fwd_eval, input_grads=False)


def torchvision_keys(arch):
    m = getattr(torchvision.models, arch)(weights=None)
    return {k: list(v.shape) for k, v in m.state_dict().items() if not k.startswith("fc.")}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    cases = {
        "bottleneck": case_bottleneck,
        "decoder": case_decoder,
        "decoder_authors": case_decoder_authors,
        "maxpool": case_maxpool,
        "upsample": case_upsample,
        "encoder_tiny": case_encoder,
    }
    for name in RESNET_CASES:
        cases[name] = lambda name=name: case_resnet(name)
    total = 0
    for name, fn in cases.items():
        tensors = fn()
        path = args.out / f"{name}.safetensors"
        # One metadata entry: safetensors writes a map's entries in no fixed order.
        meta = {"generator": f"tools/torch_reference_model.py, torch {torch.__version__}"}
        save_file(tensors, str(path), metadata=meta)
        total += path.stat().st_size
        print(f"{path.name}: {len(tensors)} tensors, {path.stat().st_size} bytes")
    for arch in ["resnet50", "resnet18"]:
        path = args.out / f"{arch}_torchvision_keys.json"
        keys = torchvision_keys(arch)
        path.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
        total += path.stat().st_size
        print(f"{path.name}: {len(keys)} keys (torchvision {torchvision.__version__})")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
