"""canonicalize: local rewrites to one canonical form, applied to a fixed point in one run.

- `add(linear(x, w), b)` (either operand order), the linear's only use, with a constant bias of
  shape [out] or [1,...,1,out] and the same dtype -> `linear(x, w, b)` under the add's name;
- `matmul(x, c)` with c a rank-2 constant -> `linear(x, c.T)` (a new constant);
  `matmul(x, transpose(w))` with w a rank-2 constant -> `linear(x, w)`; x of rank >= 2, float;
- identity ops are dropped and their uses (graph outputs included) read the operand: reshape,
  expand, squeeze, slice and cast whose result type equals the operand's, transpose of a dim with
  itself, identity permute;
- `reshape(reshape(x))` -> `reshape(x)`; a transpose/permute of a transpose/permute -> one
  permute (then dropped if it is the identity).

Rewritten ops keep their result name and type (so quantization and encoding annotations stay).
Ops and constants left unused (the inner op of a collapsed chain, the linear of a folded bias)
stay for dce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op, freeze_weights
from tcc.ir.ops import OPS
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult

_SAME_TYPE_IDENTITY = ("reshape", "expand", "squeeze", "slice", "cast")
_LAYOUT = ("transpose", "permute")


def _perm(op: Op) -> tuple[int, ...]:
    """A transpose or permute as the permutation p: result dim i is operand dim p[i]."""
    rank = op.type.rank
    if op.kind == "permute":
        return tuple(d % rank for d in op.attr("dims"))
    p = list(range(rank))
    a, b = op.attr("dim0") % rank, op.attr("dim1") % rank
    p[a], p[b] = b, a
    return tuple(p)


def _plain(t: TensorType) -> bool:
    """Dense and unquantized: a weight that may be reshaped or transposed as a plain array."""
    return t == TensorType(t.shape, t.dtype)


class _Sweep:
    """One pass over the ops in order; `derived` maps (constant, transform) to the constant
    made from it, shared by the sweeps of a run so that no copy is made twice."""

    def __init__(self, graph: Graph, derived: dict[tuple[str, str], str]):
        self.graph, self.derived = graph, derived
        self.types = graph.types
        self.producer = graph.producer()
        self.users = graph.users()
        self.constants = list(graph.constants)
        self.const_names = set(graph.constant_names)
        self.new_weights: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}  # dropped result -> the value that replaces it
        self.changed = False

    def run(self) -> Graph:
        ops = []
        for op in self.graph.ops:
            current: Op | None = Op(op.kind, op.result, tuple(self.alias.get(o, o) for o in op.operands),
                                    op.attrs, op.type)
            while current is not None and (new := self.rewrite(current)) is not None:
                self.changed = True
                if isinstance(new, str):
                    self.alias[current.result], current = new, None
                else:
                    current = new
            if current is not None:
                ops.append(current)
                self.producer[current.result] = current
        return self.graph.replace(ops=tuple(ops), constants=tuple(self.constants),
                                  weights={**self.graph.weights, **freeze_weights(self.new_weights)},
                                  outputs=tuple(self.alias.get(o, o) for o in self.graph.outputs))

    # -- helpers ----------------------------------------------------------------------------
    def make(self, like: Op, kind: str, operands: list[str], **attrs: Any) -> Op:
        """`kind(operands) {attrs}` under `like`'s result name and type (the rewrite keeps the value)."""
        normalized = OPS[kind].normalize_attrs(attrs)
        t = OPS[kind].infer([self.types[o] for o in operands], dict(normalized))
        assert (t.shape, t.dtype) == (like.type.shape, like.type.dtype), (like, kind, t)
        return Op(kind, like.result, tuple(operands), normalized, like.type)

    def derive(self, source: str, how: str, array: np.ndarray, dtype: DType) -> str:
        """A new constant `array` computed from constant `source` (named `source.how`)."""
        key = (source, how)
        if key not in self.derived:
            name, i = f"{source}.{how}", 0
            while name in self.types:
                i += 1
                name = f"{source}.{how}_{i}"
            t = TensorType(tuple(array.shape), dtype)
            self.constants.append((name, t))
            self.const_names.add(name)
            self.types[name] = t
            self.new_weights[name] = np.ascontiguousarray(array)
            self.derived[key] = name
        return self.derived[key]

    # -- rewrites ---------------------------------------------------------------------------
    def rewrite(self, op: Op) -> Op | str | None:
        """A replacement op, the name of a value replacing `op`'s result, or None."""
        if op.kind in _SAME_TYPE_IDENTITY and self.types[op.operands[0]] == op.type:
            return op.operands[0]
        if op.kind in _LAYOUT:
            return self.layout(op)
        if op.kind == "reshape":
            inner = self.producer.get(op.operands[0])
            if inner is not None and inner.kind == "reshape":
                return self.make(op, "reshape", [inner.operands[0]], shape=op.attr("shape"))
        if op.kind == "matmul":
            return self.matmul(op)
        if op.kind == "add":
            return self.fold_bias(op)
        return None

    def layout(self, op: Op) -> Op | str | None:
        x, perm = op.operands[0], _perm(op)
        if perm == tuple(range(len(perm))) and self.types[x] == op.type:
            return x
        inner = self.producer.get(x)
        if inner is None or inner.kind not in _LAYOUT:
            return None
        p = _perm(inner)
        return self.make(op, "permute", [inner.operands[0]], dims=tuple(p[i] for i in perm))

    def matmul(self, op: Op) -> Op | None:
        x, rhs = op.operands
        tx, tr = self.types[x], self.types[rhs]
        if tx.rank < 2 or not tx.dtype.is_float or tr.rank != 2 or tr.dtype != tx.dtype:
            return None
        src = self.producer.get(rhs)
        if src is not None and src.kind in _LAYOUT and src.operands[0] in self.const_names and _perm(src) == (1, 0):
            return self.make(op, "linear", [x, src.operands[0]])
        if rhs in self.const_names and _plain(tr):
            weight = self.derive(rhs, "t", self.weight(rhs).T, tr.dtype)
            return self.make(op, "linear", [x, weight])
        return None

    def fold_bias(self, op: Op) -> Op | None:
        for y, b in (op.operands, op.operands[::-1]):
            linear = self.producer.get(y)
            if (linear is None or linear.kind != "linear" or len(linear.operands) != 2 or b not in self.const_names
                    or y in self.graph.outputs or [u.result for u in self.users.get(y, [])] != [op.result]):
                continue
            tb, ty = self.types[b], linear.type
            out = ty.shape[-1]
            if tb.dtype != ty.dtype or not 1 <= tb.rank <= ty.rank or tb.shape != (1,) * (tb.rank - 1) + (out,):
                continue
            if tb.rank > 1:
                if not _plain(tb):
                    continue
                b = self.derive(b, "bias", self.weight(b).reshape(out), tb.dtype)
            return self.make(op, "linear", [*linear.operands, b])
        return None

    def weight(self, name: str) -> np.ndarray:
        return self.new_weights[name] if name in self.new_weights else self.graph.weights[name]


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"
    summary = "fold biases and constant matmuls into linear, drop identity ops, collapse layout chains"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        derived: dict[tuple[str, str], str] = {}
        changed = False
        while True:
            sweep = _Sweep(graph, derived)
            result = sweep.run()
            if not sweep.changed:
                return PassResult(graph, changed)
            graph, changed = result, True
