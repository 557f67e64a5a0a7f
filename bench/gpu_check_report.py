"""Turns a gpu-check run (OUT/candle.jsonl, torch_trunk.jsonl, torch_anchor.json, stages.jsonl)
into the markdown section that goes into bench/RESULTS.md. Ratios are candle / PyTorch on the
same card in the same run: throughput ratio (> 1 is faster than PyTorch) and peak-memory ratio
(< 1 is less memory)."""
import datetime, json, os, subprocess, sys

out = sys.argv[1]


def lines(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return []
    rows = []
    for line in open(p):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


candle = lines("candle.jsonl")
torch_trunk = lines("torch_trunk.jsonl")
torch_dense = lines("torch_dense.jsonl")
stages = lines("stages.jsonl")
anchor = {}
if os.path.exists(os.path.join(out, "torch_anchor.json")):
    anchor = json.load(open(os.path.join(out, "torch_anchor.json")))
torch_step = {r["mode"].replace("fp32", "f32"): r for r in anchor.get("runs", []) if "mode" in r}
# torch_poodle_step.py reports a failed mode (an out-of-memory on a smaller card) on stdout only.
log = os.path.join(out, "torch_step.log")
if os.path.exists(log):
    for line in open(log):
        if line.startswith("TRAIN-FAIL"):
            _, mode, msg = (line.rstrip("\n").split(" ", 2) + ["", ""])[:3]
            torch_step.setdefault(mode.replace("fp32", "f32"), {"error": msg})

try:
    card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
except Exception:
    card = anchor.get("device", "unknown card")
info = next((r for r in candle if r.get("kind") == "info"), {})
if "git_sha" not in info and os.path.exists(os.path.join(out, "GIT_SHA")):
    info["git_sha"] = open(os.path.join(out, "GIT_SHA")).read().strip()
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
p = print
p(f"## gpu-check on {card}, {date}")
p()
p(f"git {info.get('git_sha', '?')}, cuDNN {info.get('cudnn_version', '?')}, PyTorch {anchor.get('torch', '?')}.")
p()
p("Stages (limit, seconds, exit code): " + ", ".join(
    f"{s['stage']} {s['limit']}/{s['seconds']}/{s['rc']}" for s in stages))
p()
p("### Parity, CUDA against the CPU reference (relative L2 error)")
p()
p("| op | precision | tensor | rel. error | tolerance | ok |")
p("| --- | --- | --- | --- | --- | --- |")
for r in candle:
    if r.get("kind") == "parity":
        err = r.get("rel_err")
        err = f"{err:.2e}" if isinstance(err, (int, float)) else json.dumps(r.get("cached"))
        tol = r.get("tol")
        p(f"| {r['op']} | {r['precision']} | {r['tensor']} | {err} | {tol if tol is not None else ''} | {'yes' if r.get('ok') else '**NO**'} |")
p()
for r in candle:
    if r.get("kind") == "nccl":
        what = r.get("error") or (f"join {r.get('join_s', 0):.2f} s, sum fwd/bwd error "
                                   f"{r.get('fwd_rel_err')}/{r.get('bwd_rel_err')}")
        p(f"NCCL, world of one through the training join: {'ok' if r.get('ok') else '**FAILED**'} ({what}).")
        p()


def fmt(x, f="{:.2f}"):
    return f.format(x) if isinstance(x, (int, float)) else "-"


# One dense-loss call at the paper's size (4 x 256 channels, 512x1024 crop), forward and
# backward, f32: poodle's fused compare and its composed form against PyTorch eager.
dense = next((r for r in candle if r.get("kind") == "dense"), None)
if dense or torch_dense:
    p("### Dense loss alone: 4 samples, 256 channels, 512x1024 crop, forward + backward, f32")
    p()
    p("| form | ms per call | peak GiB | peak / PyTorch authors' form | loss |")
    p("| --- | --- | --- | --- | --- |")
    ref = next((r.get("peak_gib") for r in torch_dense if r.get("form") == "authors"), None)
    rows = [("candle " + r["form"], r) for r in (dense or {}).get("forms", [])]
    rows += [("PyTorch " + r["form"], r) for r in torch_dense]
    for name, r in rows:
        pk = r.get("peak_gib")
        p(f"| {name} | {fmt(r.get('s', 0) * 1e3, '{:.1f}')} | {fmt(pk)} | "
          f"{fmt(pk / ref if pk and ref else None)} | {fmt(r.get('loss'), '{:.4f}')} |")
    if dense and dense.get("error"):
        p(f"\ncandle dense stage failed: {dense['error'][:300]}")
    p()


def table(title, kind, rate, torch_rows, unit):
    p(f"### {title}")
    p()
    p(f"| precision | candle {unit} | PyTorch {unit} | speed ratio | candle peak GiB | PyTorch peak GiB | memory ratio | note |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for prec in ("f32", "tf32", "bf16"):
        c = next((r for r in candle if r.get("kind") == kind and r.get("precision") == prec), None)
        t = torch_rows.get(prec)
        if c is None and t is None:
            continue
        c = c or {}
        t = t or {}
        cr, tr = c.get(rate), t.get(rate)
        cm, tm = c.get("peak_gib"), t.get("peak_gib")
        note = "; ".join(x for x in (c.get("error") and "candle: " + c["error"][:160],
                                      t.get("error") and "PyTorch: " + t["error"][:160],
                                      "loss" in c and f"candle loss {c['loss']}",
                                      "loss" in t and f"PyTorch loss {t['loss']:.4g}") if x)
        p(f"| {prec} | {fmt(cr)} | {fmt(tr)} | {fmt(cr / tr if cr and tr else None)} | {fmt(cm)} | {fmt(tm)} | "
          f"{fmt(cm / tm if cm and tm else None)} | {note} |")
    p()


table("ResNet-50 trunk, batch 8 at 512x1024, forward + backward, training BatchNorm", "trunk", "img_per_s",
      {r["precision"]: r for r in torch_trunk}, "img/s")
# bench/torch_poodle_step.py reports pairs_per_s and peak_gib per mode; failures only on stdout.
table("Full PooDLe step: 4 pairs at 512x1024, K = 6, symmetric, EMA, AdamW", "step", "pairs_per_s",
      torch_step, "pairs/s")
