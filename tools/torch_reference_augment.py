#!/usr/bin/env python3
"""torchvision reference outputs for poodle-train's photometric augmentation and global crop.

Writes small safetensors fixtures that `poodle-train/tests/augment_parity.rs` checks
`poodle_train::data::colour` and `poodle_common::flowmath::resize_window{,_flow}` against
(CI has no PyTorch; rerun this only to regenerate them):

    .venv-ref/bin/python tools/torch_reference_augment.py [OUT_DIR]

OUT_DIR defaults to poodle-train/tests/fixtures/augment. Needs torch, torchvision, safetensors.

Every output comes from torchvision.transforms.functional (tensor path, float32 images in
[0, 1], as the authors' pipeline runs after `to_tensor`) or torch.nn.functional.interpolate;
nothing here restates the Rust code. Files and keys:

- colour.safetensors: `in.smooth`, `in.noisy` (3, 12, 32) float32. For op in brightness,
  contrast, saturation, hue: `{op}.factors` (float64, n) and `{op}.{img}.{i}` = F.adjust_{op}
  of image `img` by factor i. `grayscale.{img}` = F.rgb_to_grayscale(num_output_channels=3);
  `normalize.{img}` = F.normalize with `normalize.mean`, `normalize.std` (ImageNet).
- blur.safetensors: `in.smooth`, `in.noisy` (1, 48, 96). `case.{i}.params` (float64:
  image index 0 smooth / 1 noisy, sigma, kx, ky) and `case.{i}.out` = F.gaussian_blur(img,
  kernel_size=[kx, ky], sigma=[sigma, sigma]). torchvision's kernel_size is (x, y): kx taps
  along the width, ky along the height. The main cases use the authors' kernel for a 48x96
  crop, (round_up_odd(0.1 * 48), round_up_odd(0.1 * 96)) = (7, 11), passed in that order as
  the authors do; two cases use a long (53, 41) kernel at sigma 2.0 / 1.3, where a
  4-sigma truncation drops the most.
- compose.safetensors: `in` (3, 48, 96). `comp.{i}.order` (int64, 4: ColorJitter's fn_idx,
  0 brightness 1 contrast 2 saturation 3 hue), `comp.{i}.factors` (float64: b, c, s, h),
  `comp.{i}.rest` (float64: grayscale 0/1, blur sigma (0 = none), kx, ky, solarize threshold
  (negative = none)) and `comp.{i}.out`: jitter in that order, grayscale, blur, solarize,
  then ImageNet normalize (the order of torchvision's Compose in the authors' and BYOL's
  recipes).
- crop.safetensors: `in.img` (3, 45, 80), `in.flow` (2, 45, 80), `params` (int64: scaled
  h, w, y0, x0, out h, w) = (59, 105, 7, 20, 32, 64). `out.img` = F.interpolate(img, (59,
  105), bilinear, align_corners=False, antialias=False)[..., 7:39, 20:84]; `out.flow` the
  same for the flow, then u *= 105 / 80, v *= 59 / 45 (the authors' "resize, then crop").
"""

import math
import pathlib
import sys

import torch
import torch.nn.functional as NF
import torchvision.transforms.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "poodle-train/tests/fixtures/augment"
GEN = torch.Generator().manual_seed(20240611)
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def round_up_odd(x):
    # The authors' helper (src/datasets/bdd100k.py): ceil(x / 2) * 2 + 1.
    return int(math.ceil(x / 2) * 2 + 1)


def smooth_image(c, h, w):
    """Smooth colour gradients with exact 0 and 1 values and one gray row (max == min)."""
    y = torch.linspace(0.0, 1.0, h).view(h, 1).expand(h, w)
    x = torch.linspace(0.0, 1.0, w).view(1, w).expand(h, w)
    r = 0.5 + 0.5 * torch.sin(2 * math.pi * (x + 0.3 * y))
    g = y
    b = (0.5 + 0.5 * torch.cos(3 * math.pi * x * y)).clamp(0.0, 1.0)
    img = torch.stack([r, g, b])[:c].clone()
    if c == 3:
        img[:, -1, :] = x[0]  # a gray row: hue and saturation are 0 there
    return img.float().contiguous()


