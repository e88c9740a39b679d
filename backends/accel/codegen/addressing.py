"""Layout ops as addressing: where a layer reads an operand in place, from an earlier section's
output in DRAM, through the reshapes, transposes, permutes and selects between them (the head
split, the head merge, K^T, V's heads, a plain hand-over).

`source` follows a value back through layout ops to a section's output and maps every element
of the value to its element of that output (the ops run on an index array: what the model
computes, however it spells it). `activations` turns that map into tloads, per row block: its
rows evenly spaced rows of one source tensor (`step` apart: a batch's, or a sequence-first
layout's), its words runs of consecutive source channels, alike in all its rows. One run (a
head of a wider projection) loads the tiles that hold it and shifts the operand's first word
into the slot; several runs (the heads of a batch, merged) each start a tile, and land in
order, each on the tail of the one before. A matmul's right operand is activations transposed
(K^T), or, where its column tiles are whole channel blocks of the source, plain loads
(`channel_blocks`: V's heads). The other way round, `merge_heads` has P V write its heads where
the head merge puts them: one 2-D tensor of the batch's rows, each head a run of channel blocks,
which the out-projection reads as plain activations (whatever the rows per head: 17 or 50 rows
split no row block); a sequence-first merge is those rows in another order (`DramTensor.rows`).
A row-wise layer (a linear) whose input is its source's rows reordered reads the source as it
lies and leaves its own rows in that order (`row_order`), so sequence-first attention (torch's
`nn.MultiheadAttention`) chains without a host round trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from tcc.ir.graph import Graph, Op
from tcc.ir.reference import REFERENCE

from ..config import AccelConfig
from ..layout import DramTensor, Layout, inner, word_offset
from .match import Layer

TILED = (Layout.ROWS, Layout.OUTPUTS)  # output layouts a later layer's activations tload from
ADDRESSING = frozenset({"reshape", "transpose", "permute", "squeeze", "unsqueeze", "select", "slice"})
_MAX_CHAIN = 16
Found = tuple[DramTensor, np.ndarray, tuple[Op, ...]]  # `source`'s answer


@dataclass(frozen=True)
class Piece:
    """One tload of a row block's activations: `tiles` tiles of the source's channel blocks
    from `block` on, of its 2-D tensor `batch`, rows `row`, `row + step`, ..., landing from slot
    word `at` on."""

    at: int
    batch: int
    block: int
    tiles: int
    row: int
    step: int


@dataclass(frozen=True)
class InPlace:
    """A layer's activations read in place: the source section output, the layout ops that
    become addressing, per row block of each product of the layer's batch (`index`) its pieces
    (in load order) and the slot word where its activations start (`shifts`), and the slot
    words the pieces fill."""

    source: DramTensor
    ops: tuple[Op, ...]
    pieces: tuple[tuple[Piece, ...], ...]
    shifts: tuple[int, ...]
    words: int
    row_blocks: int

    def index(self, b: int, m: int) -> int:
        """Where row block m of product b is in `pieces` and `shifts`."""
        return b * self.row_blocks + m

    def tiles(self, b: int, m: int) -> tuple[int, ...]:
        """The tiles of the row block's loads: what its timing depends on."""
        return tuple(p.tiles for p in self.pieces[self.index(b, m)])

    def start(self, piece: Piece, config: AccelConfig) -> tuple[int, int, int]:
        """(DRAM word, step, stride) of `piece`'s tload."""
        t, beats = self.source, config.beats(self.source.layout.buffer)
        words = inner(t.layout, t.shape, config) * beats
        if t.layout is Layout.ROWS:  # a tile: word `block` of each row, rows `step` rows apart; then the next word
            offset = word_offset(t.layout, t.shape, piece.row, piece.block, config, piece.batch)
            return t.region.start + offset, words * piece.step, beats
        # a tile: rows of a channel block, `step` apart; then the next block
        offset = word_offset(t.layout, t.shape, piece.block, piece.row, config, piece.batch)
        return t.region.start + offset, beats * piece.step, words


