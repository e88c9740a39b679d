"""Chaining: the sections of one call run as one program where their instructions fit the program
memory, so that each layer's loads, products and row operations start while the layer before is
still finishing (a section alone starts with its units idle and ends draining them).

The sections' instructions keep their order within each unit; every dependency between units is
found again from the memory each instruction touches (`Instruction.accesses`: buffer words,
accumulator banks, DRAM words): a read waits for the latest write of what it reads, a write for
the latest write and for the reads since. Across sections that includes a load of what an
earlier section stored (the `st2ld` token) and a slot an earlier section's instruction still
uses. `schedule` interleaves the streams again under the ISA's timing."""

from __future__ import annotations

import dataclasses
import functools
from itertools import chain as concat

import numpy as np

from ..config import AccelConfig
from ..energy import Activity
from ..isa import FORMATS, HANDOFF, Buffer, Instruction, Opcode, Unit
from ..layout import Section
from .schedule import Node, Stuck as _Stuck, Tile, schedule

_UNIT_INDEX = {u: i for i, u in enumerate(Unit)}


class _Memory:
    """Who touched each word last: the latest write (its position) and each unit's latest read;
    DRAM (too large for word arrays) as lists of ranges."""

    def __init__(self, config: AccelConfig):
        sizes = {b.name: config.buffer_depth(b) for b in Buffer}
        self.write = {s: np.full(n, -1, np.int64) for s, n in sizes.items()}
        self.read = {s: np.full((len(Unit), n), -1, np.int64) for s, n in sizes.items()}
        self.stores: list[tuple[int, int, int]] = []  # DRAM (first, end, position) of each store
        self.loads: list[tuple[int, int, int]] = []  # DRAM (first, end, position) of each load

    def after(self, accesses: tuple) -> set[int]:
        """The positions of the instructions one touching `accesses` (`Instruction.accesses`)
        must follow: every one, not only each unit's latest, as a unit's instructions may be
        placed out of their order."""
        found: set[int] = set()
        for space, first, end, writes in accesses:
            if end <= first or space.startswith("ACC"):  # the accumulators: `schedule.Tile`
                continue
            if space == "DRAM":
                if writes:  # a store: the loads of what it overwrites
                    found.update(p for lo, hi, p in self.loads if lo < end and first < hi)
                else:  # a load: the stores of what it reads
                    found.update(p for lo, hi, p in self.stores if lo < end and first < hi)
                continue
            written = self.write[space][first:end]
            found.update(np.unique(written[written >= 0]).tolist())
            if writes:
                reads = self.read[space][:, first:end]
                found.update(np.unique(reads[reads > written]).tolist())
        return found

    def record(self, accesses: tuple, unit: Unit, position: int) -> None:
        for space, first, end, writes in accesses:
            if space.startswith("ACC"):
                continue
            if space == "DRAM":
                (self.stores if writes else self.loads).append((first, end, position))
            elif writes:
                self.write[space][first:end] = position
            else:
                self.read[space][_UNIT_INDEX[unit], first:end] = position


WINDOW = 32  # instructions of a unit's stream it may take out of order (what they touch allowing)


class _Untokened(Exception):
    """Two instructions of units no token connects would have to wait for each other."""


def reschedule(instructions: list[Instruction], config: AccelConfig) -> tuple[tuple[Instruction, ...], tuple[int, ...],
                                                                          int]:
    """`instructions` (a program's, or several run one after another, without halts) run as one:
    the dependencies between them found from the memory they touch, each output tile's
    accumulator bank left to the scheduler (`schedule.Tile`), scheduled again with a `WINDOW`
    (or, should that leave a unit waiting for an instruction outside it, in order). Returns
    the program (ending in halt), the index in `instructions` of each of its instructions but
    the halt, and its cycles."""
    try:
        streams, nodes = _streams(instructions, config)
        program, cycles = schedule(streams, False, WINDOW)
    except _Stuck:
        streams, nodes = _streams(instructions, config)
        program, cycles = schedule(streams)
    order = sorted(range(len(nodes)), key=lambda i: nodes[i].end - nodes[i].duration)  # issue cycles: program order
    return program, tuple(order), cycles


