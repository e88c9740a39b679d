"""The ISA simulator: runs an accelerator program on a DRAM image, bit-exact with the quantized
numpy reference, and counts cycles with the hardware's timing (`backends.accel.isa`).

Timing is computed per instruction, not per cycle: each issues at the first cycle after its
predecessor's issue when its unit is free and its tokens are there, occupies its unit for
`Instruction.occupancy` cycles and ends `Instruction.duration` cycles after its issue; the RTL
implements the same rule, so both count the same cycles. Data effects apply in program
order; that equals the hardware's concurrent order for every program without races, and the
simulator rejects a program with a race (two units touching the same memory at overlapping
times, one of them writing)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.isa import (ARRAY_OPS, FETCH_CYCLES, NONLINEAR_OPS, TOKEN_BITS, Buffer, Instruction, Opcode,
                                    SimulationError, Token, Unit, check_program, pack_words, unpack_sparse, unpack_words,
                                    wrap)
from tcc.ir.dtypes import DType
from tcc.ir.reference import REFERENCE

_DATA_DTYPES = {4: DType.I4, 8: DType.I8, 16: DType.I16}


@dataclass
class Stats:
    cycles: int = 0
    macs: int = 0  # PE steps of the array: operand steps x rows x cols
    instructions: Counter = field(default_factory=Counter)
    busy: Counter = field(default_factory=Counter)  # cycles each unit was occupied
    schedule: list[tuple[int, int]] = field(default_factory=list)  # (issue, end) per instruction

    def to_json(self, config: AccelConfig) -> dict:
        return {"cycles": self.cycles, "macs": self.macs,
                "utilization": self.macs / (self.cycles * config.pes) if self.cycles else 0.0,
                "instructions": dict(sorted(self.instructions.items())),
                "busy_cycles": {u.value: self.busy[u.value] for u in Unit}}


class Machine:
    """The accelerator's architectural state: buffers, the two accumulator banks, DRAM (bytes)."""

    def __init__(self, config: AccelConfig, dram: np.ndarray | bytes = b""):
        self.config = config
        self.dram_bytes = config.dram_bits // 8
        image = np.frombuffer(bytes(dram), np.uint8) if isinstance(dram, (bytes, bytearray)) else dram
        if len(image) > config.dram_words * self.dram_bytes:
            raise SimulationError(f"the DRAM image ({len(image)} bytes) exceeds the DRAM "
                                  f"({config.dram_words} words of {self.dram_bytes} bytes)")
        self.dram = np.zeros(config.dram_words * self.dram_bytes, np.uint8)  # calloc: untouched pages are free
        self.dram[:len(image)] = image
        self.buffers = {b: np.zeros((config.buffer_depth(b), config.lanes(b)), np.int64) for b in Buffer}
        self.acc = np.zeros((2, config.rows, config.cols), np.int64)

    def dram_words(self, first: int, count: int) -> np.ndarray:
        """DRAM words [first, first + count) as a [count, dram_bytes] view."""
        return self.dram[first * self.dram_bytes:(first + count) * self.dram_bytes].reshape(count, self.dram_bytes)

    def execute(self, instr: Instruction) -> None:
        cfg, op = self.config, instr.op
        if op in (Opcode.LOAD, Opcode.STORE):
            buf = Buffer(instr["buf"])
            beats, addr, count = cfg.beats(buf), instr["addr"], instr["count"]
            words = self.dram_words(instr["dram"], count * beats).reshape(count, beats * self.dram_bytes)
            if op is Opcode.LOAD:
                self.buffers[buf][addr:addr + count] = unpack_words(words, cfg.lanes(buf), cfg.lane_bits(buf))
            else:
                words[:] = pack_words(self.buffers[buf][addr:addr + count], cfg.lane_bits(buf), beats * self.dram_bytes)
        elif op is Opcode.SPLOAD:
            beats, count, steps = cfg.beats(Buffer.BBUF), instr["count"], instr["steps"]
            words = self.dram_words(instr["dram"], count * beats).reshape(count, beats * self.dram_bytes)
            self.buffers[Buffer.BBUF][instr["addr"]:instr["addr"] + 2 * steps] = unpack_sparse(
                unpack_words(words, cfg.cols, cfg.data_bits), steps, instr["nnz"], instr["bw"], cfg.data_bits)
        elif op is Opcode.SSTORE:
            buf = Buffer(instr["buf"])
            beats, addr, count = cfg.beats(buf), instr["addr"], instr["count"]
            packed = pack_words(self.buffers[buf][addr:addr + count], cfg.lane_bits(buf), beats * self.dram_bytes)
            for i, word in enumerate(packed):
                self.dram_words(instr["dram"] + i * instr["step"], beats).reshape(-1)[:] = word
        elif op is Opcode.TLOAD:
            buf = Buffer(instr["buf"])
            lanes, beats = cfg.lanes(buf), cfg.beats(buf)
            tiles = np.arange(instr["count"])[:, None] * instr["stride"] + np.arange(lanes)[None] * instr["step"]
            first = instr["dram"] + tiles.reshape(-1)  # each source word's first DRAM word, tile by tile
            at = (first[:, None] + np.arange(beats)) * self.dram_bytes
            raw = self.dram[at[:, :, None] + np.arange(self.dram_bytes)].reshape(len(first), beats * self.dram_bytes)
            words = unpack_words(raw, lanes, cfg.lane_bits(buf)).reshape(-1, lanes, lanes)  # [tile, i, j]
            addr = instr["addr"]
            self.buffers[buf][addr:addr + len(first)] = words.transpose(0, 2, 1).reshape(-1, lanes)
        elif op in ARRAY_OPS:
            products = self._products(instr)
            bank = instr["bank"]
            self.acc[bank] = wrap(products + (self.acc[bank] if instr["acc"] else 0), cfg.acc_bits)
        elif op is Opcode.REQUANT:
            bias, mult, shift = self.buffers[Buffer.PBUF][instr["param"]:instr["param"] + 3]
            if shift.min() < 0 or shift.max() > 62:
                raise SimulationError(f"requant: shift lanes must lie in [0, 62], got [{shift.min()}, {shift.max()}]")
            out = REFERENCE["requantize"](wrap(self.acc[instr["bank"]] + bias, cfg.acc_bits), mult, shift,
                                          dtype=_DATA_DTYPES[cfg.data_bits], scale=1.0, zero_point=0)
            out = out.astype(np.int64)
            self.buffers[Buffer.OBUF][instr["dst"]:instr["dst"] + cfg.rows] = np.maximum(out, 0) if instr["relu"] else out
        elif op is not Opcode.HALT:
            self._vector(instr)

    def _products(self, instr: Instruction) -> np.ndarray:
        """[rows, cols] sums of products an array instruction adds to its accumulator bank."""
        abuf, bbuf, op = self.buffers[Buffer.ABUF], self.buffers[Buffer.BBUF], instr.op
        a, b = instr["a"], instr["b"]
        if op is Opcode.GEMM:
            return abuf[a:a + instr["k"]].T @ bbuf[b:b + instr["k"]]
        if op is Opcode.WGEMM:  # G activation words a step, each added or subtracted by its weight's bit
            group, k = self.config.binary_weight_group, instr["k"]
            x = abuf[a:a + k * group].reshape(k, group, -1)  # [k, G, rows]
            signs = 2 * ((bbuf[b:b + k, None, :] >> np.arange(group)[None, :, None]) & 1) - 1  # [k, G, cols]
            return np.einsum("kgr,kgc->rc", x, signs)
        if op is Opcode.BGEMM:
            bits = self.config.data_bits
            mask = (1 << bits) - 1
            x, w = abuf[a:a + instr["k"]] & mask, bbuf[b:b + instr["k"]] & mask  # [k, rows], [k, cols]
            same = np.bitwise_count(~(x[:, :, None] ^ w[:, None, :]) & mask).astype(np.int64)
            return (2 * same - bits).sum(axis=0)
        bw, nnz, blocks = instr["bw"], instr["nnz"], instr["blocks"]
        steps = blocks * nnz
        values, index = bbuf[b:b + 2 * steps:2], bbuf[b + 1:b + 2 * steps:2]  # [steps, cols]
        lane0 = index[nnz - 1::nnz, 0] & (1 << self.config.data_bits) - 1  # each block's last step
        windows = a + np.concatenate([[0], np.cumsum(bw + (lane0[:-1] & -bw))])  # + bw * (1 + skip)
        if windows[-1] + bw > a + instr["span"]:
            raise SimulationError(f"spgemm: block {blocks - 1}'s window at ABUF word {windows[-1]} "
                                  f"leaves the span [{a}, {a + instr['span']})")
        rows = np.repeat(windows, nnz)[:, None] + (index & (bw - 1))  # the ABUF word each column gathers
        gathered = abuf[rows]  # [steps, cols, rows]
        return np.einsum("scr,sc->rc", gathered, values)

    def _constants(self, instr: Instruction, count: int) -> list[int]:
        return [int(v) for v in self.buffers[Buffer.PBUF][instr["param"]:instr["param"] + count, 0]]

    def _nonlinear(self, instr: Instruction) -> None:
        """vacc and the integer nonlinearities, computed by the IR's own reference ops."""
        cfg, op = self.config, instr.op
        obuf, pbuf = self.buffers[Buffer.OBUF], self.buffers[Buffer.PBUF]
        data = _DATA_DTYPES[cfg.data_bits]
        if op is Opcode.VACC:
            for r in range(cfg.rows):  # in row order: with stride 0 the last row stays
                pbuf[instr["dst"] + r * instr["stride"]] = self.acc[instr["bank"]][r]
            return
        n, dst = instr["n"], instr["dst"]
        if op is Opcode.VGELU:
            names = ("multiplier", "shift", "clip", "one", "out_multiplier", "out_shift")
            obuf[dst:dst + n] = REFERENCE["int_gelu"](obuf[instr["a"]:instr["a"] + n], dtype=data, scale=1.0,
                                                      **dict(zip(names, self._constants(instr, 6))))
            return
        if op is Opcode.VRESADD:
            m_a, s_a, m_b, s_b, m, s, bits = self._constants(instr, 7)
            if not 2 <= bits <= cfg.acc_bits:
                raise SimulationError(f"vresadd: out_bits must lie in [2, {cfg.acc_bits}], got {bits}")
            rq = REFERENCE["requantize"]
            wide = {"dtype": DType.I32, "scale": 1.0, "zero_point": 0}
            total = wrap(rq(obuf[instr["a"]:instr["a"] + n], np.int64(m_a), np.int64(s_a), **wide).astype(np.int64)
                         + rq((pbuf if instr["wide"] else obuf)[instr["b"]:instr["b"] + n], np.int64(m_b),
                              np.int64(s_b), **wide), 32)
            out = np.clip(rq(total, np.int64(m), np.int64(s), **wide), -(1 << bits - 1), (1 << bits - 1) - 1)
            pbuf[dst:dst + n] = out
            return
        length, lanes = instr["len"], n * cfg.cols
        row = pbuf[instr["a"]:instr["a"] + n].reshape(-1)[:length]
        if op is Opcode.VSOFTMAX:
            names = ("multiplier", "shift", "ln2", "b", "c", "out_bits")
            constants = dict(zip(names, self._constants(instr, 6)))
            if not 1 <= constants["out_bits"] < cfg.data_bits:
                raise SimulationError(f"vsoftmax: out_bits must lie in [1, {cfg.data_bits - 1}], "
                                      f"got {constants['out_bits']}")
            mask = pbuf[instr["mask"]:instr["mask"] + n].reshape(-1)[:length] != 0 if instr["masked"] else None
            out = REFERENCE["int_softmax"](row, mask, **constants)
        else:
            eps, shift = self._constants(instr, 2)
            first = instr["param"] + 2
            weight = pbuf[first:first + n].reshape(-1)[:length]
            low = pbuf[first + n:first + 2 * n].reshape(-1)[:length] & ((1 << cfg.acc_bits) - 1)
            bias = (pbuf[first + 2 * n:first + 3 * n].reshape(-1)[:length] << cfg.acc_bits) | low
            out = REFERENCE["int_layer_norm"](row, weight, bias, eps=eps, shift=shift, dtype=data, scale=1.0)
        padded = np.zeros(lanes, np.int64)
        padded[:length] = out
        obuf[dst:dst + n] = padded.reshape(n, cfg.cols)

    def _vector(self, instr: Instruction) -> None:
        cfg, op, obuf = self.config, instr.op, self.buffers[Buffer.OBUF]
        if op in NONLINEAR_OPS:
            self._nonlinear(instr)
            return
        n, dst = instr["n"], instr["dst"]
        a = obuf[instr["a"]:instr["a"] + n]
        low, high = _DATA_DTYPES[cfg.data_bits].value_range
        if op is Opcode.VADD:
            obuf[dst:dst + n] = np.clip(a + obuf[instr["b"]:instr["b"] + n], low, high)
        elif op is Opcode.VMUL:
            shift = instr["shift"]
            product = a * obuf[instr["b"]:instr["b"] + n]
            obuf[dst:dst + n] = np.clip((product + ((1 << shift) >> 1)) >> shift, low, high)
        elif op is Opcode.VRELU:
            obuf[dst:dst + n] = np.maximum(a, 0)
        elif op is Opcode.VMAX:
            obuf[dst] = a.max()
        elif op is Opcode.VSUM:
            self.buffers[Buffer.PBUF][dst] = wrap(np.array(a.sum()), cfg.acc_bits)


