"""Accelerator programs for the RTL tests: a tiled GEMM (loads of A/B tiles and parameter groups,
split-K gemm, requant, stores, tokens so loads overlap compute), vector-op programs and random
mixed programs. Each builder returns a `Case`: program, DRAM image and where the results lie."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.isa import (Buffer, Instruction, Opcode, Token, pack_words, sparse_stream, unpack_words,
                                    wrap)
from tcc.ir.dtypes import DType
from tcc.ir.reference import REFERENCE

_DTYPES = {4: DType.I4, 8: DType.I8, 16: DType.I16}


@dataclass
class Case:
    program: tuple[Instruction, ...]
    dram: np.ndarray  # uint8, the DRAM image
    output: tuple[int, int]  # DRAM words [first, end) holding the results
    expected: np.ndarray | None = None  # the numpy reference of the results, where there is one
    config: AccelConfig | None = None

    def results(self, dram: np.ndarray) -> np.ndarray:
        """The OBUF-layout words of the output region as [words, cols] lanes."""
        cfg = self.config
        beats, word = cfg.beats(Buffer.OBUF), cfg.dram_bits // 8
        first, end = self.output
        data = np.asarray(dram[first * word:end * word], np.uint8).reshape(-1, beats * word)
        return unpack_words(data, cfg.cols, cfg.data_bits)


class _Dram:
    """Allocates DRAM words and packs buffer words into them."""

    def __init__(self, config: AccelConfig):
        self.cfg = config
        self.word = config.dram_bits // 8
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.end = 0

    def put(self, buf: Buffer, lanes: np.ndarray) -> int:
        """Append buffer words ([n, lanes]) and return their first DRAM word."""
        beats = self.cfg.beats(buf)
        data = pack_words(np.asarray(lanes, np.int64), self.cfg.lane_bits(buf), beats * self.word)
        first = self.end
        self.chunks.append((first, data.reshape(-1)))
        self.end += len(lanes) * beats
        return first

    def reserve(self, buf: Buffer, count: int) -> int:
        first = self.end
        self.end += count * self.cfg.beats(buf)
        return first

    def image(self) -> np.ndarray:
        out = np.zeros(self.end * self.word, np.uint8)
        for first, data in self.chunks:
            out[first * self.word:first * self.word + len(data)] = data
        return out


def params(config: AccelConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random requant parameters for `n` output channels: bias, multiplier, shift."""
    hi = 1 << min(config.acc_bits - 2, 20)
    bias = rng.integers(-hi, hi, n)
    mult = rng.integers(1, 1 << min(config.acc_bits - 1, 16), n)
    shift = rng.integers(4, 24, n)
    return bias, mult, shift


def requantize(config: AccelConfig, acc: np.ndarray, bias, mult, shift, relu: bool) -> np.ndarray:
    out = REFERENCE["requantize"](wrap(acc + bias, config.acc_bits), mult, shift, dtype=_DTYPES[config.data_bits],
                                  scale=1.0, zero_point=0).astype(np.int64)
    return np.maximum(out, 0) if relu else out


