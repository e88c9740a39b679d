"""Scheduling: a section's instruction streams interleaved into one program.

The generator writes four streams (load, array, vector, store) in which every
instruction names the instructions of other units it depends on (the load that filled what a
gemm reads, the last reader of a slot a load overwrites, ...). They are interleaved into one
program greedily, the instruction that can issue first going next, under the ISA's timing;
each dependency becomes a token (the latest producer a unit waits for signals it; earlier
ones are covered since units complete in order). The same model gives each section's cycles.
`chain` schedules a call's sections again as one program, with a window: each unit may take
instructions out of their stream's order, and the accumulator banks go to output tiles as
they free."""

from __future__ import annotations

import bisect
from ..config import AccelConfig
from ..isa import FETCH_CYCLES, HANDOFF, UNITS, Instruction, Opcode, Token, Unit, drain, occupancy


class Node:
    """An instruction being scheduled: its fields, the instructions of other units it waits
    for, and (once placed) its place in its unit's order (`index`), its end cycle and tokens."""

    __slots__ = ("op", "fields", "deps", "after", "tile", "unit", "index", "occupancy", "duration", "end", "wait",
                 "signal", "at", "pending", "ready", "users")

    def __init__(self, op: Opcode, deps: list["Node | None"], config: AccelConfig, after: list["Node"] = (),
                 **fields: int):
        self.op, self.fields, self.unit = op, fields, UNITS[op]
        self.deps = [d for d in deps if d is not None]
        self.after = list(after)  # instructions of its own unit it must follow (with `schedule`'s window)
        self.tile: Tile | None = None  # with `schedule`'s window: the accumulator tile it belongs to
        self.occupancy = occupancy(op, fields.__getitem__, config)
        self.duration = self.occupancy + drain(op, config)
        self.index, self.end = 0, -1
        self.wait: list[Token] = []
        self.signal: list[Token] = []

    def instruction(self) -> Instruction:
        return Instruction.make(self.op, tuple(self.wait), tuple(self.signal), **self.fields)


LANES = (Unit.ARRAY, Unit.VECTOR, Unit.LOAD, Unit.STORE)  # on a tie the array goes first
LOAD_REACH = 4  # with a window: the load unit looks this many windows ahead (its loads are prefetches)


class Stuck(RuntimeError):
    """No instruction can be placed: what the next ones wait for never comes."""


class Tile:
    """One output tile's use of an accumulator bank (`schedule`'s window renames the banks): its
    array instructions (the first starts from zero) and the vector instructions reading them."""

    __slots__ = ("nodes", "readers", "bank", "left", "done")

    def __init__(self):
        self.nodes: list[Node] = []
        self.readers: list[Node] = []
        self.bank = -1
        self.left = 0  # its instructions not yet placed
        self.done = 0  # the cycle its last ends