def _streams(instructions: list[Instruction], config: AccelConfig) -> tuple[dict[Unit, list[Node]], list[Node]]:
    """The units' streams of `instructions` with every dependency, and their nodes in order."""
    memory = _Memory(config)
    streams: dict[Unit, list[Node]] = {u: [] for u in Unit}
    nodes: list[Node] = []
    tiles: list[Tile | None] = [None, None]  # each bank's current tile
    for instruction in instructions:
        unit, accesses = instruction.unit, instruction.accesses(config)
        latest = [nodes[p] for p in sorted(memory.after(accesses))]
        deps = [d for d in latest if d.unit is not unit]
        if any((d.unit, unit) not in HANDOFF for d in deps):
            raise _Untokened  # a hand-off no token carries (the codegen's sections make none)
        fields = dict(zip((f.name for f in FORMATS[instruction.op]), instruction.args))
        node = Node(instruction.op, deps, config, [d for d in latest if d.unit is unit], **fields)
        if "bank" in fields:  # the accumulators: a tile's array steps, then its readers
            bank = fields["bank"]
            if tiles[bank] is None or unit is Unit.ARRAY and not fields["acc"]:
                tiles[bank] = Tile()
            tile = node.tile = tiles[bank]
            if unit is Unit.ARRAY:
                node.after.extend(tile.nodes[-1:])
                tile.nodes.append(node)
            else:
                node.deps.extend(tile.nodes[-1:])
                tile.readers.append(node)
        streams[unit].append(node)
        memory.record(accesses, unit, len(nodes))
        nodes.append(node)
    return streams, nodes


RECENT = 3  # sections a section is placed apart from in the buffers, where they fit


def _footprint(program: tuple[Instruction, ...], config: AccelConfig) -> dict[str, list[tuple[int, int]]]:
    """The buffer words `program` touches, by buffer name: sorted disjoint ranges."""
    ranges: dict[str, list[tuple[int, int]]] = {b.name: [] for b in Buffer}
    for instruction in program:
        for space, first, end, _writes in instruction.accesses(config):
            if space in ranges and end > first:
                ranges[space].append((first, end))
    out = {}
    for space, spans in ranges.items():
        merged: list[list[int]] = []
        for first, end in sorted(spans):
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([first, end])
        out[space] = [(a, b) for a, b in merged]
    return out


