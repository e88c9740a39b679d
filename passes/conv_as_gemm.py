"""conv-as-gemm: convolutions as `linear` ops, so that a matrix engine (the FPGA targets'
systolic array) runs them and the compression passes see them as layers.

A convolution with a constant float weight `[O, C, *kernel]` and `groups = 1` becomes its
im2col GEMM: the channel dim moves last, each output position's receptive field is gathered
into a row of `C x prod(kernel)` values, one `linear` by the weight reshaped to
`[O, C x prod(kernel)]` (a new constant `weight.gemm`; the bias stays), and the channel dim
moves back:

- pointwise (kernel 1, stride 1, no padding): permute, linear, permute;
- patches (stride = kernel, no padding, no dilation; a ViT's patch embedding, a strided
  front end): reshape into patches, permute, reshape, linear, permute;
- any other 1-d convolution: pad, one strided slice per kernel tap, stacked (the im2col rows),
  linear, permute.

Where it does not pay, the convolution stays (and the log says why): grouped and depthwise
convolutions (no reduction over channels: their GEMM would be mostly zeros) and 2-d
convolutions with overlapping windows (their im2col rows would copy the input kernel-size
times over).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.graph import Graph, Op
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult
from .layers import name_list
from .rewrite import Rewriter


_FORMS = ("pointwise", "patches", "taps")


def _form(op: Op, rw: Rewriter) -> str:
    """How `op` becomes a GEMM (one of `_FORMS`), else why it stays a convolution."""
    weight = rw.types[op.operands[1]]
    if not rw.is_constant(op.operands[1]) or not weight.dtype.is_float or weight != TensorType(weight.shape,
                                                                                                 weight.dtype):
        return "its weight is not a dense float constant"
    if op.attr("groups") != 1:
        return "grouped or depthwise"
    kernel, stride, padding = tuple(weight.shape[2:]), tuple(op.attr("stride")), op.attr("padding")
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding):
        return "pointwise"
    if stride == kernel and not any(padding) and all(d == 1 for d in op.attr("dilation")):
        return "patches"
    return "taps" if op.kind == "conv1d" else "2-d with overlapping windows"


def _rows(rw: Rewriter, op: Op, form: str) -> tuple[str, int]:
    """The im2col rows `[N, *out, C x prod(kernel)]` of `op`'s input in `form`, and the spatial rank."""
    x, weight = op.operands[0], rw.types[op.operands[1]]
    n, c, *size = rw.types[rw.value(x)].shape
    kernel, out = weight.shape[2:], op.type.shape[2:]
    spatial, name = len(kernel), f"{op.result}.im2col"
    if form == "pointwise":
        return rw.op("permute", x, dims=(0, *range(2, 2 + spatial), 1), name=name), spatial
    if form == "patches":
        for d, (o, k, s) in enumerate(zip(out, kernel, size)):
            if o * k != s:  # the tail no window covers
                x = rw.op("slice", x, dim=2 + d, start=0, end=o * k, name=f"{op.result}.covered")
        split = tuple(v for o, k in zip(out, kernel) for v in (o, k))
        x = rw.op("reshape", x, shape=(n, c, *split), name=f"{op.result}.patches")
        dims = (0, *(2 + 2 * d for d in range(spatial)), 1, *(3 + 2 * d for d in range(spatial)))
        x = rw.op("permute", x, dims=dims, name=f"{op.result}.patches")
        return rw.op("reshape", x, shape=(n, *out, c * math.prod(kernel)), name=name), spatial
    stride, padding, dilation = op.attr("stride"), op.attr("padding"), op.attr("dilation")
    (k,), (s,), (p,), (d,), (length,) = kernel, stride, padding, dilation, out
    if p:
        x = rw.op("pad", x, pads=(p, p), value=0.0, name=f"{op.result}.padded")
    taps = [rw.op("unsqueeze", rw.op("slice", x, dim=2, start=j * d, end=j * d + (length - 1) * s + 1, step=s,
                                     name=f"{op.result}.tap{j}"), dim=-1, name=f"{op.result}.tap{j}")
            for j in range(k)]
    x = taps[0] if k == 1 else rw.op("cat", *taps, dim=-1, name=f"{op.result}.taps")  # [N, C, L', k]
    x = rw.op("permute", x, dims=(0, 2, 1, 3), name=f"{op.result}.taps")
    return rw.op("reshape", x, shape=(n, length, c * k), name=name), 1


@dataclass(frozen=True)
class ConvAsGemm(Pass):
    name = "conv-as-gemm"
    summary = "convolutions as linears (im2col) for a matrix engine: pointwise, patches and 1-d; not depthwise"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        convs = [op for op in graph.ops if op.kind in ("conv1d", "conv2d")]
        if not convs:
            return PassResult(graph, False)
        rw = Rewriter(graph)
        done, kept = [], {}
        gemm_weights: dict[str, str] = {}
        for op in graph.ops:
            form = _form(op, rw) if op in convs else None
            if form not in _FORMS:
                if form is not None:
                    kept.setdefault(form, []).append(op.operands[1])
                rw.keep(op)
                continue
            rows, spatial = _rows(rw, op, form)
            weight = op.operands[1]
            if weight not in gemm_weights:
                array = rw.weight(weight)
                gemm_weights[weight] = rw.constant(f"{weight}.gemm", np.ascontiguousarray(
                    array.reshape(array.shape[0], -1)))
            y = rw.op("linear", rows, gemm_weights[weight], *op.operands[2:], name=f"{op.result}.gemm")
            rw.alias(op.result, rw.op("permute", y, dims=(0, 1 + spatial, *range(1, 1 + spatial)), name=op.result))
            done.append(weight)
        ctx.note(f"{len(done)} of {len(convs)} convolutions as linears")
        for why, weights in kept.items():
            ctx.note(f"kept {len(weights)} as convolutions ({why}): {name_list(list(dict.fromkeys(weights)))}")
        return PassResult(rw.finish() if done else graph, bool(done))
