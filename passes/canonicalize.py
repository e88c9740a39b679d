"""canonicalize: local rewrites to one canonical form, applied to a fixed point in one run.

- `add(linear(x, w), b)` (either operand order), the linear's only use, with a constant bias of
  shape [out] or [1,...,1,out] and the same dtype -> `linear(x, w, b)` under the add's name;
- `matmul(x, c)` with c a rank-2 constant -> `linear(x, c.T)` (a new constant);
  `matmul(x, transpose(w))` with w a rank-2 constant -> `linear(x, w)`; x of rank >= 2, float;
- identity ops are dropped and their uses (graph outputs included) read the operand: reshape,
  expand, squeeze, slice and cast whose result type equals the operand's, transpose of a dim with
  itself, identity permute;
- `reshape(reshape(x))` -> `reshape(x)`; a transpose/permute of a transpose/permute -> one
  permute (then dropped if it is the identity);
- `add(add(x, c1), c2)` with constants c1, c2 (the inner add's only use) -> `add(x, c1 + c2)`;
- a one-operand elementwise op (relu, gelu, tanh, ...) of a move that keeps every element
  (reshape, transpose, permute, squeeze, unsqueeze, expand), the move's only use -> the move of
  the elementwise op of its source (conv-as-gemm's `permute` before a conv's relu: the relu
  then follows the linear, where the linear's epilogue runs it);
- `index(x, *constant indices)` that reads every element of x once, in order -> `reshape(x)`;
  a chain of reshapes, transposes, permutes, squeezes and unsqueezes that keeps every element
  in order -> one `reshape`;
- `batch_norm(conv(x, w, b))` (conv1d or conv2d, or a linear of a rank-2 input: its channels
  on dim 1), the producer's only use, every operand a constant -> the producer with its
  weight and bias scaled by `weight / sqrt(var + eps)` (new constants `w.bn`, `b.bn`), under
  the batch norm's name;
- `scaled_dot_product_attention` with a constant mask (bool, or 0 / -inf) that keeps every
  key for every query (all True, all 0; a mask that would broadcast the scores wider stays) ->
  the mask dropped; one that is the same `[L, S]` causal pattern for every batch and head ->
  `is_causal` (with `window`, when it is a sliding window: query i sees keys i - window < j <=
  i), the mask dropped; a bool mask `logical_and(c, m)` with c a constant that keeps everything
  -> m (broadcast as it is: a padding mask over the keys stays one row).

Rewritten ops keep their result name and type (so quantization and encoding annotations stay).
Ops and constants left unused (the inner op of a collapsed chain, the linear of a folded bias)
stay for dce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op
from tcc.ir.ops import OPS, WHOLE_MOVES
from tcc.ir.reference import REFERENCE, causal_mask
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult
from .rewrite import Rewriter

_SAME_TYPE_IDENTITY = ("reshape", "expand", "squeeze", "slice", "cast")
_LAYOUT = ("transpose", "permute")
_ORDER_MOVES = ("reshape", "transpose", "permute", "squeeze", "unsqueeze")  # moves that keep every element


def _perm(op: Op) -> tuple[int, ...]:
    """A transpose or permute as the permutation p: result dim i is operand dim p[i]."""
    rank = op.type.rank
    if op.kind == "permute":
        return tuple(d % rank for d in op.attr("dims"))
    p = list(range(rank))
    a, b = op.attr("dim0") % rank, op.attr("dim1") % rank
    p[a], p[b] = b, a
    return tuple(p)


def _positions(t: TensorType) -> np.ndarray:
    """Each element's position in a tensor of type `t`, laid out as the tensor."""
    return np.arange(int(np.prod(t.shape, dtype=np.int64))).reshape(t.shape)


def _in_order(read: np.ndarray, size: int) -> bool:
    """Whether positions (`_positions` of a tensor of `size` elements, moved or indexed) read
    every element once, in order."""
    return read.size == size and bool((np.ravel(read) == np.arange(size)).all())


def _plain(t: TensorType) -> bool:
    """Dense and unquantized: a weight that may be reshaped or transposed as a plain array."""
    return t == TensorType(t.shape, t.dtype)


