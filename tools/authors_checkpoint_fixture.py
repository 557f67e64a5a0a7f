#!/usr/bin/env python3
"""A tiny checkpoint in the layout of the authors' PooDLe code, for poodle-train's loader.

The authors (github.com/agentic-learning-ai-lab/poodle) save, in src/utils/misc.py
save_model, `torch.save({'model': model.state_dict(), 'optimizer': ..., 'epoch': ...,
'args': ..., 'scaler': ...}, 'checkpoint-<epoch>.pth')`, where the model is their `Poodle`
module (src/models/poodle.py). This script builds a module with the same attribute names and
the same building blocks at a tiny size that poodle's `Backbone::Custom` expresses:

  backbone, teacher_backbone         torchvision ResNet layout (their ResNetBackbone subclasses
                                     torchvision's ResNet and deletes fc); here Bottleneck,
                                     layers [1,1,1,1], stem 4, planes [2,4,8,16] -> C5 = 64
  decoder_blocks, teacher_...        torchvision Bottleneck(C5, C5 // 4, base_width=32)
  decoder_laterals, teacher_...      nn.Conv2d(C4 -> C5, 1x1), nn.Conv2d(C3 -> C5, 1x1)
  flow_model                         a stand-in for RAFT (ignored by poodle)
  dense_projector, dense_predictor,  Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Conv2d 1x1)
  teacher_dense_projector
  pooled_projector, pooled_predictor, the same Sequential of 1x1 convs, run on (N, C, 1, 1)
  teacher_pooled_projector

The teacher's weights are the online weights perturbed (as after EMA steps), all BatchNorm
statistics non-trivial. Writes to poodle-train/tests/fixtures/model/:

  authors_poodle_tiny.pth             {'model', 'optimizer', 'epoch': 3, 'args', 'scaler'}
  authors_poodle_tiny_bad_shape.pth   {'model', 'epoch'}; decoder_laterals.1.weight is
                                      (64, 8, 1, 1) instead of (64, 16, 1, 1)
  authors_flowe_tiny.pth              {'model', 'epoch'} of a tiny module with the attributes
                                      of their Flowe (src/models/flowe.py): encoder (dilated,
                                      C5 at stride 8), projector, predictor, target_encoder,
                                      target_projector, flownet
  authors_poodle_tiny_ref.safetensors input x (1, 3, 32, 64) and eval-mode outputs:
      online.{c3,c4,c5,dense_features,p_dense,p_pooled,q_dense,q_pooled},
      teacher.{c5,dense_features,p_dense,p_pooled}
  (dense_features: the decoder output in the authors' order; p_pooled, q_pooled flattened
  to (N, C)); flowe.{online,target}.c5 of the FlowE module on the same x.

    .venv-ref/bin/python tools/authors_checkpoint_fixture.py [--out DIR]
"""

import argparse
import copy
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.resnet import Bottleneck

from torch_reference_model import DEFAULT_OUT, TinyResNet, randomize_bn


def mlp(i, h, o):
    return nn.Sequential(
        nn.Conv2d(i, h, kernel_size=1), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
        nn.Conv2d(h, o, kernel_size=1),
    )


class FlowStandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


