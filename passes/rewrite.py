"""`Rewriter`: rebuild a graph op by op — keep, drop, replace or insert ops and add typed
constants — with result types inferred from the op table. Passes that restructure a graph
use it instead of editing op tuples by hand.

    rw = Rewriter(graph)
    for op in graph.ops:
        if wanted(op):
            rw.alias(op.result, rw.op("relu", rw.value(op.operands[0]), name=op.result))
        else:
            rw.keep(op)
    new_graph = rw.finish()
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op, freeze_weights
from tcc.ir.ops import OPS
from tcc.ir.types import TensorType


class Rewriter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.types: dict[str, TensorType] = dict(graph.types)
        self._taken: set[str] = set(self.types)
        self._defined: set[str] = set(graph.input_names) | set(graph.constant_names)
        self._constants: list[tuple[str, TensorType]] = list(graph.constants)
        self._weights: dict[str, np.ndarray] = dict(graph.weights)
        self._ops: list[Op] = []
        self._producer: dict[str, Op] = {}
        self._alias: dict[str, str] = {}

    def producer(self, name: str) -> Op | None:
        """The op defining `name` in the graph being built (None for inputs and constants)."""
        return self._producer.get(name)

    def weight(self, name: str) -> np.ndarray:
        """The value of constant `name` (old or new)."""
        return self._weights[name]

    def is_constant(self, name: str) -> bool:
        return name in self._weights

    def value(self, name: str) -> str:
        """The name `name` has in the graph being built (after `alias`)."""
        while name in self._alias:
            name = self._alias[name]
        return name

    def alias(self, old: str, new: str) -> None:
        """Later uses of `old` (operands and outputs) refer to `new`."""
        if old != new:
            self._alias[old] = new

    def fresh(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.]", "_", hint) or "v"
        name, counter = base, 0
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name

    def constant(self, hint: str, array: np.ndarray, type_: TensorType | None = None) -> str:
        """Add a constant; its type is `type_` (checked to match the array) or inferred."""
        array = np.asarray(array)
        if type_ is None:
            type_ = TensorType(tuple(int(d) for d in array.shape), DType.from_numpy(array.dtype))
        name = self.fresh(hint)
        self._constants.append((name, type_))
        self._weights.update(freeze_weights({name: array.astype(type_.dtype.numpy, copy=False)}))
        self._defined.add(name)
        self.types[name] = type_
        return name

    def set_constant(self, name: str, array: np.ndarray, type_: TensorType) -> None:
        """Give an existing constant a new value and type."""
        self._constants = [(n, type_ if n == name else t) for n, t in self._constants]
        self._weights.update(freeze_weights({name: np.asarray(array).astype(type_.dtype.numpy, copy=False)}))
        self.types[name] = type_

    def make(self, like: Op, kind: str, *operands: str, **attrs: Any) -> Op:
        """`kind(operands){attrs}` under `like`'s result name and type, not yet emitted (a
        rewrite that keeps the value; `keep` emits it)."""
        opdef = OPS[kind]
        normalized = opdef.normalize_attrs(attrs)
        inferred = opdef.infer([self.types[self.value(o)] for o in operands], dict(normalized))
        if (inferred.shape, inferred.dtype) != (like.type.shape, like.type.dtype):
            raise ValueError(f"rewrite of %{like.result} to {kind} changes its type to {inferred}")
        return Op(kind, like.result, tuple(operands), normalized, like.type)

    def op(self, kind: str, *operands: str, name: str | None = None, encoding=None, quant=None, **attrs: Any) -> str:
        """Append `kind(operands){attrs}`; returns its result name (`name` if free, else fresh).
        `quant`/`encoding` override those of the inferred result type."""
        operands = tuple(self.value(o) for o in operands)
        opdef = OPS[kind]
        normalized = opdef.normalize_attrs(attrs)
        type_ = opdef.infer([self.types[o] for o in operands], dict(normalized))
        if quant is not None or encoding is not None:
            type_ = dataclasses.replace(type_, **{k: v for k, v in (("quant", quant), ("encoding", encoding))
                                                   if v is not None})
        result = name if name is not None and name not in self._defined else self.fresh(name or kind)
        self._taken.add(result)
        self._defined.add(result)
        self.types[result] = type_
        self._emit(Op(kind, result, operands, normalized, type_))
        return result

    def _emit(self, op: Op) -> None:
        self._ops.append(op)
        self._producer[op.result] = op

    def keep(self, op: Op) -> str:
        """Re-emit `op` unchanged but for renamed operands."""
        operands = tuple(self.value(o) for o in op.operands)
        self._defined.add(op.result)
        self._emit(op if operands == op.operands else dataclasses.replace(op, operands=operands))
        return op.result

    def finish(self, *, drop_unused_constants: bool = True) -> Graph:
        """The new graph; constants nothing uses any more are dropped unless told otherwise."""
        outputs = tuple(self.value(o) for o in self.graph.outputs)
        used = {o for op in self._ops for o in op.operands} | set(outputs)
        constants = tuple((n, t) for n, t in self._constants if n in used or not drop_unused_constants)
        return self.graph.replace(ops=tuple(self._ops), constants=constants, outputs=outputs,
                                  weights={n: self._weights[n] for n, _ in constants})