@dataclass(frozen=True)
class Blocks:
    """A matmul's right operand read in place by plain loads: each column tile of product b's
    is a whole channel block of the source (an outputs layout: a block's words are its rows),
    from channel block `firsts[b][1]` and row `firsts[b][2]` of the source's 2-D tensor
    `firsts[b][0]` on (V's head)."""

    source: DramTensor
    ops: tuple[Op, ...]
    firsts: tuple[tuple[int, int, int], ...]  # per product: (2-D tensor, channel block, row)

    def dram(self, b: int, n: int, k_low: int, config: AccelConfig) -> int:
        """The DRAM word of column tile n's words from row `k_low` on, for product b."""
        which, block, row = self.firsts[b]
        return self.source.region.start + word_offset(self.source.layout, self.source.shape, block + n, row + k_low,
                                                      config, which)

    def tiles(self, b: int, m: int) -> None:
        return None  # plain loads: timed as the operand's own layout


@dataclass(frozen=True)
class Reads:
    """What a layer reads in place: its activations (`x`) and a matmul's right operand (`y`)."""

    x: InPlace | None = None
    y: InPlace | Blocks | None = None

    @property
    def ops(self) -> tuple[Op, ...]:
        """The layout ops that became addressing."""
        return tuple(dict.fromkeys(o for p in (self.x, self.y) if p for o in p.ops))

    @property
    def sources(self) -> tuple[DramTensor, ...]:
        """The section outputs read in place."""
        return tuple(p.source for p in (self.x, self.y) if p)

    def tiles(self, b: int, m: int, n: int) -> tuple:
        """The tiles of the tloads of row block m (and column tile n, for the right operand) of
        product b: what their timing depends on."""
        return self.x and self.x.tiles(b, m), self.y and self.y.tiles(b, n)


def source(value: str, producer: Mapping[str, Op], resident: Mapping[str, DramTensor]) -> Found | None:
    """The section output `value` is read from (itself, or through layout ops; `producer`:
    `graph.producer()`), the source element of each of `value`'s elements (flat indices into
    the source as it lies in DRAM, in `value`'s shape), and the layout ops in graph order; None
    when there is none."""
    chain = []
    while value not in resident:
        op = producer.get(value)
        if op is None or op.kind not in ADDRESSING or len(chain) == _MAX_CHAIN:
            return None
        chain.append(op)
        value = op.operands[0]
    shape = producer[value].type.shape  # a section output: an op's result
    rows, width = resident[value].rows, shape[-1]
    index = (np.asarray(rows)[:, None] * width + np.arange(width) if rows else np.arange(math.prod(shape))).reshape(shape)
    for op in reversed(chain):
        index = np.asarray(REFERENCE[op.kind](index, **op.attr_dict))
    return resident[value], index, tuple(reversed(chain))