class TinyPoodle(nn.Module):
    """The authors' Poodle attributes, in their order of creation."""

    def __init__(self, hidden=16, proj=8):
        super().__init__()
        self.backbone = TinyResNet(Bottleneck, [1, 1, 1, 1], 4, [2, 4, 8, 16], dilated=False)
        # planes [2, 4, 8, 16] x expansion 4: C2..C5 = 8, 16, 32, 64.
        dims = [8, 16, 32, 64]
        self.teacher_backbone = copy.deepcopy(self.backbone)
        c5 = dims[-1]
        self.decoder_blocks = nn.ModuleList(
            [Bottleneck(c5, c5 // 4, downsample=None, base_width=int(64 * 0.5)) for _ in range(2)]
        )
        self.decoder_laterals = nn.ModuleList(
            [nn.Conv2d(dims[-2], c5, kernel_size=1), nn.Conv2d(dims[-3], c5, kernel_size=1)]
        )
        self.teacher_decoder_blocks = copy.deepcopy(self.decoder_blocks)
        self.teacher_decoder_laterals = copy.deepcopy(self.decoder_laterals)
        self.flow_model = FlowStandIn()
        self.dense_projector = mlp(c5, hidden, proj)
        self.dense_predictor = mlp(proj, hidden, proj)
        self.teacher_dense_projector = copy.deepcopy(self.dense_projector)
        self.pooled_projector = mlp(c5, hidden, proj)
        self.pooled_predictor = mlp(proj, hidden, proj)
        self.teacher_pooled_projector = copy.deepcopy(self.pooled_projector)

    def outputs(self, x, teacher):
        t = "teacher_" if teacher else ""
        c3, c4, c5 = getattr(self, f"{t}backbone")(x)
        z = c5
        blocks, laterals = getattr(self, f"{t}decoder_blocks"), getattr(self, f"{t}decoder_laterals")
        for block, lateral, f in zip(blocks, laterals, [c4, c3]):
            z = block(z)
            z = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
            z = z + lateral(f)
        p_dense = getattr(self, f"{t}dense_projector")(z)
        pooled = F.adaptive_avg_pool2d(c5, 1)
        p_pooled = getattr(self, f"{t}pooled_projector")(pooled)
        out = {"c3": c3, "c4": c4, "c5": c5, "dense_features": z, "p_dense": p_dense,
               "p_pooled": p_pooled.flatten(1)}
        if not teacher:
            out["q_dense"] = self.dense_predictor(p_dense)
            out["q_pooled"] = self.pooled_predictor(p_pooled).flatten(1)
        return out


class TinyFlowe(nn.Module):
    """The authors' Flowe attributes (src/models/flowe.py): a timm ResNet with output_stride 8
    as `encoder` (timm's names are torchvision's; here the dilated torchvision layout), a
    projector whose first conv has no bias, predictor, EMA copies, RAFT as `flownet`."""

    def __init__(self, hidden=16, proj=8):
        super().__init__()
        self.encoder = TinyResNet(Bottleneck, [1, 1, 1, 1], 4, [2, 4, 8, 16], dilated=True)
        self.projector = nn.Sequential(
            nn.Conv2d(64, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, proj, 1),
        )
        self.predictor = mlp(proj, hidden, proj)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        self.flownet = FlowStandIn()


def perturb_teacher(m, prefix):
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.startswith(prefix) and t.is_floating_point():
                if name.endswith("running_var"):
                    t.mul_(1 + 0.2 * torch.rand_like(t))
                else:
                    t.add_(0.05 * torch.randn_like(t))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.manual_seed(11)
    m = TinyPoodle()
    randomize_bn(m)
    perturb_teacher(m, "teacher_")
    m.eval()
    x = torch.randn(1, 3, 32, 64)
    ref = {"x": x}
    with torch.no_grad():
        for teacher, keep in [(False, None), (True, {"c5", "dense_features", "p_dense", "p_pooled"})]:
            for k, v in m.outputs(x, teacher).items():
                if keep is None or k in keep:
                    ref[f"{'teacher' if teacher else 'online'}.{k}"] = v.contiguous()
    online_params = [p for n, p in m.named_parameters()
                     if not n.startswith(("teacher_", "flow_model."))]
    opt = torch.optim.AdamW(online_params, lr=5e-4, weight_decay=1e-2)
    state = m.state_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "authors_poodle_tiny.pth"
    torch.save({"model": state, "optimizer": opt.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="poodle", lr=5e-4, decoder_dims=[64, 64]),
                "scaler": {"scale": 65536.0, "_growth_tracker": 0}}, path)
    bad = dict(state)
    bad["decoder_laterals.1.weight"] = torch.randn(64, 8, 1, 1)
    bad_path = args.out / "authors_poodle_tiny_bad_shape.pth"
    torch.save({"model": bad, "epoch": 3}, bad_path)
    torch.manual_seed(12)
    f = TinyFlowe()
    randomize_bn(f)
    perturb_teacher(f, "target_")
    f.eval()
    xf = x
    with torch.no_grad():
        ref["flowe.online.c5"] = f.encoder(xf)[2].contiguous()
        ref["flowe.target.c5"] = f.target_encoder(xf)[2].contiguous()
    flowe_path = args.out / "authors_flowe_tiny.pth"
    torch.save({"model": f.state_dict(), "epoch": 2}, flowe_path)
    ref_path = args.out / "authors_poodle_tiny_ref.safetensors"
    save_file(ref, str(ref_path),
              metadata={"generator": f"tools/authors_checkpoint_fixture.py, torch {torch.__version__}"})
    for p in [path, bad_path, flowe_path, ref_path]:
        print(f"{p.name}: {p.stat().st_size} bytes")
    print(f"{len(state)} state_dict keys, e.g. {list(state)[:3]} ... {list(state)[-2:]}")


if __name__ == "__main__":
    main()
