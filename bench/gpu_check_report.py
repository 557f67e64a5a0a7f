"""Turns a gpu-check run (OUT/candle.jsonl, torch_dense.jsonl, torch_trunk.jsonl, torch_step.log
or torch_anchor.json, stages.jsonl) into the markdown section that goes into bench/RESULTS.md.
Any file may be missing or cut short (a stage that hit its limit): the rows it would give are
left out or marked. GPU_CHECK_CARD and GPU_CHECK_SHA (from tools/cuda/gpu-check.sh) name the
card and the bundle's commit when the results do not. Ratios are candle / PyTorch on the
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
try:
    anchor = json.load(open(os.path.join(out, "torch_anchor.json")))
except (OSError, ValueError):
    pass
torch_step = {r["mode"].replace("fp32", "f32"): r for r in anchor.get("runs", []) if "mode" in r}
# The step baseline prints each mode as it ends: "TRAIN {json}", or "TRAIN-FAIL mode error" (an
# out-of-memory on a smaller card). gpu-check.sh keeps only this log; a stage cut at its limit
# keeps the modes that finished.
log = os.path.join(out, "torch_step.log")
if os.path.exists(log):
    for line in open(log, errors="replace"):
        if line.startswith("TRAIN {"):
            try:
                r = json.loads(line[len("TRAIN "):])
                torch_step.setdefault(r["mode"].replace("fp32", "f32"), r)
            except (ValueError, KeyError, AttributeError):
                pass
        elif line.startswith("TRAIN-FAIL"):
            _, mode, msg = (line.rstrip("\n").split(" ", 2) + ["", ""])[:3]
            torch_step.setdefault(mode.replace("fp32", "f32"), {"error": msg})

card = os.environ.get("GPU_CHECK_CARD", "").strip()
if not card:
    try:
        card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        card = anchor.get("device") or next((r["device"] for r in torch_trunk if "device" in r), "unknown card")
torch_version = anchor.get("torch") or next((r["torch"] for r in torch_trunk if "torch" in r), "?")
info = next((r for r in candle if r.get("kind") == "info"), {})
info.setdefault("git_sha", os.environ.get("GPU_CHECK_SHA") or "?")
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
p = print
p(f"## gpu-check on {card}, {date}")
p()
p(f"git {info['git_sha']}, cuDNN {info.get('cudnn_version', '?')}, PyTorch {torch_version}.")
p()
p("Stages (limit s / seconds / exit code; 124: hit the limit, 137: killed): " + (", ".join(
    f"{s.get('stage')} {s.get('limit')}/{s.get('seconds')}/{s.get('rc')}" for s in stages) or "none recorded"))
p()


def cell(x, n=300):
    """Text for a table cell: one line, no pipes, at most n characters."""
    return " ".join(str(x).split()).replace("|", "/")[:n]


failed = []
p("### Parity, CUDA against the CPU reference (relative L2 error)")
p()
p("| op | precision | tensor | rel. error | tolerance | ok |")
p("| --- | --- | --- | --- | --- | --- |")
for r in candle:
    if r.get("kind") == "parity":
        err = r.get("rel_err")
        if r.get("error"):
            err = "error: " + cell(r["error"])
        elif isinstance(err, (int, float)):
            err = f"{err:.2e}"
        else:  # NaN comes as null; the algorithm-cache row has counts instead
            err = json.dumps(r.get("cached")) if "cached" in r else "NaN"
        extra = [f"{k} {json.dumps(r[k])}" for k in ("compared", "floored", "missing", "unused", "worst",
                                                       "elements", "left_out") if r.get(k) not in (None, [], "")]
        tensor = cell(r.get("tensor", "")) + (f" ({cell(', '.join(extra), 200)})" if extra else "")
        tol = r.get("tol")
        ok = bool(r.get("ok"))
        if not ok:
            failed.append(f"{r.get('op')} {r.get('precision')} {tensor}: {err}")
        p(f"| {cell(r.get('op', '?'))} | {r.get('precision', '-')} | {tensor} | {err} | {tol if tol is not None else ''} | {'yes' if ok else '**NO**'} |")
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
        if r.get("error"):
            p(f"| {name} | error: {cell(r['error'], 200)} | | | |")
            continue
        pk, sec = r.get("peak_gib"), r.get("s")
        p(f"| {name} | {fmt(sec * 1e3 if isinstance(sec, (int, float)) else None, '{:.1f}')} | {fmt(pk)} | "
          f"{fmt(pk / ref if pk and ref else None)} | {fmt(r.get('loss'), '{:.4f}')} |")
    if dense and dense.get("error"):
        p(f"\ncandle dense stage failed: {cell(dense['error'])}")
    p()


# One BatchNorm at layer1's size, forward + backward: cuDNN against the fused passes of
# synchronised BatchNorm (world of one: no all-reduce).
bn_rows = [r for r in candle if r.get("kind") == "batchnorm"]
if bn_rows:
    p("### BatchNorm alone: cuDNN against synchronised BatchNorm's fused passes (no all-reduce)")
    p()
    p("| precision | shape | cuDNN ms | fused ms | fused / cuDNN | y rel. error | note |")
    p("| --- | --- | --- | --- | --- | --- | --- |")
    for r in bn_rows:
        forms = {f.get("form"): f.get("s") for f in r.get("forms", [])}
        u, f = forms.get("unsynchronised"), forms.get("fused")
        note = cell(r.get("error") or r.get("skipped") or "", 200)
        err = r.get("y_rel_err")
        p(f"| {r.get('precision')} | {r.get('shape', '')} | {fmt(u * 1e3 if u else None)} | "
          f"{fmt(f * 1e3 if f else None)} | {fmt(r.get('fused_over_unsynchronised'))} | "
          f"{fmt(err, '{:.1e}')} | {note} |")
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


if not any(r.get("kind") == "parity" for r in candle):
    failed.append("parity: no results (the parity stage wrote none; see stages.log)")
for r in candle:
    if r.get("kind") in ("trunk", "step", "dense", "batchnorm", "nccl") and (r.get("error") or r.get("ok") is False):
        failed.append(f"{r['kind']} {r.get('precision', '')}: {cell(r.get('error') or 'ok: false', 200)}")
table("ResNet-50 trunk, batch 8 at 512x1024, forward + backward, training BatchNorm", "trunk", "img_per_s",
      {r["precision"]: r for r in torch_trunk}, "img/s")
table("Full PooDLe step: 4 pairs at 512x1024, K = 6, symmetric, EMA, AdamW", "step", "pairs_per_s",
      torch_step, "pairs/s")
step = next((r for r in candle if r.get("kind") == "step" and "decoder_order" in r), None)
p("Same work on both sides: the decoder in the paper's order (upsample, then the bottleneck), "
  f"as torch_poodle_step.py runs it (candle: decoder {step['decoder_order'] if step else '?'}). "
  f"The dense loss differs: candle {step['dense_order'] if step else '?'}, PyTorch the plain form "
  "(upsample, warp, cosine, mean; no undo, no mask), so the memory ratio mostly measures the loss "
  "form (the dense-loss table compares the forms alone).")
p()
bad_stages = [s for s in stages if s.get("rc") != 0]
p(f"### Summary: {len(failed)} failed check(s), {len(bad_stages)} stage(s) with a non-zero exit")
p()
for f in failed:
    p(f"- {cell(f, 400)}")
for s in bad_stages:
    if s.get("rc") == "skipped":
        p(f"- stage {s.get('stage')}: skipped, the script's time budget was spent")
    else:
        p(f"- stage {s.get('stage')}: rc {s.get('rc')} after {s.get('seconds')} s (limit {s.get('limit')}); its output is in stages.log")
