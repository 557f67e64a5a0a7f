#!/usr/bin/env python3
"""Why pixels are marked occluded: out of frame, or forward-backward inconsistent.

Reads a store with zarr-python and numpy only (independent of poodle's Rust code), recomputes
the DDFlow check |f + b'|^2 > 0.1 (|f|^2 + |b'|^2) + 0.5 from the stored flows, and splits each
pair's occluded fraction into pixels whose forward target leaves the frame and pixels that fail
the check. Usage: .venv/bin/python bench/occlusion_breakdown.py STORE [FLOW_GROUP]
"""
import zarr, numpy as np, sys
g = zarr.open_group(sys.argv[1], mode="r")
grp = sys.argv[2] if len(sys.argv) > 2 else sorted(g["flow"].group_keys())[0]
fw = g[f"flow/{grp}/forward"]; bw = g[f"flow/{grp}/backward"]; oc = g[f"flow/{grp}/occlusion"]
pairs = g["pairs"][:]
N, _, H, W = fw.shape
ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
def bil(p, x, y):
    x0 = np.clip(np.floor(x).astype(int), 0, W - 1); y0 = np.clip(np.floor(y).astype(int), 0, H - 1)
    x1 = np.clip(x0 + 1, 0, W - 1); y1 = np.clip(y0 + 1, 0, H - 1)
    fx = x - x0; fy = y - y0
    return p[y0, x0]*(1-fx)*(1-fy) + p[y0, x1]*fx*(1-fy) + p[y1, x0]*(1-fx)*fy + p[y1, x1]*fx*fy
rows = []
for i in range(N):
    f = fw[i] / 32.0; b = bw[i] / 32.0
    x = xs + f[0]; y = ys + f[1]
    oob = ~((x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1))
    bu = bil(b[0], x, y); bv = bil(b[1], x, y)
    lhs = (f[0] + bu)**2 + (f[1] + bv)**2
    rhs = 0.1 * (f[0]**2 + f[1]**2 + bu**2 + bv**2) + 0.5
    fb = (lhs > rhs) & ~oob
    mag = np.hypot(f[0], f[1])
    rows.append((pairs[i][0], pairs[i][2], oc[i].mean(), oob.mean(), fb.mean(), np.median(mag)))
    print("video %d dt %2d occ %.3f = out-of-frame %.3f + fb-inconsistent %.3f; median |f| %.1f px" % rows[-1])
r = np.array(rows)
print("median occ %.3f, out-of-frame %.3f, fb %.3f" % tuple(np.median(r[:, 2:5], axis=0)))