def gemm_case(config: AccelConfig, m: int, k: int, n: int, *, rng: np.random.Generator, k_chunk: int | None = None,
              relu: bool = False, store_late: bool = False) -> Case:
    """Y = requant(A @ B + bias) for A [m, k], B [k, n] int `data_bits`, tiled on the array:
    ABUF/BBUF double-buffered in chunks of `k_chunk` (split-K with acc=1), OBUF double-buffered
    per output tile (accumulator bank = tile % 2, so a tile's requant overlaps the next tile's
    gemms), tokens LD2AR/AR2LD between loads and gemms, AR2VE/VE2AR between gemms and requants,
    VE2ST/ST2VE between requants and stores (`store_late`: a tile's store comes after the next
    tile's first gemm)."""
    cfg = config
    R, C = cfg.rows, cfg.cols
    lo, hi = _DTYPES[cfg.data_bits].value_range
    a = rng.integers(lo, hi + 1, (m, k))
    b = rng.integers(lo, hi + 1, (k, n))
    bias, mult, shift = params(cfg, n, rng)
    kc = k_chunk or min(k, cfg.abuf_depth // 2, cfg.bbuf_depth // 2)
    mt, nt, kt = math.ceil(m / R), math.ceil(n / C), math.ceil(k / kc)
    if 2 * kc > min(cfg.abuf_depth, cfg.bbuf_depth) or 2 * R > cfg.obuf_depth or 3 * nt > cfg.pbuf_depth:
        raise ValueError("the GEMM's tiles do not fit the buffers")

    dram = _Dram(cfg)
    a_pad = np.zeros((mt * R, k), np.int64)
    a_pad[:m] = a
    b_pad = np.zeros((k, nt * C), np.int64)
    b_pad[:, :n] = b
    a_at = {(i, j): dram.put(Buffer.ABUF, a_pad[i * R:(i + 1) * R, j * kc:(j + 1) * kc].T)
            for i in range(mt) for j in range(kt)}
    b_at = {(i, j): dram.put(Buffer.BBUF, b_pad[j * kc:(j + 1) * kc, i * C:(i + 1) * C])
            for i in range(nt) for j in range(kt)}
    p = np.zeros((3 * nt, C), np.int64)
    for i in range(nt):
        for row, values in enumerate((bias, mult, shift)):
            chunk = values[i * C:(i + 1) * C]
            p[3 * i + row, :len(chunk)] = chunk
    p_at = dram.put(Buffer.PBUF, p)
    y_at = dram.reserve(Buffer.OBUF, mt * nt * R)

    steps = [(i, j, s) for i in range(mt) for j in range(nt) for s in range(kt)]
    prog: list[Instruction] = [Instruction.make(Opcode.LOAD, buf=Buffer.PBUF, addr=0, count=3 * nt, dram=p_at)]

    def load(s: int) -> None:
        i, j, c = steps[s]
        count = min(kc, k - c * kc)
        slot = (s % 2) * kc
        wait = (Token.AR2LD,) if s >= 2 else ()
        prog.append(Instruction.make(Opcode.LOAD, wait=wait, buf=Buffer.ABUF, addr=slot, count=count, dram=a_at[i, c]))
        prog.append(Instruction.make(Opcode.LOAD, signal=(Token.LD2AR,), buf=Buffer.BBUF, addr=slot, count=count,
                                     dram=b_at[j, c]))

    load(0)
    if len(steps) > 1:
        load(1)
    tile = 0
    pending_store: Instruction | None = None
    for s, (i, j, c) in enumerate(steps):
        count = min(kc, k - c * kc)
        slot = (s % 2) * kc
        wait = (Token.LD2AR, Token.VE2AR) if c == 0 and tile >= 2 else (Token.LD2AR,)
        signal = (Token.AR2LD, Token.AR2VE) if c == kt - 1 else (Token.AR2LD,)
        prog.append(Instruction.make(Opcode.GEMM, wait=wait, signal=signal, a=slot, b=slot, k=count, acc=int(c > 0),
                                     bank=tile % 2))
        if pending_store is not None:
            prog.append(pending_store)
            pending_store = None
        if s + 2 < len(steps):
            load(s + 2)
        if c == kt - 1:
            oslot = (tile % 2) * R
            prog.append(Instruction.make(Opcode.REQUANT, wait=(Token.AR2VE, Token.ST2VE) if tile >= 2 else
                                         (Token.AR2VE,), signal=(Token.VE2ST, Token.VE2AR), dst=oslot, param=3 * j,
                                         relu=int(relu), bank=tile % 2))
            store = Instruction.make(Opcode.STORE, wait=(Token.VE2ST,), signal=(Token.ST2VE,), buf=Buffer.OBUF,
                                     addr=oslot, count=R, dram=y_at + (i * nt + j) * R * cfg.beats(Buffer.OBUF))
            if store_late:
                pending_store = store
            else:
                prog.append(store)
            tile += 1
    if pending_store is not None:
        prog.append(pending_store)
    prog.append(Instruction.make(Opcode.HALT))

    acc = wrap(a @ b, cfg.acc_bits)
    expected = requantize(cfg, acc, bias, mult, shift, relu)
    return Case(tuple(prog), dram.image(), (y_at, y_at + mt * nt * R * cfg.beats(Buffer.OBUF)), expected, cfg)


def gemm_results(case: Case, dram: np.ndarray, m: int, n: int) -> np.ndarray:
    """The [m, n] result matrix out of the tiles stored by `gemm_case`."""
    cfg = case.config
    R, C = cfg.rows, cfg.cols
    mt, nt = math.ceil(m / R), math.ceil(n / C)
    words = case.results(dram).reshape(mt, nt, R, C)
    return words.transpose(0, 2, 1, 3).reshape(mt * R, nt * C)[:m, :n]


def vector_case(config: AccelConfig, ops: list[tuple], *, rng: np.random.Generator, words: int) -> Case:
    """Load `words` OBUF words of random lanes, run `ops` ((opcode, dst, a, b, n, shift) with
    OBUF word indices; vsum's dst a PBUF word) and store OBUF and the PBUF words touched."""
    cfg = config
    lo, hi = _DTYPES[cfg.data_bits].value_range
    dram = _Dram(cfg)
    src = dram.put(Buffer.OBUF, rng.integers(lo, hi + 1, (words, cfg.cols)))
    out = dram.reserve(Buffer.OBUF, cfg.obuf_depth)
    pout = dram.reserve(Buffer.PBUF, cfg.pbuf_depth)
    prog = [Instruction.make(Opcode.LOAD, signal=(Token.LD2VE,), buf=Buffer.OBUF, addr=0, count=words, dram=src)]
    for i, (op, dst, a, b, n, shift) in enumerate(ops):
        wait = (Token.LD2VE,) if i == 0 else ()
        fields = {"dst": dst, "a": a, "n": n}
        if op in (Opcode.VADD, Opcode.VMUL):
            fields["b"] = b
        if op is Opcode.VMUL:
            fields["shift"] = shift
        prog.append(Instruction.make(op, wait=wait, signal=(Token.VE2ST,) if i == len(ops) - 1 else (), **fields))
    wait = (Token.VE2ST,) if ops else ()
    prog.append(Instruction.make(Opcode.STORE, wait=wait, buf=Buffer.OBUF, addr=0, count=cfg.obuf_depth, dram=out))
    prog.append(Instruction.make(Opcode.STORE, buf=Buffer.PBUF, addr=0, count=cfg.pbuf_depth, dram=pout))
    prog.append(Instruction.make(Opcode.HALT))
    return Case(tuple(prog), dram.image(), (out, out + cfg.obuf_depth * cfg.beats(Buffer.OBUF)), None, cfg)


def random_case(config: AccelConfig, rng: np.random.Generator, length: int, chain: float = 0.7) -> Case:
    """A random mix of every instruction over small buffer ranges (no vector ops for a config
    without the vector unit). Instruction i waits on a token instruction i-1 signals with
    probability `chain` (token chosen at random), so units overlap; programs with races are
    for the caller to filter out (the ISA simulator rejects them). PBUF words [0, 3) and
    [3, 6) hold valid requant groups once loaded."""
    cfg = config
    lo, hi = _DTYPES[cfg.data_bits].value_range
    dram = _Dram(cfg)
    span = 8
    lanes = {b: rng.integers(lo, hi + 1, (span, cfg.lanes(b))) for b in Buffer}
    lanes[Buffer.BBUF][:, 0] = rng.integers(0, 4, span)  # spgemm's skips (lane 0 div bw): small, mostly in range
    lanes[Buffer.PBUF] = np.concatenate([np.stack(params(cfg, cfg.cols, rng)) for _ in range(2)])
    regions = {b: dram.put(b, lanes[b]) for b in Buffer}
    out = dram.reserve(Buffer.PBUF, 2 * span)  # room for stores of any buffer
    depth = {b: cfg.buffer_depth(b) for b in Buffer}
    prog: list[Instruction] = [Instruction.make(Opcode.LOAD, buf=Buffer.PBUF, addr=0, count=6, dram=regions[Buffer.PBUF])]
    prev_signal = None
    for _ in range(length):
        kinds = ["load", "store", "gemm", "requant"] + ["vec"] * cfg.vector_unit + ["spgemm"] * cfg.sparse_unit \
            + ["bgemm"] * cfg.binary_unit + ["tload"] * (cfg.rows == cfg.cols) + ["spload"] * cfg.sparse_unit
        kind = rng.choice(kinds)
        if kind == "spload":  # a block or two expanded from the BBUF region's words (any words are a stream)
            limit = min(cfg.abuf_banks, 1 << cfg.data_bits - 1)
            bw = 1 << int(rng.integers(0, limit.bit_length()))
            nnz = int(rng.integers(1, min(bw, 3) + 1))
            steps = nnz * int(rng.integers(1, 3))
            count = len(sparse_stream(steps, nnz, bw, cfg.cols, cfg.data_bits))
            if count > span or 2 * steps > depth[Buffer.BBUF]:
                continue
            instr = dict(op=Opcode.SPLOAD, buf=Buffer.BBUF,
                         addr=2 * int(rng.integers(0, (depth[Buffer.BBUF] - 2 * steps) // 2 + 1)), count=count,
                         dram=regions[Buffer.BBUF] + int(rng.integers(0, span - count + 1)) * cfg.beats(Buffer.BBUF),
                         steps=steps, nnz=nnz, bw=bw)
        elif kind == "tload":  # a tile or two, source words anywhere in the buffer's region (step 0 repeats one)
            buf = Buffer(int(rng.choice([Buffer.ABUF, Buffer.BBUF])))
            side, beats = cfg.lanes(buf), cfg.beats(buf)
            count = int(rng.integers(1, min(2, depth[buf] // side) + 1))
            step = int(rng.integers(0, 3)) * beats
            stride = int(rng.integers(0, 3)) * beats
            reach = (count - 1) * stride + (side - 1) * step + beats
            instr = dict(op=Opcode.TLOAD, buf=buf, addr=int(rng.integers(0, depth[buf] - count * side + 1)), count=count,
                         dram=regions[buf] + int(rng.integers(0, max(1, span * beats - reach + 1))), step=step,
                         stride=stride)
        elif kind == "load":
            buf = Buffer(int(rng.choice([Buffer.ABUF, Buffer.BBUF, Buffer.OBUF])))
            count = int(rng.integers(1, min(span, depth[buf]) + 1))
            instr = dict(op=Opcode.LOAD, buf=buf, addr=int(rng.integers(0, depth[buf] - count + 1)), count=count,
                         dram=regions[buf] + int(rng.integers(0, span - count + 1)) * cfg.beats(buf))
        elif kind == "store":  # contiguous, or strided (sstore) over the output room
            buf = Buffer(int(rng.integers(0, 4)))
            count = int(rng.integers(1, min(span, depth[buf]) + 1))
            instr = dict(op=Opcode.STORE, buf=buf, addr=int(rng.integers(0, depth[buf] - count + 1)), count=count,
                         dram=out + int(rng.integers(0, span)) * cfg.beats(Buffer.PBUF) // 2)
            if rng.random() < 0.3:
                instr.update(op=Opcode.SSTORE, count=min(count, 3), dram=out, step=int(rng.integers(1, 4)) * cfg.beats(buf))
        elif kind in ("gemm", "bgemm"):
            kk = int(rng.integers(1, min(depth[Buffer.ABUF], depth[Buffer.BBUF], 6) + 1))
            instr = dict(op=Opcode.GEMM if kind == "gemm" else Opcode.BGEMM,
                         a=int(rng.integers(0, depth[Buffer.ABUF] - kk + 1)),
                         b=int(rng.integers(0, depth[Buffer.BBUF] - kk + 1)), k=kk, acc=int(rng.integers(0, 2)),
                         bank=int(rng.integers(0, 2)))
        elif kind == "spgemm":
            limit = min(cfg.abuf_banks, 1 << cfg.data_bits - 1, depth[Buffer.ABUF])
            bw = 1 << int(rng.integers(0, limit.bit_length()))
            blocks = int(rng.integers(1, min(3, depth[Buffer.ABUF] // bw) + 1))
            nnz = int(rng.integers(1, bw + 1))
            if 2 * blocks * nnz > depth[Buffer.BBUF]:
                continue
            a = bw * int(rng.integers(0, depth[Buffer.ABUF] // bw - blocks + 1))
            instr = dict(op=Opcode.SPGEMM, a=a, b=2 * int(rng.integers(0, (depth[Buffer.BBUF] - 2 * blocks * nnz) // 2 + 1)),
                         blocks=blocks, nnz=nnz, bw=bw, span=min(depth[Buffer.ABUF] - a, (4 * blocks - 3) * bw) // bw * bw,  # skips up to 3
                         acc=int(rng.integers(0, 2)), bank=int(rng.integers(0, 2)))
        elif kind == "requant":
            instr = dict(op=Opcode.REQUANT, dst=int(rng.integers(0, depth[Buffer.OBUF] - cfg.rows + 1)),
                         param=3 * int(rng.integers(0, 2)), relu=int(rng.integers(0, 2)), bank=int(rng.integers(0, 2)))
        else:
            op = Opcode(int(rng.choice([Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VMAX, Opcode.VSUM])))
            n = int(rng.integers(1, min(4, depth[Buffer.OBUF]) + 1))
            a = int(rng.integers(0, depth[Buffer.OBUF] - n + 1))
            b = int(rng.integers(0, depth[Buffer.OBUF] - n + 1))
            if op is Opcode.VSUM:
                dst = int(rng.integers(6, depth[Buffer.PBUF])) if depth[Buffer.PBUF] > 6 else None
                if dst is None:
                    continue
            elif op is Opcode.VMAX:
                dst = int(rng.integers(0, depth[Buffer.OBUF]))
            else:
                # a streaming unit: no destination inside (a, a+n) or (b, b+n) (see the report)
                choices = [d for d in range(depth[Buffer.OBUF] - n + 1)
                           if not (a < d < a + n) and not (op in (Opcode.VADD, Opcode.VMUL) and b < d < b + n)]
                dst = int(rng.choice(choices))
            instr = dict(op=op, dst=dst, a=a, n=n)
            if op in (Opcode.VADD, Opcode.VMUL):
                instr["b"] = b
            if op is Opcode.VMUL:
                instr["shift"] = int(rng.integers(0, 64))
        op = instr.pop("op")
        wait = ()
        if prev_signal is not None:
            wait = (prev_signal,)
        signal = ()
        prev_signal = None
        if rng.random() < chain:
            prev_signal = Token(int(rng.integers(0, len(Token))))
            signal = (prev_signal,)
        prog.append(Instruction.make(op, wait=wait, signal=signal, **instr))
    prog.append(Instruction.make(Opcode.HALT, wait=(prev_signal,) if prev_signal is not None else ()))
    return Case(tuple(prog), dram.image(), (out, out + 2 * span * cfg.beats(Buffer.PBUF)), None, cfg)
