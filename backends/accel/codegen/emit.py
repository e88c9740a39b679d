"""A section's instruction streams, built tile by tile: the array steps of each output tile,
its requantization (and fused op) and batched stores, the buffer rings' loads, and each
instruction's dependencies (`schedule` interleaves the streams).

Output tiles alternate between the two accumulator banks, so the vector unit requantizes one
tile while the array computes the next, and the array's gemms follow each other without
waiting for the previous one to drain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain


from .. import energy
from ..config import AccelConfig
from ..energy import Activity
from ..isa import Buffer, Instruction, Opcode, Unit
from ..layout import DramTensor, Layout, batch_words, inner, word_offset
from .addressing import InPlace, Reads
from .match import Layer
from .schedule import Node, schedule
from .tiling import Tiling
from .weights import Chunk, Plan


PARAM_RUN = 16  # column tiles whose requantization params one load brings


class _Ring:
    """Equal slots of one buffer, refilled oldest first. Remembers the item each slot holds
    and the last instruction that read it: the next load into the slot waits for that one."""

    def __init__(self, buffer: Buffer, size: int, slots: int):
        self.buffer, self.size, self.slots = buffer, size, slots
        self.items: dict[tuple, tuple[int, Node]] = {}  # key -> (slot, the load that filled it)
        self.held: list[tuple | None] = [None] * slots
        self.readers: list[Node | None] = [None] * slots
        self.next = 0

    def fetch(self, key: tuple, count: int, dram: int, builder: "Builder",
              pieces: list[tuple[int, int, int, int, int]] | None = None,
              chunk: Chunk | None = None) -> tuple[int, Node]:
        """(address, load) of item `key` (`count` words at DRAM word `dram`; with `pieces`,
        tloads in order instead: (slot word, tiles, DRAM word, step, stride) each, the load
        returned the last; with `chunk`, the instruction loading that weight chunk), loaded
        into the oldest slot unless a slot holds it."""
        if key not in self.items:
            slot, self.next = self.next, (self.next + 1) % self.slots
            self.items.pop(self.held[slot], None)
            deps, cfg, base = [self.readers[slot]], builder.config, slot * self.size
            if chunk is not None:
                op, fields = chunk.load()
                load = builder.add(Node(op, deps, cfg, buf=self.buffer, addr=base, dram=dram, **fields))
            elif pieces is None:
                load = builder.add(Node(Opcode.LOAD, deps, cfg, buf=self.buffer, addr=base, count=count, dram=dram))
            for at, tiles, start, step, stride in pieces or ():
                load = builder.add(Node(Opcode.TLOAD, deps, cfg, buf=self.buffer, addr=base + at, count=tiles,
                                        dram=start, step=step, stride=stride))
            self.held[slot], self.items[key] = key, (slot, load)
        slot, load = self.items[key]
        return slot * self.size, load

    def fetch_run(self, keys: list[tuple], count: int, dram: int, builder: "Builder") -> tuple[int, Node]:
        """(address, load) of item `keys[0]`, loaded (unless a slot holds it) by one load with
        the items after it that consecutive slots can take: item i is `count` words at DRAM
        word `dram + i * count * beats`. One load, not one each: each pays DRAM's latency."""
        if keys[0] not in self.items:
            if self.next + 1 > self.slots:
                self.next = 0
            run = [k for k in keys[:self.slots - self.next]]
            run = run[:next((i for i, k in enumerate(run) if k in self.items), len(run))] or run[:1]
            first, cfg = self.next, builder.config
            deps = self.readers[first:first + len(run)]
            load = builder.add(Node(Opcode.LOAD, deps, cfg, buf=self.buffer, addr=first * self.size,
                                    count=count * len(run), dram=dram))
            for i, key in enumerate(run):
                self.items.pop(self.held[first + i], None)
                self.held[first + i], self.items[key] = key, (first + i, load)
            self.next = (first + len(run)) % self.slots
        slot, load = self.items[keys[0]]
        return slot * self.size, load

    def read(self, address: int, node: Node) -> None:
        self.readers[address // self.size] = node


@dataclass
class _Batch:
    """Row blocks of one column tile requantized into one OBUF slot, stored together."""

    key: tuple[int, int]  # (product of the batch, column tile)
    first: int
    last: int
    slot: int
    requant: Node


class Builder:
    """The four instruction streams of one section, built tile by tile."""

    def __init__(self, layer: Layer, plan: Plan, tiling: Tiling, tensors: dict[str, DramTensor],
                 config: AccelConfig, reads: Reads = Reads()):
        self.layer, self.plan, self.tiling, self.tensors, self.config = layer, plan, tiling, tensors, config
        self.reads = reads
        self.streams: dict[Unit, list[Node]] = {u: [] for u in Unit}
        self.a = _Ring(Buffer.ABUF, tiling.a_size, tiling.a_slots)
        self.w = _Ring(Buffer.BBUF, tiling.b_size, tiling.b_slots)
        self.p = _Ring(Buffer.PBUF, 3, tiling.p_slots)
        self.o_readers: list[Node | None] = [None] * tiling.o_slots  # the last store of each OBUF slot
        self.o_next = 0
        self.batch: _Batch | None = None
        self.acc_readers: list[Node | None] = [None, None]  # the last vector reader of each accumulator bank
        self.constants: tuple[int, Node] | None = None  # (PBUF address, load) of the fused op's constants
        self.scores: list[Node] = []  # a softmax row block's vaccs
        self.mask_readers: list[Node | None] = [None, None]  # the last vsoftmax reading each mask slot
        self.addend_readers: list[Node | None] = [None, None]  # the last vadd reading each addend slot
        self.tiles = 0

    def add(self, node: Node) -> Node:
        self.streams[node.unit].append(node)
        return node

    def _dram(self, role: str, block: int, index: int, batch: int = 0) -> int:
        t = self.tensors[role]
        return t.region.start + word_offset(t.layout, t.shape, block, index, self.config, batch)

    def _activations(self, b: int, m: int) -> tuple[int, Node]:
        """(ABUF address, load) of row block m's activation words for product b: loaded from
        the activations layout, or read in place (`reads.x`) by tloads of whole tiles."""
        place = self.reads.x
        if place is None:
            return self.a.fetch(("A", b, m), self.plan.a_words, self._dram("x", m, 0, b), self)
        return self._in_place(self.a, ("A", b, m), place, place.index(b, m))

    def _weights(self, b: int, n: int, c: int, chunk: Chunk, dram: int) -> tuple[int, Node]:
        """(BBUF address, load) of chunk c of column tile n's weights for product b (at DRAM
        word `dram` in their layout), or of a matmul's right operand read in place (`reads.y`):
        by plain loads of the source's channel blocks, or by tloads."""
        place = self.reads.y
        if isinstance(place, InPlace):
            return self._in_place(self.w, ("W", b, n, c), place, place.index(b, n))
        if place is not None:
            return self.w.fetch(("W", b, n, c), chunk.words, place.dram(b, n, chunk.k_low, self.config), self)
        return self.w.fetch(("W", b, n, c), chunk.words, dram, self, chunk=chunk)

    def _in_place(self, ring: _Ring, key: tuple, place: InPlace, i: int) -> tuple[int, Node]:
        """(address, last load) of `ring`'s item `key` read in place: the tloads of
        `place.pieces[i]`, the operand starting `place.shifts[i]` words into the slot."""
        pieces = [(p.at, p.tiles, *place.start(p, self.config))
                  for p in place.pieces[i]]
        address, load = ring.fetch(key, 0, 0, self, pieces)
        return address + place.shifts[i], load

    def _constants(self) -> tuple[int, Node]:
        """The fused op's constants at PBUF's top, loaded once per section."""
        if self.constants is None:
            t, cfg = self.tensors["constants"], self.config
            count = t.shape[0]
            address = cfg.pbuf_depth - count
            self.constants = address, self.add(Node(Opcode.LOAD, [], cfg, buf=Buffer.PBUF, addr=address, count=count,
                                                    dram=t.region.start))
        return self.constants

    def tile(self, b: int, m: int, n: int) -> None:
        """Output tile (product b of the batch, row block m, column tile n): its array steps,
        then requant (and a fused vgelu) and a (batched) store, or for a softmax the raw
        scores into PBUF (and once the row block is complete, vsoftmax per row and a store)."""
        layer, plan, tiling, cfg = self.layer, self.plan, self.tiling, self.config
        bank = self.tiles % 2
        beats = cfg.beats(Buffer.BBUF)
        w = self.tensors["w"]
        w_base = w.region.start + b * batch_words(w.layout, w.shape, cfg) if layer.y else w.region.start
        first, gemm = True, None
        for c, chunk in enumerate(plan.tiles[n]):
            if tiling.resident:
                a_slot, a_load = self._activations(b, m)
                a = a_slot
            else:
                a_slot, a_load = self.a.fetch(("A", b, m, c), chunk.k, self._dram("x", m, chunk.k_low, b), self)
                a = a_slot - chunk.k_low  # the steps count from the row's first word
            w_slot, w_load = self._weights(b, n, c, chunk, w_base + chunk.start * beats)
            for step in chunk.steps:
                fields = dict(step.fields)
                fields["a"] += a
                fields["b"] += w_slot
                deps = [a_load, w_load, self.acc_readers[bank] if first else None]
                gemm = self.add(Node(step.op, deps, cfg, **fields, acc=int(not first), bank=bank))
                first = False
                self.a.read(a_slot, gemm)
                self.w.read(w_slot, gemm)
        self.tiles += 1
        rows = min(layer.m, (m + 1) * cfg.rows) - m * cfg.rows
        if layer.softmax:
            self._scores(b, m, n, gemm, bank)
            return
        run = range(n, min(n + PARAM_RUN, math.ceil(layer.n / cfg.cols)))
        param, p_load = self.p.fetch_run([("P", i) for i in run], 3, self._dram("params", n, 0), self)
        batch = self.batch
        if batch is not None and (batch.key != (b, n) or m != batch.last + 1 or m - batch.first == tiling.batch):
            self._flush()
            batch = None
        slot = batch.slot if batch is not None else self.o_next
        first_row = batch.first if batch is not None else m
        dst = (slot * tiling.batch + m - first_row) * cfg.rows
        last = requant = self.add(Node(Opcode.REQUANT, [gemm, p_load, self.o_readers[slot]], cfg, dst=dst,
                                       param=param, relu=int(layer.relu), bank=bank))
        if layer.gelu:
            address, load = self._constants()
            last = self.add(Node(Opcode.VGELU, [load], cfg, dst=dst, a=dst, n=cfg.rows, param=address))
        if layer.addend is not None:  # the tile's addend rows into a slot after the output ring, then vadd
            which = self.tiles % 2
            at = (tiling.o_slots * tiling.batch + which) * cfg.rows
            load = self.add(Node(Opcode.LOAD, [self.addend_readers[which]], cfg, buf=Buffer.OBUF, addr=at,
                                 count=rows, dram=self._dram("addend", n, m * cfg.rows)))
            last = self.addend_readers[which] = self.add(Node(Opcode.VADD, [load], cfg, dst=dst, a=dst, b=at,
                                                              n=rows))
        self.acc_readers[bank] = requant
        self.p.read(param, requant)
        if batch is None:
            self.o_next = (slot + 1) % tiling.o_slots
            self.batch = _Batch((b, n), m, m, slot, last)
        else:
            batch.last, batch.requant = m, last

    def _scores(self, b: int, m: int, n: int, gemm: Node, bank: int) -> None:
        """A softmax layer's tile: raw scores into the row block's PBUF slot (row r, word n at
        slot + r * J + n); after the last column tile, vsoftmax per row into OBUF and a store."""
        cfg, layer = self.config, self.layer
        words = math.ceil(layer.n / cfg.cols)
        which = (b * math.ceil(layer.m / cfg.rows) + m) % 2  # successive products' row blocks alternate too
        slot = which * cfg.rows * words  # PBUF and OBUF slots alike
        vacc = self.add(Node(Opcode.VACC, [gemm], cfg, dst=slot + n, stride=words, bank=bank))
        self.acc_readers[bank] = vacc
        if n < words - 1:
            return
        address, load = self._constants()
        rows = min(layer.m, (m + 1) * cfg.rows) - m * cfg.rows
        masks = self._masks(b, m, rows, words, which) if layer.mask else None
        last = None
        for r in range(rows):
            deps = [load, self.o_readers[which]] + ([masks[1]] if masks else []) if r == 0 else []
            mask = masks[0] + (r * words if layer.mask_shape[-2] > 1 else 0) if masks else 0
            last = self.add(Node(Opcode.VSOFTMAX, deps, cfg, dst=slot + r * words, a=slot + r * words, n=words,
                                 len=layer.n, param=address, masked=int(bool(masks)), mask=mask))
        if masks:
            self.mask_readers[which] = last
        store = self.add(Node(Opcode.STORE, [last], cfg, buf=Buffer.OBUF, addr=slot, count=rows * words,
                              dram=self._dram("out", m * cfg.rows, 0, b)))
        self.o_readers[which] = store

    def _masks(self, b: int, m: int, rows: int, words: int, which: int) -> tuple[int, Node]:
        """(PBUF address, load) of row block m's mask rows for product b, in the mask slot `which`
        after the two score slots: its rows' own, or the one row every query shares."""
        cfg, layer = self.config, self.layer
        per_query = layer.mask_shape[-2] > 1
        first = layer.mask_index[b] * layer.mask_shape[-2] + (m * cfg.rows if per_query else 0)
        address = (2 + which) * cfg.rows * words
        load = self.add(Node(Opcode.LOAD, [self.mask_readers[which]], cfg, buf=Buffer.PBUF, addr=address,
                             count=(rows if per_query else 1) * words, dram=self._dram("mask", first, 0)))
        return address, load

    def _flush(self) -> None:
        batch, rows = self.batch, self.config.rows
        assert batch is not None
        count = min(self.layer.m, (batch.last + 1) * rows) - batch.first * rows
        b, n = batch.key
        out, cfg, layer = self.tensors["out"], self.config, self.layer
        row = batch.first * rows
        if layer.heads:  # product b's rows and columns in the merged heads' 2-D tensor
            outer, head = divmod(b, layer.heads)
            b, row, n = 0, outer * layer.m + row, head * (layer.n // cfg.cols) + n
        fields = dict(buf=Buffer.OBUF, addr=batch.slot * self.tiling.batch * rows, count=count)
        if out.layout is Layout.ROWS:  # the tile's rows are a row's words apart
            store = self.add(Node(Opcode.SSTORE, [batch.requant], cfg, **fields, dram=self._dram(
                "out", row, n, b), step=inner(out.layout, out.shape, cfg) * cfg.beats(Buffer.OBUF)))
        else:
            store = self.add(Node(Opcode.STORE, [batch.requant], cfg, **fields, dram=self._dram("out", n, row, b)))
        self.o_readers[batch.slot] = store
        self.batch = None

    def mark(self) -> tuple:
        """What `rewind` needs to take back the tiles added after this point."""
        b = self.batch  # the open batch's fields: tiles change it in place
        return tuple(map(len, self.streams.values())), b and (b.key, b.first, b.last, b.slot, b.requant)

    def rewind(self, mark: tuple) -> None:
        """Take back the tiles added since `mark`, for `finish`: the streams and the open batch
        as they were (later tiles only append instructions; the rings' state is left, as no
        tile follows)."""
        lengths, batch = mark
        self.batch = batch and _Batch(*batch)
        for stream, length in zip(self.streams.values(), lengths):
            del stream[length:]

    def size(self) -> int:
        """Instructions of the section if it ended here (with its last store and halt)."""
        return sum(map(len, self.streams.values())) + (self.batch is not None) + 1

    def finish(self) -> tuple[tuple[Instruction, ...], int, Activity]:
        """The section's program (ending in halt), its cycles and its activity."""
        if self.batch is not None:
            self._flush()
        return *schedule(self.streams), energy.total(chain(*self.streams.values()), self.config)
