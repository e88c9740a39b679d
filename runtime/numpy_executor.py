"""The numpy executor: runs a graph with the reference semantics of `tcc.ir.reference`."""

from __future__ import annotations

import numpy as np

from tcc.ir.analysis import last_uses
from tcc.ir.graph import Graph
from tcc.ir.reference import REFERENCE


class NumpyExecutor:
    """The semantic spec as an executor: `NumpyExecutor(graph)(*arrays) -> list of arrays`."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._frees = last_uses(graph)

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        env: dict[str, np.ndarray] = dict(self.graph.weights)
        for (name, t), value in zip(self.graph.inputs, inputs, strict=True):
            env[name] = np.asarray(value, dtype=t.dtype.numpy)
        for index, op in enumerate(self.graph.ops):
            result = REFERENCE[op.kind](*(env[o] for o in op.operands), **op.attr_dict)
            env[op.result] = np.asarray(result).astype(op.type.dtype.numpy, copy=False)
            for name in self._frees.get(index, ()):
                del env[name]
        return [env[name] for name in self.graph.outputs]
