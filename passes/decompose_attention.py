"""decompose-attention: `scaled_dot_product_attention` as matmul, scale, mask, softmax,
matmul, so that passes can quantize the scores and the softmax output on their own (and
hardware without an attention unit can run it). A fully masked query row gives NaN here,
where the fused op gives zeros; encoder padding masks never mask a whole row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph
from tcc.ir.reference import causal_mask

from .base import Pass, PassContext, PassResult
from .rewrite import Rewriter


@dataclass(frozen=True)
class DecomposeAttention(Pass):
    name = "decompose-attention"
    summary = "split scaled_dot_product_attention into matmul, softmax and matmul"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not any(op.kind == "scaled_dot_product_attention" for op in graph.ops):
            return PassResult(graph, False)
        rw = Rewriter(graph)
        for op in graph.ops:
            if op.kind != "scaled_dot_product_attention":
                rw.keep(op)
                continue
            q, k, v = op.operands[:3]
            attrs = op.attr_dict
            qt = rw.types[rw.value(q)]
            dtype = qt.dtype.numpy
            scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(qt.shape[-1])
            scores = rw.op("matmul", q, rw.op("transpose", k, dim0=-2, dim1=-1, name=f"{op.result}.kt"),
                           name=f"{op.result}.scores")
            scores = rw.op("mul", scores, rw.constant(f"{op.result}.scale", np.asarray(scale, dtype=dtype)),
                           name=f"{op.result}.scaled")
            mask = op.operands[3] if len(op.operands) == 4 else None
            if attrs["is_causal"]:
                mask = rw.constant(f"{op.result}.causal", causal_mask(*rw.types[scores].shape[-2:], attrs["window"]))
            if mask is not None and rw.types[rw.value(mask)].dtype is DType.BOOL:
                minus_inf = rw.constant(f"{op.result}.minus_inf", np.asarray(-np.inf, dtype=dtype))
                scores = rw.op("where", mask, scores, minus_inf, name=f"{op.result}.masked")
            elif mask is not None:
                scores = rw.op("add", scores, mask, name=f"{op.result}.masked")
            probs = rw.op("softmax", scores, dim=-1, name=f"{op.result}.probs")
            rw.alias(op.result, rw.op("matmul", probs, v, name=op.result))
        return PassResult(rw.finish(), True)
