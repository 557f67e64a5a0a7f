#!/usr/bin/env python3
"""Reads a poodle store with zarr-python 3 and checks it against what the Rust reader saw.

Usage: zarr_interop.py STORE EXPECTED.json

EXPECTED.json is written by poodle-prep/tests/zarr_python.rs from
`poodle_common::store::PoodleStore`; this script re-reads the same store with nothing but
zarr-python and numpy and checks the schema (poodle-common/src/store.rs) from the outside:
group attributes, array names, shapes, dtypes, the flow `scale_factor`, the sharding codec
(one pair per inner chunk) and, for the pairs in EXPECTED.json, the stored values (integers
exactly, floats to 1e-6). Prints a short report; exits 1 with the list of mismatches.
"""

import json
import sys
import warnings

import numpy as np
import zarr

FLOAT_TOL = 1e-6

# Schema of poodle-common/src/store.rs (array -> dtype, dimension names).
ROOT_ARRAYS = {
    "frames": ("uint8", ("pair", "frame", "channel", "y", "x")),
    "pairs": ("int64", ("pair", "video_t_dt")),
    "valid": ("bool", ("pair",)),
}
FLOW_ARRAYS = {
    "forward": ("int16", ("pair", "uv", "y", "x")),
    "backward": ("int16", ("pair", "uv", "y", "x")),
    "occlusion": ("bool", ("pair", "y", "x")),
    "occlusion_backward": ("bool", ("pair", "y", "x")),
    "stats": ("float32", ("pair", "stat")),
}


def weighted_sum(a):
    """sum(v[k] * (k % 251 + 1)) over the flat C-order index k: catches transposed layouts."""
    flat = np.ascontiguousarray(a).reshape(-1).astype(np.int64)
    w = np.arange(flat.size, dtype=np.int64) % 251 + 1
    return int(np.dot(flat, w))


class Checker:
    def __init__(self):
        self.errors = []
        self.checks = 0

    def eq(self, what, got, want):
        self.checks += 1
        if got != want:
            self.errors.append(f"{what}: zarr-python has {got!r}, expected {want!r}")

    def close(self, what, got, want):
        self.checks += 1
        got, want = float(got), float(want)
        if not abs(got - want) <= FLOAT_TOL * max(1.0, abs(want)):
            self.errors.append(f"{what}: zarr-python has {got!r}, expected {want!r} (tol {FLOAT_TOL})")

    def true(self, what, ok, detail=""):
        self.checks += 1
        if not ok:
            self.errors.append(f"{what}{': ' + detail if detail else ''}")


def sharding(arr):
    """(outer chunk shape, inner chunk shape, inner codec names) of a sharded array, else None."""
    meta = arr.metadata.to_dict()
    codecs = list(meta.get("codecs", []))
    shard = [c for c in codecs if c.get("name") == "sharding_indexed"]
    if len(shard) != 1:
        return None
    conf = shard[0].get("configuration", {})
    outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    inner = tuple(conf.get("chunk_shape", ()))
    inner_codecs = [c.get("name") for c in conf.get("codecs", [])]
    return outer, inner, inner_codecs