def schedule(streams: dict[Unit, list[Node]], timing: bool = False, window: int = 1) \
        -> tuple[tuple[Instruction, ...], int]:
    """Interleave the units' streams into one program, greedily placing next the instruction
    that can issue first (the ISA's timing: in order, one per cycle, once its unit is idle and
    what it waits for has ended), turn each dependency into a token, and append halt. Returns
    the program (`timing`: none, nor tokens) and its cycles (halt's issue + 1).

    With `window` > 1 a unit may take any of the next `window` instructions of its stream (the
    load unit `LOAD_REACH` times as many) once those of its own unit it must follow
    (`Node.after`) are placed: the streams then give every dependency, within a unit too, and
    each unit's order is the order placed. The vector unit then takes the shortest of those
    that can issue first, and an instruction of a `Tile` (`Node.tile`) the accumulator bank free
    first once the tile's first instruction is placed, after every reader of that bank's
    previous tile. Raises `Stuck` where a unit waits for an instruction outside its window."""
    lanes = [streams[u] for u in LANES]
    reach = [window * (LOAD_REACH if u is Unit.LOAD and window > 1 else 1) for u in LANES]
    for stream in lanes:
        for at, node in enumerate(stream):
            node.at, node.ready, node.users = at, 0, []
    for stream in lanes:
        for node in stream:
            node.pending = len(node.after) + len(node.deps)
            for d in node.after:
                d.users.append((node, True))
            for d in node.deps:
                d.users.append((node, False))
            if node.tile is not None:
                node.tile.left += 1
    heads, entered, free, placed = [0] * 4, [0] * 4, [0] * 4, [0] * 4
    available: list[list[Node]] = [[] for _ in lanes]  # within reach, all they follow placed; by `at`
    positions: list[list[int]] = [[] for _ in lanes]  # their `at`

    def offer(lane: int, node: Node) -> None:
        i = bisect.bisect(positions[lane], node.at)
        positions[lane].insert(i, node.at)
        available[lane].insert(i, node)

    def enter(lane: int) -> None:
        stream, limit = lanes[lane], min(heads[lane] + reach[lane], len(lanes[lane]))
        while entered[lane] < limit:
            node = stream[entered[lane]]
            entered[lane] += 1
            if not node.pending:
                offer(lane, node)

    def waiting() -> Node | None:
        """The vector unit's first reader, within its reach, of a tile without a bank."""
        stream = lanes[1]
        for at in range(heads[1], min(heads[1] + reach[1], len(stream))):
            node = stream[at]
            if node.end < 0 and node.tile is not None and node.tile.bank < 0:
                return node
        return None

    for lane in range(4):
        enter(lane)
    holders: list[Tile | None] = [None, None]  # the tile holding each bank
    covered: dict[tuple[Unit, Unit], int] = {}  # (producer unit, consumer unit) -> latest producer waited for
    order: list[Node] = []
    t = FETCH_CYCLES
    last_end = 0
    while True:
        best, best_key, best_bank, first = None, None, -1, False
        for lane in range(4):
            if best_key is not None and best_key[:2] == (t, 0):
                break  # nothing issues before t, and a later lane loses the tie
            start = max(t, free[lane])
            ranked = window > 1 and lane == 1
            for node in available[lane]:
                issue, bank = max(start, node.ready), -1
                if node.tile is not None and node.tile.bank < 0:  # a tile's first instruction: a free bank
                    tile = node.tile
                    if tile.readers and tile.readers[0].at >= heads[1] + reach[1]:
                        continue  # and its reader within the vector unit's reach, lest both banks wait
                    banks = [(h.done if h else 0, b) for b, h in enumerate(holders) if h is None or not h.left]
                    if first is False:
                        first = waiting()
                    if first is not None and first.tile is not tile and tile.readers and \
                            tile.readers[0].at > first.at:  # out of order: leave a bank for that one
                        banks = [(since, b) for since, b in banks if _frees(holders[1 - b], first)]
                    if not banks:
                        continue
                    since, bank = min(banks)
                    issue = max(issue, since)
                key = (issue, node.occupancy if ranked else 0, lane, node.at)
                if best_key is None or key < best_key:
                    best, best_key, best_bank = node, key, bank
                if issue == start and not ranked:
                    break  # the lane's first in `at` order that issues as soon as the unit is free
        if best is None:
            break
        node, issue, lane = best, best_key[0], best_key[2]
        if best_bank >= 0:
            previous = holders[best_bank]
            if previous is not None:
                node.deps.extend(previous.readers)
            holders[best_bank] = node.tile
            node.tile.bank = best_bank
        if node.tile is not None:
            node.fields["bank"] = node.tile.bank
            node.tile.left -= 1
        node.index = placed[lane]
        placed[lane] += 1
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
        if node.tile is not None:
            node.tile.done = max(node.tile.done, node.end)
        last_end = max(last_end, node.end)
        free[lane] = issue + node.occupancy
        i = available[lane].index(node)
        del available[lane][i], positions[lane][i]
        for user, same_unit in node.users:
            user.pending -= 1
            if not same_unit:
                user.ready = max(user.ready, node.end)
            if not user.pending:
                user_lane = LANES.index(user.unit)
                if user.at < entered[user_lane]:
                    offer(user_lane, user)
        stream = lanes[lane]
        while heads[lane] < len(stream) and stream[heads[lane]].end >= 0:
            heads[lane] += 1
        enter(lane)
        t = issue + 1
    if not all(head == len(stream) for head, stream in zip(heads, lanes)):
        raise Stuck("the streams' dependencies form a cycle, or a unit waits for an instruction outside its window")
    program = () if timing else tuple(n.instruction() for n in order) + (Instruction(Opcode.HALT),)
    return program, max(t, last_end) + 1


def _frees(holder: Tile | None, reader: Node) -> bool:
    """Whether the bank `holder` holds frees before `reader` (in its unit's order) is placed."""
    return holder is None or not holder.left or all(r.end >= 0 or r.at < reader.at for r in holder.readers)
