#!/usr/bin/env python3
"""Rewrites candle-core 0.11.1's src/backprop.rs (the generated copy, never the registry's) so
that the backward pass stores the first gradient reaching a tensor instead of adding it into
a fresh tensor of zeros.

Why: candle's rules read `let s = grads.or_insert(t)?; ... *s = s.add(&g)?`, and `or_insert`
fills a new `zeros_like(t)`. Every gradient edge then costs a full-size fill (one write) and
a full-size add (two reads, one write) on top of the rule itself: in ResNet-50's backward
that is every convolution, BatchNorm, ReLU and residual input, all at activation size.
PyTorch's autograd stores the first gradient and adds only on real fan-in, as does the
rewritten code: `grads.accumulate(t, &g)` (`accumulate_neg` for the rules that subtract).
Values are unchanged: 0 + g == g exactly. What `zeros + g` checked (shape, dtype, device) is
still checked, and what it produced (a contiguous tensor) is still stored.

Only rules whose sum slot is used for nothing but that one add are rewritten; the others
(scatter_add, index_add, the upsample overwrite, to_device) keep `or_insert`. The counts are
checked, so a different candle-core fails here rather than building something unexamined.

Usage: patch_backprop.py PATH/TO/backprop.rs
"""
import re
import sys

EXPECTED_REWRITTEN = 65
EXPECTED_KEPT = 5

HELPERS = '''
    /// poodle build patch (tools/cuda/patch_backprop.py): adds `grad` into the gradient of
    /// `tensor`, storing it as the first one where there is none yet. Checks what
    /// `zeros_like(tensor).add(grad)` checked and stores what it made: a contiguous tensor of
    /// the same shape, dtype and device.
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get_mut();
                *sum = sum.add(grad)?;
            }
            Entry::Vacant(entry) => {
                entry.insert(Self::first_grad(tensor, grad)?);
            }
        }
        Ok(())
    }

    /// [`Self::accumulate`] of `-grad`.
    fn accumulate_neg(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get_mut();
                *sum = sum.sub(grad)?;
            }
            Entry::Vacant(entry) => {
                entry.insert(Self::first_grad(tensor, &grad.neg()?)?);
            }
        }
        Ok(())
    }

    fn first_grad(tensor: &Tensor, grad: &Tensor) -> Result<Tensor> {
        if grad.shape() != tensor.shape() {
            return Err(Error::ShapeMismatchBinaryOp {
                lhs: tensor.shape().clone(),
                rhs: grad.shape().clone(),
                op: "add",
            }
            .bt());
        }
        if grad.dtype() != tensor.dtype() {
            return Err(Error::DTypeMismatchBinaryOp {
                lhs: tensor.dtype(),
                rhs: grad.dtype(),
                op: "add",
            }
            .bt());
        }
        if !grad.device().same_device(tensor.device()) {
            return Err(Error::DeviceMismatchBinaryOp {
                lhs: tensor.device().location(),
                rhs: grad.device().location(),
                op: "add",
            }
            .bt());
        }
        grad.contiguous()
    }
'''

# `let S = grads.or_insert(T)?;`, then lines that never name S, then `*S = S.add(&E)?` (or
# `.sub`), where E may name S only as `S.dims()`.
RULE = re.compile(
    r"^[ \t]*let (?P<s>\w+) = grads\.or_insert\((?P<t>\w+)\)\?;\n"
    r"(?P<mid>(?:(?![^\n]*\b(?P=s)\b)[^\n]*\n)*?)"
    r"(?P<ind>[ \t]*)\*(?P=s) = (?P=s)\.(?P<op>add|sub)\(&(?P<e>[^\n]*)\)\?(?P<semi>;?)\n",
    re.M,
)
OR_INSERT = re.compile(r"grads\.or_insert\(")


def rewrite(m: re.Match) -> str:
    s, t, e = m["s"], m["t"], m["e"]
    e = re.sub(rf"\b{s}\.dims\(\)", f"{t}.dims()", e)
    if re.search(rf"\b{s}\b", e):
        sys.exit(f"patch_backprop: the gradient expression still names {s}: {m.group(0)}")
    helper = "accumulate" if m["op"] == "add" else "accumulate_neg"
    return f"{m['mid']}{m['ind']}grads.{helper}({t}, &{e})?{m['semi']}\n"


def main() -> None:
    path = sys.argv[1]
    text = open(path).read()
    if "fn accumulate(" in text:
        sys.exit(f"patch_backprop: {path} is already patched")
    before = len(OR_INSERT.findall(text))
    text, rewritten = RULE.subn(rewrite, text)
    kept = len(OR_INSERT.findall(text))
    if (rewritten, kept) != (EXPECTED_REWRITTEN, EXPECTED_KEPT) or before != rewritten + kept:
        sys.exit(
            f"patch_backprop: rewrote {rewritten} rules and kept {kept} of {before} or_insert "
            f"calls; expected {EXPECTED_REWRITTEN} and {EXPECTED_KEPT} (candle-core 0.11.1)"
        )
    anchor = "    /// Get the gradient tensor corresponding to the given tensor id\n"
    if text.count(anchor) != 1:
        sys.exit("patch_backprop: GradStore::get_id not found")
    text = text.replace(anchor, HELPERS.lstrip("\n") + "\n" + anchor)
    open(path, "w").write(text)
    print(f"patch_backprop: {rewritten} gradient rules accumulate, {kept} keep or_insert", file=sys.stderr)


if __name__ == "__main__":
    main()
