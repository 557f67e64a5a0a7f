#!/usr/bin/env python3
"""The authors' subcrop boxes on recorded random draws, for poodle-train's subcrop sampler.

Writes `poodle-train/tests/fixtures/subcrops/subcrop_reference.json`, which
`poodle-train/tests/subcrop_reference.rs` replays through `poodle_train::data::subcrops`:

    python3 tools/subcrop_reference.py [OUT_FILE]

Standard library only (no torch): the rules below are the authors' `Poodle.forward` subcrop
loop (agentic-learning-ai-lab/poodle, `src/models/poodle.py`) and torchvision's
`RandomResizedCrop.get_params`, with each torch random call replaced by a recorded draw:

- `["u", k]`: one `torch.rand` / `uniform_` value, u = k / 2**53 in [0, 1) (an integer, so
  JSON carries it exactly); `uniform_(a, b)` is a + (b - a) u, `rand` is u.
- `["int", n, v]`: `torch.randint(lo, lo + n)` returned lo + v, v in [0, n).
- `["choose", n, k, replacement, picked]`: `torch.multinomial(torch.ones(n), k,
  replacement)` returned `picked`.

Draws are consumed in the authors' order for one image (one direction): the multinomial over
grid cells; per cell the online scale, get_params (area, log-aspect, randint top, randint
left), up to 5 tries of (randint i, randint j, rand dy, rand dx), the fallback centre; then,
after all K cells, one get_params per cell for the target box with scale (online, smax).

Arithmetic is float64 here and float32 in the authors' torch tensors; the fixture's flows are
dyadic (exact in both) and no draw lands within float32 noise of a rounding boundary, except
where a case is built to (the `ties` case: jitter 0 and half-pixel flows, where torch.round
and Python's round both round half to even).

Case `empty_last_column`: at 43 x 90 the grid side is 18, which divides 90, so the authors'
last grid column is [90, 90) and `torch.randint(90, 90)` raises. The fixture records that
error (`authors_error`) and, separately, the boxes under poodle's documented deviation (an
empty last cell draws its centre from the last pixel column), so the test shows the
difference rather than hiding it.

Fixture schema: {"cases": [{"name", "h", "w", "k", "area", "ratio", "jitter", "tries",
"flow": {"u": [a, bx, by], "v": [a, bx, by]} (u(x, y) = a + bx x + by y, pixels),
"draws", "pairs": [{"cell": [row, col], "online_centre": [x, y], "target_centre": [x, y],
"paired", "area": [online, target], "online_xyxy", "target_xyxy"}], "authors_error"?}]}.
Boxes are the authors' final (x1, y1, x2, y2), right/bottom exclusive.
"""

import json
import math
import pathlib
import random
import sys

MAX_TRIES_PER_CROP = 5  # poodle.py
TWO53 = 2**53


class EmptyRange(Exception):
    pass