def noisy_image(c, h, w):
    """8-bit noise as `to_tensor` gives it: many ties between channels (hue branch order)."""
    return (torch.randint(0, 256, (c, h, w), generator=GEN).float() / 255.0).contiguous()


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def colour_fixture():
    imgs = {"smooth": smooth_image(3, 12, 32), "noisy": noisy_image(3, 12, 32)}
    out = {f"in.{k}": v for k, v in imgs.items()}
    ops = {
        "brightness": (F.adjust_brightness, [0.3, 1.6]),
        "contrast": (F.adjust_contrast, [0.25, 1.7]),
        "saturation": (F.adjust_saturation, [0.0, 0.4, 1.8]),
        "hue": (F.adjust_hue, [-0.2, -0.06, 0.11, 0.2]),
    }
    for op, (fn, factors) in ops.items():
        out[f"{op}.factors"] = f64(factors)
        for name, img in imgs.items():
            for i, f in enumerate(factors):
                out[f"{op}.{name}.{i}"] = fn(img, f).contiguous()
    for name, img in imgs.items():
        out[f"grayscale.{name}"] = F.rgb_to_grayscale(img, num_output_channels=3).contiguous()
        out[f"normalize.{name}"] = F.normalize(img, MEAN, STD).contiguous()
    out["normalize.mean"] = f64(MEAN)
    out["normalize.std"] = f64(STD)
    return out


def blur_fixture():
    h, w = 48, 96
    imgs = [smooth_image(1, h, w), noisy_image(1, h, w)]
    # The authors' tuple, in their order: (from the height, from the width) = (kx, ky).
    kx, ky = round_up_odd(0.1 * h), round_up_odd(0.1 * w)
    assert (kx, ky) == (7, 11)
    cases = [
        (1, 0.1, kx, ky),
        (1, 0.6, kx, ky),
        (1, 1.0, kx, ky),
        (1, 2.0, kx, ky),
        (0, 0.1, kx, ky),
        (0, 2.0, kx, ky),
        (1, 2.0, 53, 41),
        (1, 1.3, 53, 41),
    ]
    out = {"in.smooth": imgs[0], "in.noisy": imgs[1]}
    for i, (im, sigma, cx, cy) in enumerate(cases):
        out[f"case.{i}.params"] = f64([im, sigma, cx, cy])
        out[f"case.{i}.out"] = F.gaussian_blur(imgs[im], [cx, cy], [sigma, sigma]).contiguous()
    return out


def compose_fixture():
    h, w = 48, 96
    img = (0.6 * smooth_image(3, h, w) + 0.4 * noisy_image(3, h, w)).contiguous()
    kx, ky = round_up_odd(0.1 * h), round_up_odd(0.1 * w)
    comps = [
        # Authors' recipe shape: jitter, no grayscale, blur, no solarize.
        ([2, 0, 3, 1], [1.3, 0.6, 1.5, 0.12], [0.0, 1.2, kx, ky, -1.0]),
        # BYOL shape: jitter, grayscale, blur, solarize at 0.5.
        ([3, 1, 0, 2], [0.5, 1.7, 0.3, -0.15], [1.0, 0.4, kx, ky, 0.5]),
    ]
    out = {"in": img}
    for i, (order, (b, c, s, hue), rest) in enumerate(comps):
        x = img.clone()
        for op in order:
            if op == 0:
                x = F.adjust_brightness(x, b)
            elif op == 1:
                x = F.adjust_contrast(x, c)
            elif op == 2:
                x = F.adjust_saturation(x, s)
            else:
                x = F.adjust_hue(x, hue)
        gray, sigma, cx, cy, thr = rest
        if gray:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if sigma > 0:
            x = F.gaussian_blur(x, [int(cx), int(cy)], [sigma, sigma])
        if thr >= 0:
            x = F.solarize(x, thr)
        x = F.normalize(x, MEAN, STD)
        out[f"comp.{i}.order"] = torch.tensor(order, dtype=torch.int64)
        out[f"comp.{i}.factors"] = f64([b, c, s, hue])
        out[f"comp.{i}.rest"] = f64(rest)
        out[f"comp.{i}.out"] = x.contiguous()
    return out


def crop_fixture():
    h, w, sh, sw, y0, x0, oh, ow = 45, 80, 59, 105, 7, 20, 32, 64
    img = (0.5 * smooth_image(3, h, w) + 0.5 * noisy_image(3, h, w)).contiguous()
    flow = (3.0 * torch.randn(2, h, w, generator=GEN)).float().contiguous()

    def window(m):
        r = NF.interpolate(m[None], size=(sh, sw), mode="bilinear", align_corners=False, antialias=False)[0]
        return r[:, y0:y0 + oh, x0:x0 + ow]

    f = window(flow).clone()
    f[0] *= sw / w
    f[1] *= sh / h
    return {
        "in.img": img,
        "in.flow": flow,
        "params": torch.tensor([sh, sw, y0, x0, oh, ow], dtype=torch.int64),
        "out.img": window(img).contiguous(),
        "out.flow": f.contiguous(),
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, make in [
        ("colour", colour_fixture),
        ("blur", blur_fixture),
        ("compose", compose_fixture),
        ("crop", crop_fixture),
    ]:
        path = OUT / f"{name}.safetensors"
        save_file(make(), str(path))
        size = path.stat().st_size
        total += size
        print(f"{path}: {size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
