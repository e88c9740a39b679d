"""The weight plan: what the array runs per column tile.

The weights choose the unit (`weight_plan`): HP-structured weights (`~hp(bh, bw, row_nnz)` in their
type) run on the HP sparse unit (spgemm: pruned blocks are neither stored, loaded nor run;
inside a kept block each channel's non-zeros gather their activations by local index);
other block structures (`~blocks`, or HP without the sparse unit) run dense gemms over the
kept K-blocks only; +-1 activations and weights (W1A1) run on the binary unit (bgemm,
`data_bits` values per lane); +-1 weights with `data_bits` activations (W1A8) on the W1A8 unit
where the config has it (wgemm: G weight signs per lane, G activation words a step);
everything else runs dense gemms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.sparsity import Blocks, Hierarchical

from ..config import AccelConfig
from ..isa import Opcode, pack_sparse
from ..layout import pack_binary
from .match import Layer

MAX_COUNT = 0xFFFF  # the widest load/store count and gemm k (16-bit fields)


@dataclass(frozen=True)
class Step:
    """One array instruction: `op` and its fields; `a` counts activation words from the row's
    first, `b` BBUF words from its chunk's first (acc and bank are the builder's)."""

    op: Opcode
    fields: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Chunk:
    """Weight words of one column tile loaded into one BBUF slot, and the steps reading them.
    `k_low, k` is the activation range the steps read (what a streamed ABUF chunk holds). An
    HP chunk is stored compact (`sparse`: spload's nnz and bw): `stored` stream words in DRAM
    expand into its `words` BBUF words."""

    start: int  # first word in the layer's weight stream
    words: int
    k_low: int
    k: int
    steps: tuple[Step, ...]
    stored: int = 0  # an HP chunk's stream words in DRAM (the others are stored as their `words`)
    sparse: tuple[int, int] | None = None

    def load(self) -> tuple[Opcode, dict[str, int]]:
        """The instruction loading it, but its addresses: spload for an HP chunk, else load."""
        if self.sparse is None:
            return Opcode.LOAD, {"count": self.words}
        return Opcode.SPLOAD, {"count": self.stored, "steps": self.words // 2, "nnz": self.sparse[0],
                               "bw": self.sparse[1]}


@dataclass(frozen=True)
class Plan:
    """How the array runs one layer: `kind` (dense, blocks: dense gemms over the kept K-blocks
    only, hp: spgemm, binary: bgemm on packed bits, w1a8: wgemm on packed signs), activation words per row (`a_words`,
    `a_align`: ABUF slots start at multiples of it), the chunks of every column tile, the
    weight stream (BBUF words in load order) and the array steps per row block."""

    kind: str
    a_words: int
    a_align: int
    tiles: tuple[tuple[Chunk, ...], ...]
    stream: np.ndarray | None  # None for dense: the weights stay in their own layout
    steps: int

    @property
    def chunk_words(self) -> int:
        return max(c.words for tile in self.tiles for c in tile)

    @property
    def chunks(self) -> int:
        return max(map(len, self.tiles))


def weight_plan(layer: Layer, config: AccelConfig) -> Plan:
    """The layer's plan: hp (spgemm) for HP weights when the sparse unit can gather their
    blocks, binary (bgemm) for +-1 activations and weights with the binary unit, blocks for
    other block-structured weights, else dense."""
    structure, resident = layer.structure, layer.k <= config.abuf_depth
    if isinstance(structure, Hierarchical) and config.sparse_unit and resident \
            and structure.bw <= min(config.abuf_banks, 1 << config.data_bits - 1):
        return _hp_plan(layer, structure.bw, config)
    if layer.binary and config.binary_unit and -(-layer.k // config.data_bits) <= config.abuf_depth:
        packed = pack_binary(layer.weight, config.data_bits)
        return _dense_plan(packed, config, Opcode.BGEMM, "binary")
    group = config.binary_weight_group
    signs = group and not layer.binary and structure is None and layer.k % group == 0
    if signs and np.isin(layer.weight, (-1, 1)).all():
        return _dense_plan(pack_signs(layer.weight, group, config.data_bits), config, Opcode.WGEMM, "w1a8",
                           group=group)
    if isinstance(structure, (Blocks, Hierarchical)) and resident:
        return _dense_plan(layer.weight, config, granule=structure.bw)
    return _dense_plan(layer.weight, config)


def pack_signs(weight: np.ndarray, group: int, bits: int) -> np.ndarray:
    """+-1 weights [N, K] as wgemm's weight words' lanes [N, K / G]: bit j of lane i the sign
    of weight i * G + j (set: +1), as a signed `bits`-bit lane."""
    n, k = weight.shape
    lanes = ((weight.reshape(n, k // group, group) > 0) << np.arange(group)).sum(axis=2)
    return np.where(lanes >= 1 << bits - 1, lanes - (1 << bits), lanes).astype(np.int64)


def _dense_plan(weight: np.ndarray, config: AccelConfig, op: Opcode = Opcode.GEMM, kind: str = "dense",
                granule: int | None = None, group: int = 1) -> Plan:
    """Gemms (or bgemms) over K in chunks of at most half of BBUF (split-K); with `granule`,
    only the K-blocks of that width holding a non-zero weight of the column tile are stored
    and run (kind "blocks"; a tile with none keeps its first block, to clear the accumulators).
    `group`: activation words a step reads (wgemm's G: `weight` holds K / G words a row)."""
    n, k = weight.shape
    cols = config.cols
    kmax = min(MAX_COUNT, max(1, config.bbuf_depth // 2), config.abuf_depth // group)
    if granule is not None:
        kmax = max(granule, kmax // granule * granule)
    chunks = math.ceil(k / kmax)
    size = math.ceil(k / chunks) if granule is None else kmax
    streamed = granule is not None or kind != "dense"  # a dense plan's weights stay in their own layout
    tiles, stream, start, steps = [], [], 0, 0
    for t in range(math.ceil(n / cols)):
        if streamed:
            block = np.zeros((cols, k), np.int64)
            block[:min(cols, n - t * cols)] = weight[t * cols:(t + 1) * cols]
        if granule is None:
            kept = np.ones(1, bool)
            granule_k = k
        else:
            granule_k = granule
            kept = block.reshape(cols, -1, granule).any(axis=(0, 2)) if k % granule == 0 else \
                np.array([block[:, j:j + granule].any() for j in range(0, k, granule)])
            if not kept.any():
                kept[0] = True
        tile = []
        for low in range(0, k, size):
            high = min(k, low + size)
            runs = _runs(kept, low // granule_k if granule is not None else 0,
                         -(-high // granule_k) if granule is not None else 1)
            if granule is None:
                runs = [(low, high)]
            else:
                runs = [(r0 * granule, min(high, r1 * granule)) for r0, r1 in runs]
            if not runs:
                continue
            chunk_steps, offset = [], 0
            for r0, r1 in runs:
                chunk_steps.append(Step(op, (("a", r0 * group), ("b", offset), ("k", r1 - r0))))
                if streamed:
                    stream.append(block[:, r0:r1].T)
                offset += r1 - r0
            tile.append(Chunk(start, offset, low * group, (high - low) * group, tuple(chunk_steps)))
            start += offset
            steps += offset
        tiles.append(tuple(tile))
    return Plan(kind if granule is None else "blocks", k * group, group, tuple(tiles),
                np.concatenate(stream) if streamed else None, steps)


def _runs(kept: np.ndarray, first: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs [r0, r1) of True in kept[first:end]."""
    runs, r0 = [], None
    for j in range(first, end):
        if kept[j] and r0 is None:
            r0 = j
        if not kept[j] and r0 is not None:
            runs.append((r0, j))
            r0 = None
    if r0 is not None:
        runs.append((r0, end))
    return runs


def _hp_plan(layer: Layer, bw: int, config: AccelConfig) -> Plan:
    """Spgemms over the kept K-blocks of each column tile: per step a weight word and a
    local-index word (padding entries: weight 0, index 0), the pruned blocks between two kept
    ones skipped through the index word of the earlier one's last step (a new spgemm only
    where more blocks are pruned in a row than its lane 0 can count); `nnz` per tile is the
    most non-zeros a channel has in one of its blocks. Each chunk is stored as spload's
    compact stream (log2(bw) bits an index, a skip a block)."""
    weight, cols, bits = layer.weight, config.cols, config.data_bits
    n, k = weight.shape
    nblocks = -(-k // bw)
    max_skip = (1 << bits) // bw - 1
    tiles, stream, start, steps = [], [], 0, 0
    for t in range(math.ceil(n / cols)):
        block = np.zeros((cols, nblocks * bw), np.int64)
        block[:min(cols, n - t * cols), :k] = weight[t * cols:(t + 1) * cols]
        view = block.reshape(cols, nblocks, bw)
        counts = np.count_nonzero(view, axis=2)  # [cols, blocks]
        kept = np.flatnonzero(counts.any(axis=0))
        if not kept.size:
            kept = np.zeros(1, np.int64)
        nnz = max(1, int(counts.max()))
        # kept blocks per BBUF slot: a quarter of BBUF, so a tile's chunks leave slots to load the
        # next tile's into (a sparse chunk takes about as long to load as to run)
        per_chunk = max(1, (config.bbuf_depth // 4) // (2 * nnz))
        tile = []
        for chunk in np.split(kept, range(per_chunk, kept.size, per_chunk)):
            runs = np.split(chunk, np.flatnonzero(np.diff(chunk) > max_skip + 1) + 1)
            chunk_steps, offset, pairs = [], 0, []
            for run in runs:
                chunk_steps.append(Step(Opcode.SPGEMM, (("a", int(run[0]) * bw), ("b", offset), ("blocks", run.size),
                                                        ("nnz", nnz), ("bw", bw),
                                                        ("span", int(run[-1] + 1 - run[0]) * bw))))
                skips = np.append(np.diff(run) - 1, 0)
                for j, skip in zip(run, skips):
                    order = np.argsort(view[:, j] == 0, axis=1, kind="stable")[:, :nnz]  # non-zeros first
                    values = np.take_along_axis(view[:, j], order, axis=1)
                    index = np.where(values != 0, order, 0)
                    index[0, -1] += bw * skip  # lane 0 of the last step: the blocks to skip after this one
                    index = (index + (1 << bits - 1)) % (1 << bits) - (1 << bits - 1)  # as a signed lane
                    pairs.append(np.stack([values.T, index.T], axis=1).reshape(2 * nnz, cols))
                offset += 2 * nnz * run.size
            packed = pack_sparse(np.concatenate(pairs), nnz, bw, bits)
            stream.append(packed)
            tile.append(Chunk(start, offset, int(chunk[0]) * bw, min(k, (int(chunk[-1]) + 1) * bw) - int(chunk[0]) * bw,
                              tuple(chunk_steps), len(packed), (nnz, bw)))
            start += len(packed)
            steps += offset // 2
        tiles.append(tuple(tile))
    return Plan("hp", k, bw, tuple(tiles), np.concatenate(stream), steps)
