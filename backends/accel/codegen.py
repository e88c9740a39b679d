"""The accelerator codegen: `generate(graph, config) -> AccelProgram`.

It finds every quantized linear the systolic array runs exactly, a chain

    %y.acc = linear(%x, @w, @b?)                     x: integer of <= data_bits, w: constant in data_bits
    %y.q   = requantize(%y.acc, @mult, @shift)       to data_bits with zero point 0; constant per-channel
    %y.r   = relu(%y.q)                              or per-tensor mult/shift; the relu is optional

where the linear's accumulator feeds only the requantize (leading batch dims of x flatten into
M), and compiles each chain ("layer") to one or more sections. Every other op runs on the host;
`AccelProgram.host_ops` says why.

Tiling (R x C array). The output [M, N] is cut into R x C tiles; K into `chunks` of at most
half of BBUF (split-K: accumulating gemms, then one requant). Row blocks of activations stay
resident in ABUF (a group of as many row blocks as ABUF holds; when one row block does not
fit, its chunks stream); per group, the weight chunks stream through a BBUF ring of at least
two chunk slots (double buffering: the next chunk loads while the array computes), the
requantization params through a PBUF ring, and results leave through an OBUF ring, one store
per run of row blocks of one column tile. Tile order: group, column tile, row block, so a
weight tile serves every row block of the group. A layer whose program exceeds the program
memory is split into several sections (each loads what it needs).

Scheduling. The generator writes three streams (load, compute, store) in which every
instruction names the instructions of other units it depends on (the load that filled what a
gemm reads, the last reader of a slot a load overwrites, ...). They are interleaved into one
program greedily, the instruction that can issue first going next, under the ISA's timing;
each dependency becomes a token (the latest producer a unit waits for signals it; earlier
ones are covered since units complete in order). The same model gives each section's cycles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op

from .config import AccelConfig
from .isa import FETCH_CYCLES, UNITS, Buffer, Instruction, Opcode, Token, Unit
from .layout import (AccelProgram, DramAllocator, DramTensor, HostOp, Layout, Region, Section, dram_words, encode,
                     word_offset)

__all__ = ["generate", "AccelProgram"]

_DATA = {4: DType.I4, 8: DType.I8, 16: DType.I16}
_MAX_SLOTS = 64  # ring slots per buffer: keeps the tokens in flight below the 8-bit counters (isa.TOKEN_BITS)
_MAX_COUNT = 0xFFFF  # the widest load/store count and gemm k (16-bit fields)
_TOKENS = {(Unit.LOAD, Unit.COMPUTE): Token.LD2EX, (Unit.COMPUTE, Unit.LOAD): Token.EX2LD,
           (Unit.COMPUTE, Unit.STORE): Token.EX2ST, (Unit.STORE, Unit.COMPUTE): Token.ST2EX}


def generate(graph: Graph, config: AccelConfig | None = None) -> AccelProgram:
    """Compile the quantized linear chains of `graph` to accelerator sections for `config`
    (default `AccelConfig()`); every other op is a host op with its reason."""
    config = config or AccelConfig()
    allocator = DramAllocator(config)
    sections: list[Section] = []
    images: list[tuple[Region, bytes]] = []
    why: dict[str, str] = {}
    placed: set[str] = set()
    users = graph.users()
    for op in graph.ops:
        if op.kind != "linear":
            continue
        layer = _match(op, graph, users, config)
        if isinstance(layer, str):
            why[op.result] = layer
            continue
        start = allocator.used
        try:
            layer_sections, constants = _compile(layer, allocator, config)
        except _Unsupported as e:
            allocator.used = start
            why[op.result] = str(e)
            continue
        sections.extend(layer_sections)
        images.extend(constants)
        placed.update(o.result for o in layer.ops)
    dram = bytearray(allocator.used * (config.dram_bits // 8))
    for region, data in images:
        dram[region.byte_slice(config)] = data
    host = tuple(HostOp(op.kind, op.result, why.get(op.result) or _host_reason(op, why))
                 for op in graph.ops if op.result not in placed)
    return AccelProgram(config, tuple(sections), host, bytes(dram))


class _Unsupported(Exception):
    """Why a matched layer cannot run on this config."""


# -- matching ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    ops: tuple[Op, ...]  # linear, requantize[, relu]
    x: str
    out: str
    weight: np.ndarray  # [N, K] int64
    params: np.ndarray  # [3, N]: bias, multiplier, shift
    param_values: tuple[str, str, str]
    relu: bool
    m: int

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def n(self) -> int:
        return self.weight.shape[0]


def _match(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> _Layer | str:
    """The layer starting at linear `op` (`users`: `graph.users()`), or why the array cannot
    run it exactly."""
    types, weights, outputs = graph.types, graph.weights, set(graph.outputs)
    data = _DATA[config.data_bits]
    x, w, b = op.operands[0], op.operands[1], op.operands[2] if len(op.operands) == 3 else None
    x_type = types[x]
    if not x_type.dtype.is_int or x_type.dtype.bits > config.data_bits:
        return f"its input is {x_type.dtype}: the array multiplies integers of at most {config.data_bits} bits"
    if w not in weights or (b is not None and b not in weights):
        return "its weight or bias is not a constant"
    weight = np.asarray(weights[w], np.int64)
    n, k = weight.shape
    low, high = data.value_range
    if weight.size and (weight.min() < low or weight.max() > high):
        return f"its weight values do not fit {data}"
    m = math.prod(x_type.shape[:-1])
    if m * n * k == 0:
        return "it is empty"
    bias = np.zeros(n, np.int64) if b is None else np.asarray(weights[b], np.int64)
    if not (op.type.dtype is DType.I32 and config.acc_bits == 32):  # else both wrap alike in 32 bits
        bound = int((np.abs(weight).sum(axis=1) * -low + np.abs(bias)).max())
        if bound >= 1 << config.acc_bits - 1:
            return f"its {op.type.dtype} accumulator can exceed the array's {config.acc_bits}-bit accumulators"
    req = users[op.result][0] if len(users[op.result]) == 1 and op.result not in outputs else None
    if req is None or req.kind != "requantize":
        return "its accumulator feeds other ops than one requantize (the array writes requantized results only)"
    if req.attr("dtype") is not data or req.attr("zero_point") != 0:
        return f"its requantize is to {req.attr('dtype')} with zero point {req.attr('zero_point')}, " \
               f"the array's to {data} with zero point 0"
    mult_name, shift_name = req.operands[1:]
    if not all(v in weights and types[v].dtype.is_int for v in (mult_name, shift_name)):
        return "its requantize multiplier or shift is not a constant"
    try:
        mult, shift = (np.broadcast_to(np.asarray(weights[v], np.int64), (n,)) for v in (mult_name, shift_name))
    except ValueError:
        return "its requantize multiplier or shift is neither per tensor nor per output channel"
    lane = 1 << config.acc_bits - 1
    if mult.min() < -lane or mult.max() >= lane or shift.min() < 0 or shift.max() > 62:
        return f"its requantize multiplier does not fit {config.acc_bits} bits or its shift [0, 62]"
    ops, out = (op, req), req.result
    after = users[out]
    relu = len(after) == 1 and after[0].kind == "relu" and out not in outputs
    if relu:
        ops, out = ops + (after[0],), after[0].result
    return _Layer(ops, x, out, weight, np.stack([bias, mult, shift]), (b or "", mult_name, shift_name), relu, m)


def _host_reason(op: Op, why: dict[str, str]) -> str:
    if op.kind == "requantize" and op.operands[0] in why:
        return "it requantizes a linear the host runs"
    if op.kind in ("quantize", "dequantize"):
        return "conversions between float and integer run on the host"
    return f"the accelerator runs quantized linear -> requantize (-> relu) chains only, not {op.kind} " \
           f"on {op.type.dtype}"


# -- tiling --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tiling:
    chunk: int  # K words per gemm (the last chunk may be shorter)
    chunks: int
    resident: bool  # a row block's K activation words stay in one ABUF slot (else chunks stream)
    a_size: int  # ABUF words per slot: K when resident, else `chunk`
    a_slots: int
    b_slots: int  # BBUF slots of `chunk` words
    p_slots: int  # PBUF slots of 3 words
    group: int  # row blocks computed against each weight tile in turn
    batch: int  # row blocks per store (OBUF slot: batch * rows words)
    o_slots: int


def _tiling(layer: _Layer, config: AccelConfig) -> _Tiling:
    rows = config.rows
    if config.obuf_depth < rows:
        raise _Unsupported(f"OBUF ({config.obuf_depth} words) holds no requantized tile ({rows} words)")
    kmax = min(_MAX_COUNT, max(1, config.bbuf_depth // 2), config.abuf_depth)
    chunks = math.ceil(layer.k / kmax)
    chunk = math.ceil(layer.k / chunks)
    resident = layer.k <= min(config.abuf_depth, _MAX_COUNT)
    a_size = layer.k if resident else chunk
    a_slots = min(config.abuf_depth // a_size, _MAX_SLOTS)
    row_blocks = math.ceil(layer.m / rows)
    group = min(row_blocks, a_slots) if resident else row_blocks
    batch = min(group, max(1, config.obuf_depth // (2 * rows)))
    return _Tiling(chunk, chunks, resident, a_size, a_slots, min(config.bbuf_depth // chunk, _MAX_SLOTS),
                   min(config.pbuf_depth // 3, _MAX_SLOTS), group, batch,
                   min(config.obuf_depth // (batch * rows), _MAX_SLOTS))


def _tile_order(layer: _Layer, tiling: _Tiling, config: AccelConfig) -> list[tuple[int, int]]:
    """(row block, column tile) in execution order: per group, per column tile, per row block."""
    row_blocks, col_tiles = math.ceil(layer.m / config.rows), math.ceil(layer.n / config.cols)
    return [(m, n) for first in range(0, row_blocks, tiling.group) for n in range(col_tiles)
            for m in range(first, min(first + tiling.group, row_blocks))]


# -- one layer -----------------------------------------------------------------------------------

def _shapes(layer: _Layer) -> dict[Layout, tuple[int, int]]:
    """The layer's DRAM tensors' shapes, by layout."""
    return {Layout.ACTIVATIONS: (layer.m, layer.k), Layout.WEIGHTS: (layer.n, layer.k),
            Layout.PARAMS: (3, layer.n), Layout.OUTPUTS: (layer.m, layer.n)}


def _compile(layer: _Layer, allocator: DramAllocator, config: AccelConfig) \
        -> tuple[list[Section], list[tuple[Region, bytes]]]:
    """The layer's sections, and its constants' DRAM contents."""
    tiling = _tiling(layer, config)
    shapes = _shapes(layer)
    try:
        regions = {layout: allocator.allocate(dram_words(layout, shape, config), f"{layer.out}'s {layout.value}")
                   for layout, shape in shapes.items()}
    except ValueError as e:
        raise _Unsupported(f"the DRAM is full: {e}") from None
    values = {Layout.ACTIVATIONS: (layer.x,), Layout.WEIGHTS: (layer.ops[0].operands[1],),
              Layout.PARAMS: layer.param_values, Layout.OUTPUTS: (layer.out,)}
    tensor = {layout: DramTensor(values[layout], layout, shape, regions[layout]) for layout, shape in shapes.items()}
    tiles = _tile_order(layer, tiling, config)
    spans, start = [], 0
    builder = _Builder(layer, tiling, regions, config)
    for i, tile in enumerate(tiles):
        builder.tile(*tile)
        if builder.size() > config.imem_depth:
            if i == start:
                raise _Unsupported(f"one output tile takes {builder.size()} instructions, "
                                   f"the program memory holds {config.imem_depth}")
            spans.append((start, i))
            start, builder = i, _Builder(layer, tiling, regions, config)
            builder.tile(*tile)
            if builder.size() > config.imem_depth:
                raise _Unsupported(f"one output tile takes {builder.size()} instructions, "
                                   f"the program memory holds {config.imem_depth}")
    spans.append((start, len(tiles)))
    sections = []
    for first, end in spans:
        builder = _Builder(layer, tiling, regions, config)
        for tile in tiles[first:end]:
            builder.tile(*tile)
        program, cycles = builder.finish()
        note = (f"{' -> '.join(o.result for o in layer.ops)}: M={layer.m} K={layer.k} N={layer.n}, "
                f"output tiles {first}..{end - 1} of {len(tiles)} (by groups of {tiling.group} row blocks, column, row), "
                f"K in {tiling.chunks} x {tiling.chunk}")
        sections.append(Section(tuple(o.result for o in layer.ops), (tensor[Layout.ACTIVATIONS],),
                                (tensor[Layout.WEIGHTS], tensor[Layout.PARAMS]), (tensor[Layout.OUTPUTS],),
                                program, builder.macs, cycles, note))
    constants = [(regions[Layout.WEIGHTS], encode(Layout.WEIGHTS, layer.weight, config)),
                 (regions[Layout.PARAMS], encode(Layout.PARAMS, layer.params, config))]
    return sections, constants


class _Node:
    """An instruction being scheduled: its fields, the instructions of other units it waits
    for, its position in its unit's stream, and (once placed) its end cycle and tokens."""

    __slots__ = ("op", "fields", "deps", "unit", "index", "duration", "end", "wait", "signal")

    def __init__(self, op: Opcode, deps: list["_Node | None"], config: AccelConfig, **fields: int):
        self.op, self.fields, self.unit = op, fields, UNITS[op]
        self.deps = [d for d in deps if d is not None]
        self.duration = Instruction.make(op, **fields).duration(config)
        self.index, self.end = 0, -1
        self.wait: list[Token] = []
        self.signal: list[Token] = []

    def instruction(self) -> Instruction:
        return Instruction.make(self.op, tuple(self.wait), tuple(self.signal), **self.fields)


