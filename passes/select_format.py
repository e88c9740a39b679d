"""select-format: choose the storage encoding of every rank-2 constant, recorded in its type.

Candidates for a constant are the encodings that can store it, in this order: dense, COO,
CSR, CSC, bitmap, BSR over its blocks (the type's `~blocks`, else `block`, else the target
tile), HP (the type's `~hp` parameters, else over those blocks with the largest non-zero
count of any block row), N:M (the type's `~nm` only) and packed1b (b1 only), limited to the
encodings the target executes (`ctx.formats`). Each is costed without being built
(`Encoding.footprint`):

    cost = size_bits / 8 + ctx.work_cost * work

memory bytes, plus, for accelerator targets, the decode work the hardware pays (one MAC per
stored slot and the index bits it resolves to find the operand; `work_cost` is 0 for CPU
and GPU targets). The cheapest wins; ties go to the earlier candidate, so dense when nothing
is saved. Other constants stay dense.

`format` forces an encoding: `csr` for every rank-2 constant, or `PATTERN:FORMAT;...` per
constant-name pattern (regex search, first match wins; unmatched constants are costed).
Parameters of a forced bsr/hp/nm come as above.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tcc.ir.analysis import nonzeros
from tcc.ir.dtypes import DType
from tcc.ir.encoding import BSR, DENSE, ENCODINGS, HP, NM, Encoding
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.sparsity import NM as NMSparsity
from tcc.ir.sparsity import Blocks, Hierarchical, block_view
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .options import Shape2


def parse_forced(text: str) -> list[tuple[re.Pattern | None, str]]:
    """`csr` or `PATTERN:FORMAT;...` as (pattern or None for all, encoding keyword) pairs;
    ValueError naming the bad part."""
    rules = []
    for part in text.split(";"):
        pattern, colon, keyword = part.rpartition(":")
        keyword = keyword.strip()
        if keyword not in ENCODINGS:
            raise ValueError(f"names unknown format '{keyword}' (known: {', '.join(ENCODINGS)})")
        if not colon:
            if len(text.split(";")) > 1:
                raise ValueError(f"mixes a global format '{keyword}' with per-pattern ones (write PATTERN:FORMAT)")
            rules.append((None, keyword))
            continue
        try:
            rules.append((re.compile(pattern), keyword))
        except re.error as e:
            raise ValueError(f"has a bad pattern '{pattern}': {e}") from None
    return rules


@dataclass(frozen=True)
class SelectFormat(Pass):
    name = "select-format"
    summary = "choose each weight's storage encoding by the target's cost (bytes, decode work)"

    format: str | None = option(None, "force: FORMAT for all, or PATTERN:FORMAT;... per constant name")
    block: Shape2 | None = option(None, "block shape of bsr/hp candidates without a sparsity structure (default: tile)")

    def validate(self) -> None:
        if self.format is not None:
            try:
                parse_forced(self.format)
            except ValueError as e:
                raise self.fail("format", str(e)) from None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = parse_forced(self.format) if self.format else []
        block = tuple(self.block) if self.block else tuple(ctx.tile)
        constants, chosen, bytes_before, bytes_after = [], Counter(), 0, 0
        for name, t in graph.constants:
            if t.rank == 2:
                array = graph.weights[name]
                forced = next((kw for pattern, kw in rules if pattern is None or pattern.search(name)), None)
                encoding = (self._forced(name, t, array, forced, block) if forced
                            else self._cheapest(t, array, block, ctx))
                bytes_before += -(-t.encoding.footprint(array, t.dtype)[0] // 8)
                bytes_after += -(-encoding.footprint(array, t.dtype)[0] // 8)
                chosen[encoding.keyword] += 1
                t = TensorType(t.shape, t.dtype, encoding, t.quant, t.sparsity)
            constants.append((name, t))
        constants = tuple(constants)
        if chosen:
            ctx.note(", ".join(f"{n} {kw}" for kw, n in chosen.most_common()) + f"; {bytes_before} -> {bytes_after} "
                     "bytes of rank-2 weights")
        if constants == graph.constants:
            return PassResult(graph, False)
        return PassResult(graph.replace(constants=constants), True)

    def _forced(self, name: str, t: TensorType, array: np.ndarray, keyword: str, block) -> Encoding:
        encoding = _make(keyword, t, array, block)
        problem = "it names no N:M structure (~nm)" if encoding is None else encoding.violation(array, t.dtype)
        if problem:
            raise TccError(f"select-format: constant '{name}' ({t}) cannot be stored as #{keyword}: {problem}")
        return encoding

    def _cheapest(self, t: TensorType, array: np.ndarray, block, ctx: PassContext) -> Encoding:
        nnz = nonzeros(array)
        if t.dtype is not DType.B1 and nnz == array.size:
            return DENSE  # nothing to skip: every other candidate stores more and works more
        best, best_cost = DENSE, None
        for keyword in _CANDIDATES:
            if ctx.formats is not None and keyword not in ctx.formats:
                continue
            # an untyped hp's row_nnz needs a scan: row_nnz=1 bounds every row_nnz from below
            scan = keyword == "hp" and not isinstance(t.sparsity, Hierarchical)
            encoding = HP(*_hp_blocks(t, block), 1) if scan else _make(keyword, t, array, block)
            if encoding is None or (best_cost is not None and best_cost <= _cost(
                    *encoding.min_footprint(t.shape, t.dtype, nnz), ctx)):
                continue
            if scan:
                encoding = _make(keyword, t, array, block)
            if encoding.violation(array, t.dtype):
                continue
            cost = _cost(*encoding.footprint(array, t.dtype), ctx)
            if best_cost is None or cost < best_cost:
                best, best_cost = encoding, cost
        return best


def _cost(bits: int, work: int, ctx: PassContext) -> float:
    return bits / 8 + ctx.work_cost * work


_CANDIDATES = ("dense", "coo", "csr", "csc", "bitmap", "bsr", "hp", "nm", "packed1b")


def _hp_blocks(t: TensorType, block: tuple[int, int]) -> tuple[int, int]:
    """The blocks of an hp candidate for a type without `~hp`: its `~blocks`, else `block`."""
    return (t.sparsity.bh, t.sparsity.bw) if isinstance(t.sparsity, Blocks) else block


def _make(keyword: str, t: TensorType, array: np.ndarray, block: tuple[int, int]) -> Encoding | None:
    """The candidate encoding `keyword` for a constant of type `t` (None: no parameters for it)."""
    sparsity = t.sparsity
    if keyword == "bsr":
        return BSR(sparsity.bh, sparsity.bw) if isinstance(sparsity, (Blocks, Hierarchical)) else BSR(*block)
    if keyword == "hp":
        if isinstance(sparsity, Hierarchical):
            return HP(sparsity.bh, sparsity.bw, sparsity.row_nnz)
        bh, bw = _hp_blocks(t, block)
        row_nnz = int(np.count_nonzero(block_view(array, bh, bw), axis=3).max(initial=0))
        return HP(bh, bw, max(1, row_nnz))
    if keyword == "nm":
        return NM(sparsity.n, sparsity.m) if isinstance(sparsity, NMSparsity) else None
    return ENCODINGS[keyword]()  # the parameterless ones