def check_array(c, group, path, dtype, dims, shape, pairs_per_shard):
    try:
        arr = group[path]
    except KeyError:
        c.true(f"array {path}", False, "missing")
        return None
    c.true(f"{path} is an array", isinstance(arr, zarr.Array), type(arr).__name__)
    if not isinstance(arr, zarr.Array):
        return None
    c.eq(f"{path} zarr_format", arr.metadata.zarr_format, 3)
    c.eq(f"{path} shape", tuple(arr.shape), tuple(shape))
    c.eq(f"{path} dtype", str(arr.dtype), dtype)
    c.eq(f"{path} dimension_names", tuple(arr.metadata.dimension_names or ()), dims)
    sh = sharding(arr)
    c.true(f"{path} has the sharding_indexed codec", sh is not None)
    if sh is not None:
        outer, inner, inner_codecs = sh
        c.eq(f"{path} shard shape", outer, (pairs_per_shard,) + tuple(shape[1:]))
        c.eq(f"{path} inner chunk (one pair)", inner, (1,) + tuple(shape[1:]))
        c.true(f"{path} inner codecs compress", "zstd" in inner_codecs, str(inner_codecs))
    return arr


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    store_path, expected_path = argv[1], argv[2]
    with open(expected_path) as f:
        exp = json.load(f)
    c = Checker()
    notes = []

    root = zarr.open_group(store_path, mode="r")
    c.eq("root zarr_format", root.metadata.zarr_format, 3)
    poodle = dict(root.attrs).get("poodle")
    c.true("root attributes['poodle']", isinstance(poodle, dict), "missing")
    poodle = poodle or {}
    c.eq("schema_version", poodle.get("schema_version"), exp["schema_version"])
    geom = poodle.get("geometry", {})
    for k in ("num_pairs", "height", "width", "pairs_per_shard"):
        c.eq(f"attrs geometry.{k}", geom.get(k), exp[k])
    c.eq("attrs videos", poodle.get("videos"), exp["videos"])

    # Member names, as zarr-python lists them (it warns about the job folder `.poodle/`).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = sorted(root.keys())
        flow_names = sorted(root["flow"].group_keys()) if "flow" in names else []
    for w in caught:
        notes.append(f"zarr-python warning: {w.message}")
    c.eq("root members", names, sorted(["flow", *ROOT_ARRAYS]))
    c.eq("flow groups", flow_names, sorted(exp["flow_groups"]))

    n, h, w, pps = exp["num_pairs"], exp["height"], exp["width"], exp["pairs_per_shard"]
    shapes = {"frames": (n, 2, 3, h, w), "pairs": (n, 3), "valid": (n,)}
    arrays = {}
    for name, (dtype, dims) in ROOT_ARRAYS.items():
        arrays[name] = check_array(c, root, name, dtype, dims, shapes[name], pps)

    flow = {}
    for gname, gexp in exp["flow_groups"].items():
        base = f"flow/{gname}"
        fattrs = dict(root[base].attrs).get("poodle", {}) if "flow" in names else {}
        c.eq(f"{base} attrs flow_scale", fattrs.get("flow_scale"), gexp["flow_scale"])
        c.eq(f"{base} attrs backward", fattrs.get("backward"), gexp["backward"])
        c.eq(f"{base} attrs stat_names", fattrs.get("stat_names"), gexp["stat_names"])
        want = ["forward", "occlusion", "stats"] + (["backward", "occlusion_backward"] if gexp["backward"] else [])
        have = sorted(root[base].array_keys()) if "flow" in names else []
        c.eq(f"{base} arrays", have, sorted(want))
        nstat = len(gexp["stat_names"])
        fshapes = {"forward": (n, 2, h, w), "backward": (n, 2, h, w), "occlusion": (n, h, w),
                   "occlusion_backward": (n, h, w), "stats": (n, nstat)}
        g = {}
        for a in want:
            dtype, dims = FLOW_ARRAYS[a]
            g[a] = check_array(c, root, f"{base}/{a}", dtype, dims, fshapes[a], pps)
        for a in ("forward", "backward"):
            if g.get(a) is not None:
                c.eq(f"{base}/{a} attrs scale_factor", g[a].attrs.get("scale_factor"), 1 / 32)
                c.eq(f"{base}/{a} scale_factor == group flow_scale",
                     g[a].attrs.get("scale_factor"), gexp["flow_scale"])
        if g.get("stats") is not None:
            c.eq(f"{base}/stats attrs names", g["stats"].attrs.get("names"), gexp["stat_names"])
        flow[gname] = g

    # Whole small arrays read in one go (this crosses the partial last shard).
    if arrays["pairs"] is not None and arrays["valid"] is not None:
        all_pairs = arrays["pairs"][:]
        all_valid = arrays["valid"][:]
        c.eq("pairs[:] rows", all_pairs.shape[0], n)
        c.true("pairs[:, 0] indexes attrs videos",
               bool(((all_pairs[:, 0] >= 0) & (all_pairs[:, 0] < len(exp["videos"]))).all()))
        c.eq("valid[:] count", int(all_valid.sum()), exp["valid_count"])

    for p in exp["pairs"]:
        i = p["index"]
        tag = f"pair {i}"
        if arrays["pairs"] is not None:
            row = [int(v) for v in arrays["pairs"][i]]
            c.eq(f"{tag} (video, t, dt)", row, [p["video"], p["t"], p["dt"]])
        if arrays["valid"] is not None:
            c.eq(f"{tag} valid", bool(arrays["valid"][i]), p["valid"])
        if arrays["frames"] is not None:
            fr = arrays["frames"][i]
            c.eq(f"{tag} frames shape", fr.shape, (2, 3, h, w))
            c.eq(f"{tag} frames sum", int(fr.sum(dtype=np.uint64)), p["frames_sum"])
            c.eq(f"{tag} frames weighted sum", weighted_sum(fr), p["frames_wsum"])
        for gname, gp in p["flow"].items():
            g = flow.get(gname, {})
            for a in ("forward", "backward"):
                if f"{a}_sum" in gp and g.get(a) is not None:
                    q = g[a][i]
                    c.eq(f"{tag} {gname}/{a} int16 sum", int(q.sum(dtype=np.int64)), gp[f"{a}_sum"])
                    c.eq(f"{tag} {gname}/{a} int16 weighted sum", weighted_sum(q), gp[f"{a}_wsum"])
                    deq = q.astype(np.float64) * float(g[a].attrs.get("scale_factor", 0))
                    c.close(f"{tag} {gname}/{a} sum in pixels", deq.sum(),
                            gp[f"{a}_sum"] * exp["flow_groups"][gname]["flow_scale"])
            if g.get("occlusion") is not None:
                occ = g["occlusion"][i]
                c.eq(f"{tag} {gname}/occlusion count", int(occ.sum()), gp["occluded"])
            if "occluded_backward" in gp:
                ob = g.get("occlusion_backward")
                c.true(f"{tag} {gname}/occlusion_backward present", ob is not None)
                if ob is not None:
                    c.eq(f"{tag} {gname}/occlusion_backward weighted count",
                         weighted_sum(ob[i].astype(np.int64)), gp["occluded_backward"])
                c.eq(f"{tag} {gname}/occlusion weighted sum", weighted_sum(occ), gp["occluded_wsum"])
            if g.get("stats") is not None:
                st = g["stats"][i]
                c.eq(f"{tag} {gname}/stats length", len(st), len(gp["stats"]))
                for k, (got, want) in enumerate(zip(st, gp["stats"])):
                    c.close(f"{tag} {gname}/stats[{k}]", got, want)

    print(f"zarr-python {zarr.__version__}, numpy {np.__version__}: {store_path}")
    print(f"  {n} pairs of {h}x{w}, {pps} pairs per shard, flow groups {list(exp['flow_groups'])}, "
          f"{len(exp['pairs'])} pairs compared")
    for note in sorted(set(notes)):
        print(f"  note: {note}")
    if c.errors:
        print(f"FAIL: {len(c.errors)} of {c.checks} checks failed:")
        for e in c.errors:
            print(f"  - {e}")
        return 1
    print(f"OK: {c.checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