class _Ring:
    """Equal slots of one buffer, refilled oldest first. Remembers the item each slot holds
    and the last instruction that read it: the next load into the slot waits for that one."""

    def __init__(self, buffer: Buffer, size: int, slots: int):
        self.buffer, self.size, self.slots = buffer, size, slots
        self.items: dict[tuple, tuple[int, _Node]] = {}  # key -> (slot, the load that filled it)
        self.held: list[tuple | None] = [None] * slots
        self.readers: list[_Node | None] = [None] * slots
        self.next = 0

    def fetch(self, key: tuple, count: int, dram: int, builder: "_Builder") -> tuple[int, _Node]:
        """(address, load) of item `key` (`count` words at DRAM word `dram`), loaded into the
        oldest slot unless a slot holds it."""
        if key not in self.items:
            slot, self.next = self.next, (self.next + 1) % self.slots
            self.items.pop(self.held[slot], None)
            load = builder.add(_Node(Opcode.LOAD, [self.readers[slot]], builder.config, buf=self.buffer,
                                     addr=slot * self.size, count=count, dram=dram))
            self.held[slot], self.items[key] = key, (slot, load)
        slot, load = self.items[key]
        return slot * self.size, load

    def read(self, address: int, node: _Node) -> None:
        self.readers[address // self.size] = node


@dataclass
class _Batch:
    """Row blocks of one column tile requantized into one OBUF slot, stored together."""

    n: int
    first: int
    last: int
    slot: int
    requant: _Node


class _Builder:
    """The three instruction streams of one section, built tile by tile."""

    def __init__(self, layer: _Layer, tiling: _Tiling, regions: dict[Layout, Region], config: AccelConfig):
        self.layer, self.tiling, self.regions, self.config = layer, tiling, regions, config
        self.shapes = _shapes(layer)
        self.streams: dict[Unit, list[_Node]] = {u: [] for u in Unit}
        self.a = _Ring(Buffer.ABUF, tiling.a_size, tiling.a_slots)
        self.w = _Ring(Buffer.BBUF, tiling.chunk, tiling.b_slots)
        self.p = _Ring(Buffer.PBUF, 3, tiling.p_slots)
        self.o_readers: list[_Node | None] = [None] * tiling.o_slots  # the last store of each OBUF slot
        self.o_next = 0
        self.batch: _Batch | None = None
        self.macs = 0

    def add(self, node: _Node) -> _Node:
        stream = self.streams[node.unit]
        node.index = len(stream)
        stream.append(node)
        return node

    def _dram(self, layout: Layout, block: int, index: int) -> int:
        return self.regions[layout].start + word_offset(layout, self.shapes[layout], block, index, self.config)

    def tile(self, m: int, n: int) -> None:
        """Output tile (row block m, column tile n): its gemms, requant and (batched) store."""
        layer, tiling, cfg = self.layer, self.tiling, self.config
        for c in range(tiling.chunks):
            low = c * tiling.chunk
            k = min(tiling.chunk, layer.k - low)
            if tiling.resident:
                a, a_load = self.a.fetch(("A", m), layer.k, self._dram(Layout.ACTIVATIONS, m, 0), self)
                a += low
            else:
                a, a_load = self.a.fetch(("A", m, c), k, self._dram(Layout.ACTIVATIONS, m, low), self)
            b, b_load = self.w.fetch(("W", n, c), k, self._dram(Layout.WEIGHTS, n, low), self)
            gemm = self.add(_Node(Opcode.GEMM, [a_load, b_load], cfg, a=a, b=b, k=k, acc=int(c > 0)))
            self.a.read(a, gemm)
            self.w.read(b, gemm)
        param, p_load = self.p.fetch(("P", n), 3, self._dram(Layout.PARAMS, n, 0), self)
        batch = self.batch
        if batch is not None and (batch.n != n or m != batch.last + 1 or m - batch.first == tiling.batch):
            self._flush()
            batch = None
        slot = batch.slot if batch is not None else self.o_next
        first = batch.first if batch is not None else m
        dst = (slot * tiling.batch + m - first) * cfg.rows
        requant = self.add(_Node(Opcode.REQUANT, [p_load, self.o_readers[slot]], cfg, dst=dst, param=param,
                                 relu=int(layer.relu)))
        self.p.read(param, requant)
        if batch is None:
            self.o_next = (slot + 1) % tiling.o_slots
            self.batch = _Batch(n, m, m, slot, requant)
        else:
            batch.last, batch.requant = m, requant
        self.macs += (min(layer.m, (m + 1) * cfg.rows) - m * cfg.rows) * \
            (min(layer.n, (n + 1) * cfg.cols) - n * cfg.cols) * layer.k

    def _flush(self) -> None:
        batch, rows = self.batch, self.config.rows
        assert batch is not None
        count = min(self.layer.m, (batch.last + 1) * rows) - batch.first * rows
        store = self.add(_Node(Opcode.STORE, [batch.requant], self.config, buf=Buffer.OBUF,
                               addr=batch.slot * self.tiling.batch * rows, count=count,
                               dram=self._dram(Layout.OUTPUTS, batch.n, batch.first * rows)))
        self.o_readers[batch.slot] = store
        self.batch = None

    def size(self) -> int:
        """Instructions of the section if it ended here (with its last store and halt)."""
        return sum(map(len, self.streams.values())) + (self.batch is not None) + 1

    def finish(self) -> tuple[tuple[Instruction, ...], int]:
        """The section's program (ending in halt) and its cycles."""
        if self.batch is not None:
            self._flush()
        return _schedule(self.streams)


def _schedule(streams: dict[Unit, list[_Node]]) -> tuple[tuple[Instruction, ...], int]:
    """Interleave the units' streams into one program, greedily placing next the instruction
    that can issue first (the ISA's timing: in order, one per cycle, once its unit is idle and
    what it waits for has ended), turn each dependency into a token, and append halt. Returns
    the program and its cycles (halt's issue + 1)."""
    heads = dict.fromkeys(Unit, 0)
    free = dict.fromkeys(Unit, 0)
    covered: dict[tuple[Unit, Unit], int] = {}  # (producer unit, consumer unit) -> latest producer waited for
    order: list[_Node] = []
    t = FETCH_CYCLES
    while True:
        best: tuple[int, _Node] | None = None
        for unit in (Unit.COMPUTE, Unit.LOAD, Unit.STORE):  # on a tie the array goes first
            if heads[unit] < len(streams[unit]):
                node = streams[unit][heads[unit]]
                if all(d.end >= 0 for d in node.deps):
                    issue = max(t, free[unit], *(d.end for d in node.deps))
                    if best is None or issue < best[0]:
                        best = (issue, node)
        if best is None:
            break
        issue, node = best
        latest: dict[Unit, _Node] = {}
        for d in node.deps:
            if d.unit not in latest or d.index > latest[d.unit].index:
                latest[d.unit] = d
        for unit, d in latest.items():
            if d.index > covered.get((unit, node.unit), -1):
                covered[(unit, node.unit)] = d.index
                token = _TOKENS[(unit, node.unit)]
                d.signal.append(token)
                node.wait.append(token)
        node.end = issue + node.duration
        free[node.unit] = node.end
        heads[node.unit] += 1
        order.append(node)
        t = issue + 1
    assert all(heads[u] == len(streams[u]) for u in Unit), "the streams' dependencies form a cycle"
    program = tuple(n.instruction() for n in order) + (Instruction(Opcode.HALT),)
    return program, max(t, *free.values()) + 1