class _Sweep:
    """One pass over the ops in order; `derived` maps (constant, transform) to the constant
    made from it, shared by the sweeps of a run so that no copy is made twice."""

    def __init__(self, graph: Graph, derived: dict[tuple[str, str], str]):
        self.graph, self.derived = graph, derived
        self.rw = Rewriter(graph)
        self.users = graph.users()
        self.changed = False

    def run(self) -> Graph:
        rw = self.rw
        for op in self.graph.ops:
            current: Op | None = Op(op.kind, op.result, tuple(rw.value(o) for o in op.operands), op.attrs, op.type)
            while current is not None and (new := self.rewrite(current)) is not None:
                self.changed = True
                if isinstance(new, str):
                    rw.alias(current.result, new)
                    current = None
                else:
                    current = new
            if current is not None:
                rw.keep(current)
        return rw.finish(drop_unused_constants=False)

    # -- helpers ----------------------------------------------------------------------------
    def derive(self, source: str, how: str, array: np.ndarray, dtype: DType) -> str:
        """A new constant `array` computed from constant `source` (named `source.how`)."""
        key = (source, how)
        if key not in self.derived:
            self.derived[key] = self.rw.constant(f"{source}.{how}", np.ascontiguousarray(array),
                                                 TensorType(tuple(array.shape), dtype))
        return self.derived[key]

    def only_read_by(self, value: str, reader: str) -> bool:
        """Whether op `reader` is the only use of `value` (a graph output has another)."""
        return value not in self.graph.outputs and [u.result for u in self.users.get(value, [])] == [reader]

    # -- rewrites ---------------------------------------------------------------------------
    def rewrite(self, op: Op) -> Op | str | None:
        """A replacement op, the name of a value replacing `op`'s result, or None."""
        if op.kind in _SAME_TYPE_IDENTITY and self.rw.types[op.operands[0]] == op.type:
            return op.operands[0]
        if op.kind in _LAYOUT and (new := self.layout(op)) is not None:
            return new
        if op.kind == "reshape":
            inner = self.rw.producer(op.operands[0])
            if inner is not None and inner.kind == "reshape":
                return self.rw.make(op, "reshape", inner.operands[0], shape=op.attr("shape"))
        if op.kind in _ORDER_MOVES:
            return self.moves_as_reshape(op)
        if op.kind == "matmul":
            return self.matmul(op)
        if op.kind == "add":
            return self.fold_bias(op) or self.fold_constant_adds(op)
        if op.kind == "index":
            return self.index_as_reshape(op)
        if OPS[op.kind].elementwise and len(op.operands) == 1:
            return self.elementwise_before_move(op)
        if op.kind == "batch_norm":
            return self.fold_batch_norm(op)
        if op.kind == "scaled_dot_product_attention" and len(op.operands) == 4:
            return self.constant_mask(op) or self.kept_mask(op)
        return None

    def layout(self, op: Op) -> Op | str | None:
        x, perm = op.operands[0], _perm(op)
        if perm == tuple(range(len(perm))) and self.rw.types[x] == op.type:
            return x
        inner = self.rw.producer(x)
        if inner is None or inner.kind not in _LAYOUT:
            return None
        p = _perm(inner)
        return self.rw.make(op, "permute", inner.operands[0], dims=tuple(p[i] for i in perm))

    def matmul(self, op: Op) -> Op | None:
        x, rhs = op.operands
        tx, tr = self.rw.types[x], self.rw.types[rhs]
        if tx.rank < 2 or not tx.dtype.is_float or tr.rank != 2 or tr.dtype != tx.dtype:
            return None
        src = self.rw.producer(rhs)
        if src is not None and src.kind in _LAYOUT and self.rw.is_constant(src.operands[0]) and _perm(src) == (1, 0):
            return self.rw.make(op, "linear", x, src.operands[0])
        if self.rw.is_constant(rhs) and _plain(tr):
            weight = self.derive(rhs, "t", self.rw.weight(rhs).T, tr.dtype)
            return self.rw.make(op, "linear", x, weight)
        return None

    def fold_bias(self, op: Op) -> Op | None:
        for y, b in (op.operands, op.operands[::-1]):
            linear = self.rw.producer(y)
            if (linear is None or linear.kind != "linear" or len(linear.operands) != 2 or not self.rw.is_constant(b)
                    or not self.only_read_by(y, op.result)):
                continue
            tb, ty = self.rw.types[b], linear.type
            out = ty.shape[-1]
            if tb.dtype != ty.dtype or not 1 <= tb.rank <= ty.rank or tb.shape != (1,) * (tb.rank - 1) + (out,):
                continue
            if tb.rank > 1:
                if not _plain(tb):
                    continue
                b = self.derive(b, "bias", self.rw.weight(b).reshape(out), tb.dtype)
            return self.rw.make(op, "linear", *linear.operands, b)
        return None

    def fold_constant_adds(self, op: Op) -> Op | None:
        """`add(add(x, c1), c2)` (either order in both), the inner add's only use, c1 and c2
        plain float constants of x's dtype -> `add(x, c1 + c2)` (broadcasting alike: one pass
        over x; BERT's position and token-type embeddings)."""
        for inner_value, c2 in (op.operands, op.operands[::-1]):
            inner = self.rw.producer(inner_value)
            if (inner is None or inner.kind != "add" or not self.rw.is_constant(c2)
                    or not self.only_read_by(inner_value, op.result)):
                continue
            for x, c1 in (inner.operands, inner.operands[::-1]):
                t1, t2, tx = self.rw.types[c1], self.rw.types[c2], self.rw.types[x]
                if (self.rw.is_constant(x) or not self.rw.is_constant(c1) or not tx.dtype.is_float
                        or not all(_plain(t) and t.dtype == tx.dtype for t in (t1, t2))):
                    continue
                total = self.rw.weight(c1) + self.rw.weight(c2)
                return self.rw.make(op, "add", x, self.derive(c1, f"plus.{c2}", total.astype(tx.dtype.numpy),
                                                              tx.dtype))
        return None

    def moves_as_reshape(self, op: Op) -> Op | None:
        """A chain of reshapes, transposes, permutes, squeezes and unsqueezes that keeps every
        element in order (a conv-as-gemm patch embedding's `permute`, `flatten`, `transpose`) ->
        one `reshape` of the chain's source."""
        chain, x = [op], op.operands[0]
        while (inner := self.rw.producer(x)) is not None and inner.kind in _ORDER_MOVES:
            chain.append(inner)
            x = inner.operands[0]
        if len(chain) < 2:
            return None
        order = positions = _positions(self.rw.types[x])
        for move in reversed(chain):
            order = REFERENCE[move.kind](order, **move.attr_dict)
        return self.rw.make(op, "reshape", x, shape=op.type.shape) if _in_order(order, positions.size) else None

    def elementwise_before_move(self, op: Op) -> Op | None:
        """`f(m1(...mk(x)))`, each move the only use of the one below -> `m1(...mk(f(x)))` (the
        outermost move under f's name and type)."""
        chain, source, reader = [], op.operands[0], op.result
        while (move := self.rw.producer(source)) is not None and move.kind in WHOLE_MOVES \
                and self.only_read_by(source, reader):
            chain.append(move)
            source, reader = move.operands[0], move.result
        if not chain:
            return None
        value = self.rw.op(op.kind, source, name=f"{op.result}.pre", quant=op.type.quant, **op.attr_dict)
        for move in reversed(chain[1:]):
            value = self.rw.op(move.kind, value, name=f"{op.result}.pre", **move.attr_dict)
        return self.rw.make(op, chain[0].kind, value, **chain[0].attr_dict)

    def index_as_reshape(self, op: Op) -> Op | None:
        """`index(x, *indices)` with constant indices that read every element of x once, in
        order (x[arange(b)[:, None, None, None], arange(n)[None, None, None, :]], a padding
        mask's unsqueezes as torch.export writes them) -> `reshape(x)`."""
        x, indices = op.operands[0], op.operands[1:]
        if not all(self.rw.is_constant(i) for i in indices):
            return None
        positions = _positions(self.rw.types[x])
        try:
            read = positions[tuple(self.rw.weight(i) for i in indices)]
        except IndexError:
            return None
        return self.rw.make(op, "reshape", x, shape=op.type.shape) if _in_order(read, positions.size) else None

    def fold_batch_norm(self, op: Op) -> Op | None:
        y, *stats = op.operands
        producer = self.rw.producer(y)
        if (producer is None or producer.kind not in ("conv1d", "conv2d", "linear")
                or not self.only_read_by(y, op.result)
                or (producer.kind == "linear" and producer.type.rank != 2)):
            return None
        weight, *bias = producer.operands[1:]
        if not all(self.rw.is_constant(v) and _plain(self.rw.types[v]) for v in [weight, *bias, *stats]):
            return None
        dtype = self.rw.types[weight].dtype
        mean, var, gamma, beta = self._stats(stats)
        scale = gamma / np.sqrt(var + op.attr("eps"))
        w = self.rw.weight(weight).astype(np.float64)
        b = self.rw.weight(bias[0]).astype(np.float64) if bias else np.zeros(w.shape[0])
        new_w = self.derive(weight, "bn", (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(dtype.numpy), dtype)
        new_b = self.derive(bias[0] if bias else weight, "bn" if bias else "bn_bias",
                            ((b - mean) * scale + beta).astype(dtype.numpy), dtype)
        return self.rw.make(op, producer.kind, producer.operands[0], new_w, new_b, **dict(producer.attrs))

    def constant_mask(self, op: Op) -> Op | None:
        mask = op.operands[3]
        t = self.rw.types[mask]
        if not self.rw.is_constant(mask) or not _plain(t) or t.rank < 2:
            return None
        array = self.rw.weight(mask)
        if t.dtype is not DType.BOOL and not ((array == 0) | (array == -np.inf)).all():
            return None  # a float mask adding other values than 0 and -inf
        keep = array if t.dtype is DType.BOOL else array == 0
        scores = self._scores(op)
        if keep.all() and t.rank <= len(scores) and all(m in (1, s) for m, s in zip(t.shape[::-1], scores[::-1])):
            return self.rw.make(op, "scaled_dot_product_attention", *op.operands[:3], scale=op.attr("scale"))
        if not (keep == keep.reshape(-1, *keep.shape[-2:])[0]).all():
            return None  # one that differs across batch or heads (padding)
        pattern = keep.reshape(-1, *keep.shape[-2:])[0]
        queries, keys = self.rw.types[op.operands[0]].shape[-2], self.rw.types[op.operands[1]].shape[-2]
        if pattern.shape != (queries, keys):
            return None
        window = int(pattern[-1].sum())
        window = None if window >= min(queries, keys) else window
        if not (pattern == causal_mask(queries, keys, window)).all():
            return None
        return self.rw.make(op, "scaled_dot_product_attention", *op.operands[:3], is_causal=True,
                            scale=op.attr("scale"), window=window)

    def kept_mask(self, op: Op) -> Op | None:
        """A bool mask `logical_and(c, m)` with c a constant that keeps everything: the attention
        reads m, broadcast as it is (a padding mask over the keys stays one row)."""
        producer = self.rw.producer(op.operands[3])
        if producer is None or producer.kind != "logical_and":
            return None
        scores = self._scores(op)
        for c, m in (producer.operands, producer.operands[::-1]):
            t = self.rw.types[m]
            if self.rw.is_constant(c) and _plain(self.rw.types[c]) and self.rw.weight(c).all() and \
                    t.dtype is DType.BOOL and len(t.shape) <= len(scores) and \
                    np.broadcast_shapes(t.shape, scores) == scores:
                return self.rw.make(op, "scaled_dot_product_attention", *op.operands[:3], m, scale=op.attr("scale"))
        return None

    def _scores(self, op: Op) -> tuple[int, ...]:
        """The shape of an attention's scores, `[..., L, S]`: what its mask broadcasts to."""
        q, k = (self.rw.types[v].shape for v in op.operands[:2])
        return q[:-1] + k[-2:-1]

    def _stats(self, stats: list[str]) -> tuple[np.ndarray, ...]:
        """(mean, var, weight, bias) of a batch norm in float64 (weight 1 and bias 0 when absent)."""
        mean, var = (self.rw.weight(v).astype(np.float64) for v in stats[:2])
        gamma = self.rw.weight(stats[2]).astype(np.float64) if len(stats) > 2 else np.ones_like(mean)
        beta = self.rw.weight(stats[3]).astype(np.float64) if len(stats) > 3 else np.zeros_like(mean)
        return mean, var, gamma, beta


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"
    summary = ("fold biases, batch norms and constant matmuls into linear and conv, drop identity ops, collapse "
               "layout chains")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        derived: dict[tuple[str, str], str] = {}
        changed = False
        while True:
            sweep = _Sweep(graph, derived)
            result = sweep.run()
            if not sweep.changed:
                return PassResult(graph, changed)
            graph, changed = result, True
