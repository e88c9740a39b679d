"""Scheduling: a section's instruction streams interleaved into one program.

The generator writes four streams (load, array, vector, store) in which every
instruction names the instructions of other units it depends on (the load that filled what a
gemm reads, the last reader of a slot a load overwrites, ...). They are interleaved into one
program greedily, the instruction that can issue first going next, under the ISA's timing;
each dependency becomes a token (the latest producer a unit waits for signals it; earlier
ones are covered since units complete in order). The same model gives each section's cycles."""

from __future__ import annotations

from ..config import AccelConfig
from ..isa import FETCH_CYCLES, HANDOFF, UNITS, Instruction, Opcode, Token, Unit, drain, occupancy


class Node:
    """An instruction being scheduled: its fields, the instructions of other units it waits
    for, its position in its unit's stream, and (once placed) its end cycle and tokens."""

    __slots__ = ("op", "fields", "deps", "unit", "index", "occupancy", "duration", "end", "wait", "signal")

    def __init__(self, op: Opcode, deps: list["Node | None"], config: AccelConfig, **fields: int):
        self.op, self.fields, self.unit = op, fields, UNITS[op]
        self.deps = [d for d in deps if d is not None]
        self.occupancy = occupancy(op, fields.__getitem__, config)
        self.duration = self.occupancy + drain(op, config)
        self.index, self.end = 0, -1
        self.wait: list[Token] = []
        self.signal: list[Token] = []

    def instruction(self) -> Instruction:
        return Instruction.make(self.op, tuple(self.wait), tuple(self.signal), **self.fields)


def schedule(streams: dict[Unit, list[Node]], timing: bool = False) -> tuple[tuple[Instruction, ...], int]:
    """Interleave the units' streams into one program, greedily placing next the instruction
    that can issue first (the ISA's timing: in order, one per cycle, once its unit is idle and
    what it waits for has ended), turn each dependency into a token, and append halt. Returns
    the program (`timing`: none, nor tokens) and its cycles (halt's issue + 1)."""
    lanes = [streams[u] for u in (Unit.ARRAY, Unit.VECTOR, Unit.LOAD, Unit.STORE)]  # on a tie the array goes first
    heads, free = [0] * len(lanes), [0] * len(lanes)
    covered: dict[tuple[Unit, Unit], int] = {}  # (producer unit, consumer unit) -> latest producer waited for
    order: list[Node] = []
    t = FETCH_CYCLES
    last_end = 0
    while True:
        best, best_issue, best_lane = None, 0, 0
        for lane, stream in enumerate(lanes):
            if heads[lane] < len(stream):
                node = stream[heads[lane]]
                issue = max(t, free[lane])
                for d in node.deps:
                    if d.end < 0:
                        break
                    issue = max(issue, d.end)
                else:
                    if best is None or issue < best_issue:
                        best, best_issue, best_lane = node, issue, lane
        if best is None:
            break
        node, issue = best, best_issue
        if not timing:
            latest: dict[Unit, Node] = {}
            for d in node.deps:
                if d.unit not in latest or d.index > latest[d.unit].index:
                    latest[d.unit] = d
            for unit, d in latest.items():
                if d.index > covered.get((unit, node.unit), -1):
                    covered[(unit, node.unit)] = d.index
                    token = HANDOFF[(unit, node.unit)]
                    d.signal.append(token)
                    node.wait.append(token)
            order.append(node)
        node.end = issue + node.duration
        last_end = max(last_end, node.end)
        free[best_lane] = issue + node.occupancy
        heads[best_lane] += 1
        t = issue + 1
    assert all(head == len(stream) for head, stream in zip(heads, lanes)), "the streams' dependencies form a cycle"
    program = () if timing else tuple(n.instruction() for n in order) + (Instruction(Opcode.HALT),)
    return program, max(t, last_end) + 1