def _offset(spans: list[tuple[int, int]], taken: list[tuple[int, int]], depth: int, align: int) -> int | None:
    """The least offset (a multiple of `align`) moving `spans` inside [0, depth) clear of `taken`."""
    if not spans:
        return 0
    limit = depth - spans[-1][1]
    candidates = sorted({0} | {-(-(end - first) // align) * align for first, _ in spans for _, end in taken
                               if end > first})
    for offset in candidates:
        if offset > limit:
            break
        if all(b <= first + offset or end + offset <= a for first, end in spans for a, b in taken):
            return offset
    return None


def place(programs: list[tuple[Instruction, ...]], config: AccelConfig) -> list[tuple[Instruction, ...]]:
    """The programs with each one's buffer words moved clear of those of the `RECENT` programs
    before it (or of fewer, where they do not fit; a buffer's constants at its top stay): so
    that it loads, computes and stores beside them instead of waiting for their slots."""
    align = {"ABUF": config.abuf_banks, "BBUF": 2, "OBUF": 1, "PBUF": 1}
    placed: list[dict[str, list[tuple[int, int]]]] = []
    out: list[tuple[Instruction, ...]] = []
    for program in programs:
        spans = _footprint(program, config)
        offsets: dict[Buffer, int] = {}
        for buffer in Buffer:
            name = buffer.name
            for recent in range(min(RECENT, len(placed)), -1, -1):
                taken = sorted(r for p in placed[len(placed) - recent:] for r in p[name])
                offset = _offset(spans[name], taken, config.buffer_depth(buffer), align[name])
                if offset is not None:
                    break
            offsets[buffer] = offset or 0
        out.append(tuple(i.relocated(offsets) for i in program))
        placed.append({b.name: [(a + offsets[b], e + offsets[b]) for a, e in spans[b.name]] for b in Buffer})
    return out


# `_key` -> `reschedule`'s program, sources and cycles; None where no token carries a hand-off
CHAINED: dict[tuple, tuple[tuple[Instruction, ...], tuple[int, ...], int] | None] = {}


def chain(sections: list[Section], config: AccelConfig, timing: bool = False) -> list[Section]:
    """The sections with each run of consecutive sections of one call whose instructions fit the
    program memory together merged into one section (`merge`; `timing`: without programs)."""
    groups: list[list[Section]] = []
    size = 0
    for section in sections:
        length = (len(section.program) if section.program else section.deferred.length) - 1  # without its halt
        if groups and section.joins and size + length + 1 <= config.imem_depth:
            groups[-1].append(section)
            size += length
        else:
            groups.append([section])
            size = length
    return [s for group in groups for s in merge(group, config, timing)]


def merge(group: list[Section], config: AccelConfig, timing: bool = False) -> list[Section]:
    """One section running `group`'s programs as one (`reschedule`), each placed in the buffers
    apart from the sections just before it where they fit (`place`): their ops, tensors, work
    and notes together (`timing`: without a program). Groups alike but for where their DRAM
    tensors lie (`_key`) are scheduled once."""
    if len(group) > 1:
        instructions = [i for program in place([_program(s) for s in group], config) for i in program
                        if i.op is not Opcode.HALT]
        key = _key(instructions, config)
        if key not in CHAINED:
            if len(CHAINED) > 1024:
                CHAINED.clear()
            try:
                CHAINED[key] = reschedule(instructions, config)
            except _Untokened:
                CHAINED[key] = None
    if len(group) == 1 or CHAINED[key] is None:
        return [dataclasses.replace(s, program=()) if timing else s for s in group]
    template, sources, cycles = CHAINED[key]
    program = () if timing else tuple(
        t.with_field(_DRAM, instructions[i][_DRAM]) if _DRAM in _names(t.op) else t
        for t, i in zip(template, sources)) + template[len(sources):]

    def union(key: str) -> tuple:
        return tuple({t.region.start: t for s in group for t in getattr(s, key)}.values())

    return [dataclasses.replace(
        group[0], ops=tuple(concat.from_iterable(s.ops for s in group)), inputs=union("inputs"),
        constants=union("constants"), outputs=union("outputs"), resident=union("resident"), program=program,
        macs=sum(s.macs for s in group), cycles=cycles, note="; ".join(s.note for s in group),
        activity=sum((s.activity for s in group), Activity()), deferred=None)]


_DRAM = "dram"


def _program(section: Section) -> tuple[Instruction, ...]:
    """The section's program, built now where `timing` deferred it."""
    return section.program or section.deferred.build()


@functools.lru_cache(maxsize=None)
def _names(op: Opcode) -> tuple[str, ...]:
    return tuple(f.name for f in FORMATS[op])


def _key(instructions: list[Instruction], config: AccelConfig) -> tuple:
    """What a merged schedule depends on: the instructions, each DRAM range as its place in the
    order of all the ranges' bounds (where the group's tensors lie apart from that does not
    change which instructions touch the same words)."""
    ranges = [next(((first, end) for space, first, end, _ in i.accesses(config) if space == "DRAM"), None)
              if _DRAM in _names(i.op) else None for i in instructions]
    rank = {bound: r for r, bound in enumerate(sorted({b for span in ranges if span for b in span}))}
    return (config,) + tuple((i.op, i.args if span is None else
                              tuple(a for f, a in zip(_names(i.op), i.args) if f != _DRAM) + (rank[span[0]],
                                                                                              rank[span[1]]))
                             for i, span in zip(instructions, ranges))