def simulate(program, config: AccelConfig, dram: np.ndarray | bytes = b"", *,
             max_cycles: int | None = None) -> tuple[Machine, Stats]:
    """Run `program` from a DRAM image; returns the final machine state and the stats.
    Raises `SimulationError` (naming the instruction) for a program that reads or writes out
    of range, deadlocks on its tokens, races, or runs past `max_cycles`."""
    try:
        check_program(program, config)
    except ValueError as e:
        raise SimulationError(str(e)) from None
    machine = Machine(config, dram)
    stats = Stats()
    free_at = {u: 0 for u in Unit}  # first cycle each unit may issue again
    last_end = 0  # the latest end of any instruction so far
    signals: dict[Token, list[int]] = {t: [] for t in Token}  # cycles signals become visible
    taken = Counter()  # tokens consumed so far
    in_flight: list[tuple[int, Unit, tuple, int]] = []  # (end, unit, accesses, pc)
    t = FETCH_CYCLES
    for pc, instr in enumerate(program):
        where = f"instruction {pc} ({instr.text()})"
        issue = max(t, last_end) if instr.op is Opcode.HALT else max(t, free_at[instr.unit])
        for token in Token:
            if instr.wait >> token & 1:
                available = signals[token]
                if len(available) <= taken[token]:
                    raise SimulationError(f"{where}: deadlock, it waits for token {token.name.lower()} "
                                          "that no earlier instruction signals")
                issue = max(issue, available[taken[token]])
        if max_cycles is not None and issue >= max_cycles:
            raise SimulationError(f"{where}: cycle limit {max_cycles} reached")
        for token in Token:
            if instr.wait >> token & 1:
                taken[token] += 1
        end = issue + instr.duration(config)
        last_end = max(last_end, end)
        accesses = instr.accesses(config)
        in_flight = [f for f in in_flight if f[0] > issue]
        for other_end, unit, other, other_pc in in_flight:
            if unit is not instr.unit and (clash := _clash(accesses, other)):
                raise SimulationError(f"{where}: race on {clash} with instruction {other_pc} "
                                      f"({program[other_pc].text()}), which runs until cycle {other_end}")
        in_flight.append((end, instr.unit, accesses, pc))
        for token in Token:
            if instr.signal >> token & 1:
                bisect.insort(signals[token], end)
                if len(signals[token]) - taken[token] >= 1 << TOKEN_BITS:
                    raise SimulationError(f"{where}: token {token.name.lower()} overflows its counter")
        try:
            machine.execute(instr)
        except (SimulationError, ValueError) as e:  # ValueError: constants outside a reference op's range
            raise SimulationError(f"{where}: {e}") from None
        occupied = instr.occupancy(config)
        free_at[instr.unit] = issue + occupied
        stats.instructions[instr.mnemonic] += 1
        stats.busy[instr.unit.value] += occupied
        stats.schedule.append((issue, end))
        if instr.op in ARRAY_OPS:
            stats.macs += instr.steps() * config.pes
        if instr.op is Opcode.HALT:
            stats.cycles = issue + 1
            return machine, stats
        t = issue + 1
    raise SimulationError("the program does not end with halt")  # check_program rules this out


def _clash(mine: tuple, other: tuple) -> str | None:
    for space, first, end, writes in mine:
        for space2, first2, end2, writes2 in other:
            if space == space2 and (writes or writes2) and first < end2 and first2 < end:
                return f"{space} [{max(first, first2)}, {min(end, end2)})"
    return None