class Draws:
    """torch's random calls, drawn from a seeded Python generator and recorded."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.log = []

    def rand(self):
        k = self.rng.getrandbits(53)
        self.log.append(["u", k])
        return k / TWO53

    def uniform_(self, a, b):
        return a + (b - a) * self.rand()

    def randint(self, lo, hi):
        if hi <= lo:
            raise EmptyRange(f"torch.randint({lo}, {hi}): empty range")
        v = self.rng.randrange(hi - lo)
        self.log.append(["int", hi - lo, v])
        return lo + v

    def multinomial_ones(self, n, k, replacement):
        if replacement:
            picked = [self.rng.randrange(n) for _ in range(k)]
        else:
            picked = self.rng.sample(range(n), k)
        self.log.append(["choose", n, k, replacement, picked])
        return picked


def get_params(height, width, scale, ratio, d):
    """torchvision RandomResizedCrop.get_params, plus the area fraction it accepted."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        frac = d.uniform_(scale[0], scale[1])
        target_area = area * frac
        aspect_ratio = math.exp(d.uniform_(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = d.randint(0, height - h + 1)
            j = d.randint(0, width - w + 1)
            return i, j, h, w, frac
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, h * w / area


def flow_at(flow, i, j):
    """(dy, dx) at integer pixel (row i, column j): the authors' flow[:, i, j].flip(0)."""
    u, v = flow["u"], flow["v"]
    return v[0] + v[1] * j + v[2] * i, u[0] + u[1] * j + u[2] * i


def subcrops(case, d, empty_cell_last_pixel=False):
    """The authors' subcrop loop for one image; returns the pairs (fixture schema)."""
    H, W, K = case["h"], case["w"], case["k"]
    s0, s1 = case["area"]
    ratio, jitter = case["ratio"], case["jitter"]
    res = round(math.sqrt((s0 + s1) / 2) * min(H, W))
    grid = [(gi, gj) for gi in range(H // res + 1) for gj in range(W // res + 1)]
    picked = d.multinomial_ones(len(grid), K, K > len(grid))

    def span(g, n):
        lo, hi = g * res, min((g + 1) * res, n)
        if empty_cell_last_pixel and hi <= lo:
            return n - 1, n  # poodle's deviation, not the authors'
        return lo, hi

    def centre(gi, gj, h, w):
        i = max(d.randint(*span(gi, H)), h // 2)
        j = max(d.randint(*span(gj, W)), w // 2)
        return i, j

    online = []
    for gi, gj in (grid[p] for p in picked):
        s = (s1 - s0) * d.rand() + s0
        _, _, h, w, _ = get_params(H, W, (s, s), ratio, d)
        found = None
        for _ in range(case["tries"]):
            i, j = centre(gi, gj, h, w)
            jy = H * (2 * d.rand() - 1) * jitter
            jx = W * (2 * d.rand() - 1) * jitter
            fy, fx = flow_at(case["flow"], i, j)
            ti, tj = round(i + fy + jy), round(j + fx + jx)  # half to even, as torch.round
            if 0 <= ti < H and 0 <= tj < W:
                found = (i, j, ti, tj)
                break
        paired = found is not None
        if not paired:
            i, j = centre(gi, gj, h, w)
            found = (i, j, i, j)
        online.append(((gi, gj), found, paired, s, h, w))

    pairs = []
    for (cell, (i, j, ti, tj), paired, s, h, w) in online:
        _, _, th, tw, ts = get_params(H, W, (s, s1), ratio, d)
        y1, x1 = ti - th // 2, tj - tw // 2
        clamp = lambda v, n: min(max(v, 0), n)
        pairs.append({
            "cell": list(cell),
            "online_centre": [j, i],
            "target_centre": [tj, ti],
            "paired": paired,
            "area": [s, ts],
            "online_xyxy": [j - w // 2, i - h // 2, j - w // 2 + w, i - h // 2 + h],
            "target_xyxy": [clamp(x1, W), clamp(y1, H), clamp(x1 + tw, W), clamp(y1 + th, H)],
        })
    return pairs


AUTHORS = {"area": [0.05, 0.3], "ratio": [0.75, 1.3333], "jitter": 0.1,
           "tries": MAX_TRIES_PER_CROP}


def case(name, h, w, k, flow, seed, **over):
    return {"name": name, "seed": seed, "h": h, "w": w, "k": k, **AUTHORS, **over, "flow": flow}


# Flows in pixels, dyadic so f32 and f64 hold them exactly; u and v each depend on x and y,
# so reading the flow at (x, y) instead of (row, column), or with u and v swapped, moves
# centres.
SMOOTH = {"u": [3.25, 0.0625, -0.125], "v": [-2.5, -0.03125, 0.09375]}
# Most centres leave the frame to the left: some tries miss, some cells fall back.
LEFT = {"u": [-70.0, 0.0, 0.0], "v": [1.0, 0.0, 0.0]}
# Jitter 0 and half-pixel moves: every even (x, y) + 0.5 is a tie.
HALF = {"u": [2.5, 0.0, 0.0], "v": [-1.5, 0.0, 0.0]}

CASES = [
    *(case(f"authors_64x128_seed{s}", 64, 128, 6, SMOOTH, s) for s in range(4)),
    *(case(f"flow_leaves_frame_seed{s}", 64, 128, 6, LEFT, 10 + s) for s in range(3)),
    case("k_exceeds_cells", 32, 48, 20, SMOOTH, 20),
    case("ties", 48, 96, 6, HALF, 30, jitter=0.0),
    case("empty_last_column", 43, 90, 6, SMOOTH, 42),  # a seed that meets column 5
]


def check(cases):
    """The cases exercise what they are named for."""
    by = {c["name"]: c for c in cases}
    moved = [p for p in by["ties"]["pairs"]
             for o, t, f in zip(p["online_centre"], p["target_centre"], (2.5, -1.5))
             if o % 2 == 0 and t != math.floor(o + f + 0.5)]
    assert moved, "no tie where half-to-even and half-up disagree"
    left = [p["paired"] for c in cases if c["name"].startswith("flow_leaves") for p in c["pairs"]]
    assert any(left) and not all(left), "want paired and fallback pairs"
    assert "authors_error" in by["empty_last_column"]


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                       "poodle-train/tests/fixtures/subcrops/subcrop_reference.json")
    cases = []
    for c in CASES:
        d = Draws(c["seed"])
        try:
            c["pairs"] = subcrops(c, d)
        except EmptyRange as e:
            c["authors_error"] = str(e)
            d = Draws(c["seed"])
            c["pairs"] = subcrops(c, d, empty_cell_last_pixel=True)
        c["draws"] = d.log
        cases.append(c)
    check(cases)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": cases}, separators=(",", ":")) + "\n")
    stats = [(c["name"], sum(p["paired"] for p in c["pairs"]), len(c["pairs"]), len(c["draws"]),
              c.get("authors_error", "")) for c in cases]
    for s in stats:
        print(*s)


if __name__ == "__main__":
    main()