def activations(found: Found, batch: int, m: int, k: int, align: int, config: AccelConfig) -> InPlace | None:
    """How a layer of `batch` products of [m, k] activations tloads them from `found` (`source`'s
    answer), or None: a square array, a source in a tiled layout, each row block's rows evenly
    spaced rows of one source tensor (a tile's reach, padding rows included, within the
    source and its slack), its words runs of source channels alike in all its rows, the
    shifts multiples of `align` (the slot's alignment: HP windows), strides within the fields."""
    t, index, ops = found
    side = config.rows
    if config.rows != config.cols or t.layout not in TILED or index.size != batch * m * k:
        return None
    *lead, rows, channels = t.shape
    index = index.reshape(batch, m, k)
    which, row, channel = index // (rows * channels), index // channels % rows, index % channels
    blocks = math.ceil(channels / side)
    pieces, shifts = [], []
    for b in range(batch):
        for low in range(0, m, side):
            high = min(m, low + side)
            origin, first, row0 = which[b, low], channel[b, low], int(row[b, low, 0])
            step = int(row[b, low + 1, 0]) - row0 if high - low > 1 else 1
            if step < 1 or row0 + (side - 1) * step > rows + side - 2 or not (
                    (row[b, low:high] == row0 + step * np.arange(high - low)[:, None]).all()
                    and (which[b, low:high] == origin).all() and (channel[b, low:high] == first).all()):
                return None
            cut = np.flatnonzero((np.diff(first) != 1) | (np.diff(origin) != 0)) + 1
            starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [k]])
            if len(starts) == 1:
                shift = int(first[0]) % side
                runs = [Piece(0, int(origin[0]), int(first[0]) // side, math.ceil((shift + k) / side), row0, step)]
            elif (first[starts] % side == 0).all():  # each run from a whole tile; the next one covers its tail
                shift = 0
                runs = [Piece(int(s), int(origin[s]), int(first[s]) // side, math.ceil((e - s) / side), row0, step)
                        for s, e in zip(starts, ends)]
            else:
                return None
            if shift % align or any(p.block + p.tiles > blocks for p in runs) or \
                    inner(t.layout, t.shape, config) * config.beats(t.layout.buffer) * step > 0xFFFF:
                return None
            shifts.append(shift)
            pieces.append(tuple(runs))
    words = max(p.at + p.tiles * side for runs in pieces for p in runs)
    return InPlace(t, ops, tuple(pieces), tuple(shifts), words, math.ceil(m / side))


def row_order(found: Found, m: int, k: int) -> tuple[Found, tuple[int, ...]] | None:
    """A row-wise layer's [m, k] input that is the source's rows reordered, whole (a sequence-first
    view of a batch-first tensor): the layer reads the source as it lies, so its own rows come
    out in the source's order. (`found` read as it lies, where each of the layer's rows lies)
    or None (in order already, or not whole rows)."""
    t, index, ops = found
    if index.size != m * k or math.prod(t.shape) != m * k or t.shape[-1] != k:
        return None
    index = index.reshape(m, k)
    rows = index[:, 0] // k
    if np.array_equal(rows, np.arange(m)) or not np.array_equal(index, rows[:, None] * k + np.arange(k)) or \
            not np.array_equal(np.sort(rows), np.arange(m)):
        return None
    return (t, np.arange(m * k).reshape(found[1].shape), ops), tuple(int(r) for r in rows)


def channel_blocks(found: Found, batch: int, k: int, n: int, config: AccelConfig) -> Blocks | None:
    """How a matmul's right operand ([k, n] per product) reads `found` (`source`'s answer) in
    place by plain loads, or None: an outputs layout, operand row i the source's row i, its n
    columns consecutive source channels from a channel block on, n whole blocks; its rows
    consecutive source rows."""
    t, index, ops = found
    cols = config.cols
    if t.layout is not Layout.OUTPUTS or n % cols or index.size != batch * k * n:
        return None
    *lead, rows, channels = t.shape
    index = index.reshape(batch, k, n)
    which, row, channel = index // (rows * channels), index // channels % rows, index % channels
    first, first_row = channel[:, :1, :1], row[:, :1, :1]
    if not ((row == first_row + np.arange(k)[None, :, None]).all() and (channel == first + np.arange(n)).all()
            and (which == which[:, :1, :1]).all() and not (first % cols).any()):
        return None
    return Blocks(t, ops, tuple((int(which[b, 0, 0]), int(first[b, 0, 0]) // cols, int(first_row[b, 0, 0]))
                                for b in range(batch)))


def merge_heads(layer: Layer, graph: Graph, users: Mapping[str, list[Op]], config: AccelConfig) -> Layer:
    """`layer` writing the head merge's result, when it is a matmul (P V, requantized) of
    `[..., heads, rows, n]` whose output only layout ops read, one after another, into
    `[..., rows, heads * n]` (each row the heads side by side), with `n` whole channel blocks:
    `out` the merged value, `ops` with the layout ops, `heads` set. Else `layer` as it is."""
    t = graph.types[layer.out]
    if layer.kind != "matmul" or layer.n % config.cols or t.rank < 3:
        return layer
    heads, outputs = t.shape[-3], set(graph.outputs)
    merged = np.arange(t.numel).reshape(-1, heads, layer.m, layer.n).transpose(0, 2, 1, 3).reshape(-1)
    where = np.empty_like(merged)
    where[merged] = np.arange(t.numel)  # each product element's place in the merged tensor
    width = heads * layer.n
    index, value, chain = np.arange(t.numel).reshape(t.shape), layer.out, []
    while value not in outputs and len(after := users.get(value, [])) == 1 and after[0].kind in ADDRESSING:
        op = after[0]
        index, value = np.asarray(REFERENCE[op.kind](index, **op.attr_dict)), op.result
        chain.append(op)
        if index.size != t.numel or index.shape[-1] != width:
            continue
        placed = where[index.reshape(-1, width)]
        rows = placed[:, 0] // width
        if np.array_equal(placed, rows[:, None] * width + np.arange(width)):  # whole merged rows, in any order
            order = () if np.array_equal(rows, np.arange(len(rows))) else tuple(int(r) for r in rows)
            return dataclasses.replace(layer, ops=layer.ops + tuple(chain), out=value, heads=heads, out_rows=order)
    return layer
