"""pool-late: a linear that reads pooled rows (a mean over tokens, the [CLS] row picked by a
select, a slice of rows) runs on every row, and the pooling after it:

    %p = mean(%x) {dims = [1]}          %y.rows = linear(%x, @w, @b)
    %y = linear(%p, @w, @b)       ->    %y = mean(%y.rows) {dims = [1]}

Exact in real arithmetic: a linear map commutes with averaging rows and with picking them.
It costs the head's work on every row, and buys a matrix engine the head in the same run as
the layers before it: the pooling, a reduction or a pick of rows, moves to the model's edge,
where the host does it as it reads the result back, instead of between two runs on the
accelerator. Only a float linear whose input is its pooling's only use moves (before
quantize, so that calibration sees the head's rows); a pooling over the feature (last) dim,
or over every dim, stays, and so does a pick of rows of one leading index (a batch of one:
the rows lie evenly spaced, where the accelerator's load reads them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tcc.ir.graph import Graph, Op

from .base import Pass, PassContext, PassResult
from .rewrite import Rewriter

POOLS = frozenset({"mean", "select", "slice"})


def _moves(op: Op, shape: tuple[int, ...]) -> bool:
    """Whether pooling `op` of an input of `shape` leaves the last (feature) dim whole, and is
    a mean or picks rows of several leading indices (rows of one lie evenly spaced: a matrix
    engine's load reads them where they are)."""
    rank = len(shape)
    if op.kind == "mean":
        dims = op.attr("dims")
        return bool(dims) and all(d % rank != rank - 1 for d in dims)
    dim = op.attr("dim") % rank
    return dim != rank - 1 and math.prod(shape[:dim]) > 1


def _late(graph: Graph) -> dict[str, Op]:
    """The linears to move before their pooling, by the pooling's result."""
    users, types = graph.users(), graph.types
    found = {}
    for op in graph.ops:
        if op.kind not in POOLS or len(users[op.result]) != 1 or op.result in graph.outputs:
            continue
        (head,) = users[op.result]
        x = types[op.operands[0]]
        if head.kind == "linear" and head.operands[0] == op.result and x.dtype.is_float and _moves(op, x.shape):
            found[op.result] = head
    return found


@dataclass(frozen=True)
class PoolLate(Pass):
    name = "pool-late"
    summary = "a linear after a pooling of rows (mean over tokens, the [CLS] row) on every row, the pooling after it"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        moved = 0
        while late := _late(graph):
            rw = Rewriter(graph)
            pools = {head.result: graph.producer()[pool] for pool, head in late.items()}
            for op in graph.ops:
                if op.result in late:
                    continue  # emitted after its linear
                if op.result not in pools:
                    rw.keep(op)
                    continue
                pool = pools[op.result]
                rows = rw.op("linear", pool.operands[0], *op.operands[1:], name=f"{op.result}.rows")
                rw.alias(op.result, rw.op(pool.kind, rows, name=op.result, **pool.attr_dict))
            graph, moved = rw.finish(), moved + len(late)
        if moved:
            ctx.note(f"{moved} linear{'s' if moved > 1 else ''} moved before {'their' if moved > 1 else 'its'} pooling")
        return PassResult(graph, bool(moved))
