"""fold-constants: evaluate ops whose operands are all constants (with the reference
semantics) and store their results as constants. Tensor sources (`full`, `arange`) stay
inline unless a consumer folds them; dce then drops what is unused."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcc.ir.graph import Graph, freeze_weights
from tcc.ir.reference import REFERENCE
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option

_SOURCES = ("full", "arange")


@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate constant-only subgraphs (e.g. attention-mask construction) at compile time"
    max_elements: int = option(1 << 22, "fold only results with at most this many elements")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        known: dict[str, np.ndarray] = dict(graph.weights)
        constants = list(graph.constants)
        new_weights: dict[str, np.ndarray] = {}
        ops = []
        changed = False
        for op in graph.ops:
            foldable = all(o in known for o in op.operands) and op.type.numel <= self.max_elements
            if op.kind in _SOURCES:
                known[op.result] = np.asarray(REFERENCE[op.kind](**op.attr_dict)).astype(op.type.dtype.numpy)
                ops.append(op)
            elif foldable:
                value = REFERENCE[op.kind](*(known[o] for o in op.operands), **op.attr_dict)
                known[op.result] = np.asarray(value).astype(op.type.dtype.numpy)
                new_weights[op.result] = known[op.result]
                constants.append((op.result, TensorType(op.type.shape, op.type.dtype, quant=op.type.quant)))
                changed = True
            else:
                ops.append(op)
        if not changed:
            return PassResult(graph, False)
        # a folded value may feed an op that is kept: constants must be declared before use,
        # and they are (constants precede all ops in the graph)
        weights = dict(graph.weights)
        weights.update(freeze_weights(new_weights))
        used = {o for op in ops for o in op.operands} | set(graph.outputs)
        constants = [(n, t) for n, t in constants if n in graph.weights or n in used]
        weights = {n: weights[n] for n, _ in constants}
        return PassResult(graph.replace(ops=tuple(ops), constants=tuple(constants), weights=weights), True)
