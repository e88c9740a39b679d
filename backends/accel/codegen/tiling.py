"""Tiling: output tiles, buffer slots and the order the tiles run in.

On an R x C array the output [M, N] is cut into R x C tiles; K into chunks of at most
half of BBUF (a quarter for HP streams; split-K: accumulating instructions, then one
requant). Row blocks of activations stay resident in ABUF (a group of as many row blocks as
ABUF holds, less one slot to load the next group's into; when one row block does not fit,
its chunks stream); the weight chunks stream through a BBUF ring (double buffering: the next
chunks load while the array computes), the requantization params through a PBUF ring, and
results leave through an OBUF ring, one store per run of row blocks of one column tile (a
linear's addend tiles through two OBUF slots after it). Tile
order: row group, column group (the column tiles whose chunks fill half the ring), row
block, column tile: a weight chunk is loaded once per row group. A layer whose program
exceeds the program memory is split into several sections (each loads what it needs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import AccelConfig
from .match import Layer, Unsupported
from .weights import MAX_COUNT, Plan

_MAX_SLOTS = 64  # ring slots per buffer: keeps the tokens in flight below the 8-bit counters (isa.TOKEN_BITS)


@dataclass(frozen=True)
class Tiling:
    resident: bool  # a row block's activation words stay in one ABUF slot (else chunks stream)
    a_size: int  # ABUF words per slot: all of a row block's when resident, else a chunk's
    a_slots: int
    b_size: int  # BBUF words per slot (even for spgemm: it reads word pairs)
    b_slots: int
    p_slots: int  # PBUF slots of 3 words
    group: int  # row blocks computed against each weight tile in turn
    batch: int  # row blocks per store (OBUF slot: batch * rows words)
    o_slots: int


def choose_tiling(layer: Layer, plan: Plan, config: AccelConfig, tiled: int = 0, tiled_w: int = 0) -> Tiling:
    """The layer's buffer slots and groups; `tiled` (`tiled_w`): its activations (a matmul's
    right operand) arrive by tloads filling that many slot words (whole tiles of `rows` words:
    an ABUF slot rounds up to whole tiles)."""
    rows = config.rows
    if config.obuf_depth < rows:
        raise Unsupported(f"OBUF ({config.obuf_depth} words) holds no requantized tile ({rows} words)")
    resident = max(plan.a_words, tiled) <= min(config.abuf_depth, MAX_COUNT)
    align = math.lcm(plan.a_align, rows) if tiled else plan.a_align
    a_size = -(-max(plan.a_words, tiled) // align) * align if resident else \
        max(c.k for tile in plan.tiles for c in tile)
    if a_size > config.abuf_depth:
        raise Unsupported(f"a row block's {a_size} activation words exceed ABUF ({config.abuf_depth} words)")
    a_slots = min(config.abuf_depth // a_size, _MAX_SLOTS)
    b_size = max(plan.chunk_words + (plan.chunk_words % 2 if plan.kind == "hp" else 0), tiled_w)
    if b_size > config.bbuf_depth:
        raise Unsupported(f"a weight chunk of {b_size} words exceeds BBUF ({config.bbuf_depth} words)")
    row_blocks = math.ceil(layer.m / rows)
    # with more row blocks than slots, one slot stays free: the next group starts loading early
    group = (row_blocks if row_blocks <= a_slots else a_slots - (a_slots > 2)) if resident else row_blocks
    obuf = config.obuf_depth - (2 * rows if layer.addend is not None else 0)  # two slots of addend rows after
    if obuf < rows:
        raise Unsupported(f"OBUF ({config.obuf_depth} words) holds no requantized tile beside two of addends")
    batch = min(group, max(1, obuf // (2 * rows)))
    free = config.pbuf_depth - len(layer.gelu or layer.softmax)  # constants sit at PBUF's top
    if layer.softmax:  # two slots of a row block's scores (and of its masks) in PBUF, of its probabilities in OBUF
        words = rows * math.ceil(layer.n / config.cols)
        if 2 * words > config.obuf_depth or (4 if layer.mask else 2) * words > free:
            raise Unsupported(f"two row blocks of scores{' and their masks' if layer.mask else ''} "
                              f"({2 * words} words each) do not fit PBUF and OBUF")
    elif free < 3:
        raise Unsupported(f"PBUF ({config.pbuf_depth} words) holds no requantization group besides the constants")
    return Tiling(resident, a_size, a_slots, b_size, min(config.bbuf_depth // b_size, _MAX_SLOTS),
                  min(free // 3, _MAX_SLOTS), group, batch, min(obuf // (batch * rows), _MAX_SLOTS))


def tile_order(layer: Layer, plan: Plan, tiling: Tiling, config: AccelConfig) -> list[tuple[int, int, int]]:
    """(batch, row block, column tile) in execution order, per product of the batch: per group
    of row blocks (resident in ABUF), per group of column tiles (whose weight chunks fill at
    most half of the BBUF ring, so the next group's load while this one runs), per row block,
    per column tile. Each weight chunk is loaded once per row group, and the first row block
    starts on a whole column group while the next row blocks' activations load. A softmax
    layer goes row block by row block (each row's scores complete before the next block)."""
    row_blocks, col_tiles = math.ceil(layer.m / config.rows), math.ceil(layer.n / config.cols)
    columns = max(1, tiling.b_slots // 2 // plan.chunks) if not layer.softmax else col_tiles
    return [(b, m, n) for b in range(layer.batch) for first in range(0, row_blocks, tiling.group)
            for low in range(0, col_tiles, columns) for m in range(first, min(first + tiling.group, row_blocks))
            for n in range(low, min(low + columns, col_tiles))]
