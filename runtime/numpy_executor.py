"""The numpy executor: runs a graph with the reference semantics of `tcc.ir.reference`.

Linears whose weight is stored in a non-dense encoding compute on that encoding
(`tcc.runtime.encoded_linear`) unless `encoded=False`, which runs the pure spec."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tcc.ir.analysis import last_uses
from tcc.ir.graph import Graph
from tcc.ir.reference import REFERENCE

from .encoded_linear import NumpyEncodedLinear


class NumpyExecutor:
    """The semantic spec as an executor: `NumpyExecutor(graph)(*arrays) -> list of arrays`."""

    def __init__(self, graph: Graph, encoded: bool = True):
        self.graph = graph
        self._frees = last_uses(graph)
        self._kernels: dict[int, Callable] = {}
        if encoded:
            types, built = graph.types, {}
            for index, op in enumerate(graph.ops):
                w = op.operands[1] if op.kind == "linear" else None
                if w in graph.weights and types[w].encoding.rank2:
                    key = (w, types[op.operands[0]].dtype)
                    if key not in built:
                        built[key] = NumpyEncodedLinear(graph.encoded(w), key[1])
                    self._kernels[index] = _biased(built[key])

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        env: dict[str, np.ndarray] = dict(self.graph.weights)
        for (name, t), value in zip(self.graph.inputs, inputs, strict=True):
            env[name] = np.asarray(value, dtype=t.dtype.numpy, order="C")  # results independent of the caller's layout
        for index, op in enumerate(self.graph.ops):
            kernel = self._kernels.get(index, REFERENCE[op.kind])
            result = kernel(*(env[o] for o in op.operands), **op.attr_dict)
            env[op.result] = np.asarray(result).astype(op.type.dtype.numpy, copy=False)
            for name in self._frees.get(index, ()):
                del env[name]
        return [env[name] for name in self.graph.outputs]


def _biased(kernel: NumpyEncodedLinear) -> Callable:
    """The `linear` op's kernel signature around an encoded weight (the dense operand unused)."""
    def linear(x, w, b=None):
        y = kernel(x)
        return y if b is None else y + b
    return linear
