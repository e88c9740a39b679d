"""The accelerator's ISA, defined once: opcodes, fields, widths, binary and assembly forms,
which unit runs each instruction, its timing and the memory it touches. The assembler, the
codegen, the ISA simulator and the PyRTL decoder all import it.

Instructions are 128-bit words: the `OPCODE` field, the `HEADER` fields (`wait`: the tokens
the instruction waits for; `signal`: those it signals when it ends), then the fields `FORMATS`
places per opcode.

Four units run concurrently: `load` (DRAM -> buffer), `array` (the systolic array: gemm,
spgemm, bgemm, wgemm), `vector` (requant and the vector ops) and `store` (buffer -> DRAM). One
instruction issues per cycle, in order, from cycle `FETCH_CYCLES` on, once its unit is free
and every token it waits for has a count above zero (issuing takes one of each). An
instruction issued in cycle t occupies its unit for `Instruction.occupancy` cycles (the unit
is free again from t + occupancy) and ends at t + `Instruction.duration`; a token it signals
counts from that cycle on (units signalling one token in the same cycle add up). Only the
array ends later than it frees its unit: its operands move through the array for
`rows + cols - 2` more cycles, so the next array instruction streams in right behind the
previous one (the drain overlaps it). `halt` issues once every instruction has ended; the run
takes its cycle + 1. The nine tokens carry the hand-offs between units (`HANDOFF`), `st2ld`
among them: a load of DRAM words a store wrote (one layer's output read by the next in the
same program), or into a buffer slot a store still reads.

The accumulators come in two banks (`bank`): the array fills one while the vector unit
requantizes the other.

Semantics (lanes are two's complement, lane `j` of a word at bits `[j*w, (j+1)*w)`):
- `load buf addr count dram`: buffer words `addr..addr+count-1` <- DRAM; buffer word `i`
  is read from DRAM words `dram + i*beats ...` (low bits first, see `AccelConfig.beats`).
- `store buf addr count dram`: the reverse; bits above the buffer word are written as zero.
- `sstore buf addr count dram step`: the strided store, buffer word `i` to DRAM words from
  `dram + i*step` (one row block's words of a channel block into a rows layout).
- `tload buf addr count dram step stride` (the transposing load, ABUF or BBUF of a square
  array, `L` = its lanes): `count` tiles of `L x L` lanes; tile `t` is `L` source words of
  `buf`'s form, word `i` at DRAM `dram + t*stride + i*step` (`beats` DRAM words each), and
  lands transposed: lane `i` of buffer word `addr + t*L + j` <- lane `j` of source word `i`.
  One layer's output tiles (`OBUF` words: a row's lanes) become the next one's operand words
  (a column's lanes) without leaving the accelerator: `step` and `stride` walk an output's
  layout (rows: `step` the row's words; outputs: `stride` a channel block's).
- `spload buf addr count dram steps nnz bw` (BBUF only; the HP weight stream, compact):
  `count` stream words (BBUF words, `beats` DRAM words each, from `dram`) expand into the
  `steps` step pairs spgemm reads, weight word `V_s` at BBUF `addr + 2s` and index word `X_s`
  at `addr + 2s + 1`. Index words are a bit stream (word after word, lane after lane, low bits
  first) holding per step its `cols` local indices of `ib = log2(bw)` bits, and after a block's
  last step (every `nnz`-th) that block's skip in `data_bits - ib` bits; `X_s` lane c is step
  s's index c, lane 0 of a block's last step with the skip above it (`index + bw * skip`).
  The stream holds each step's weight word, preceded by an index word whenever fewer bits are
  left than the step takes (`sparse_stream`), so the indices cost `ib` bits a value, not a lane.
  Occupies the load unit as a load of `count` words.
- `gemm a b k acc bank`: `ACC[bank][r, c] (+)= sum_i ABUF[a+i][r] * BBUF[b+i][c]` for
  `i < k`, in `acc_bits` (wrapping); `acc = 0` starts from zero. Occupies the array `k` cycles.
- `spgemm a b blocks nnz bw span acc bank` (the HP sparse unit): `blocks` blocks of `bw`
  activation words, `nnz` steps each, within ABUF words `a .. a+span`. Step `i = j*nnz + t`
  of block `j` reads the weights `V = BBUF[b + 2i]` and the local column indices
  `X = BBUF[b + 2i + 1]`, and `ACC[bank][r, c] (+)= ABUF[w_j + (X[c] mod bw)][r] * V[c]`.
  Block 0's window starts at `w_0 = a`; after block `j` it moves on by `bw * (1 + skip_j)`,
  `skip_j = X[0] div bw` of the block's last step (lane 0 read as an unsigned `data_bits`
  number): the pruned blocks between two kept ones cost no step and no instruction. Every
  window lies within `span` (else the program is wrong). Each column gathers its own
  activation word from the window (the window's `bw` words lie in `bw` different ABUF banks,
  read in one cycle). `bw` is a power of two of at most `abuf_banks` and `2^(data_bits-1)`;
  `a` and `span` multiples of `bw`, `span >= blocks * bw`; `b` even (BBUF's two banks give a
  weight word and an index word per cycle). Occupies the array `blocks * nnz` cycles.
- `bgemm a b k acc bank` (the binary unit): each lane's `data_bits` bits are that many
  binary values (bit set: +1, clear: -1); `ACC[bank][r, c] (+)= sum_i (2 *
  popcount(XNOR(ABUF[a+i][r], BBUF[b+i][c])) - data_bits)`: XNOR-popcount, `data_bits`
  binary MACs per PE and cycle. Occupies the array `k` cycles.
- `wgemm a b k acc bank` (the W1A8 unit, `G = binary_weight_group`): binary weights and
  `data_bits` activations, G of them a PE and cycle, added or subtracted (no multiplier):
  `ACC[bank][r, c] (+)= sum_i sum_j (bit j of BBUF[b+i][c] ? +1 : -1) * ABUF[a + i*G + j][r]`
  for `i < k`, `j < G`: step i reads the G activation words from `a + i*G` (one per ABUF bank:
  `a` a multiple of G) and one weight word, whose lane c holds column c's G signs (bit set:
  +1). Occupies the array `k` cycles: a layer of K inputs takes K / G steps.
- `requant dst param relu bank`: for each row `r`, `OBUF[dst+r] = requantize(ACC[bank][r] +
  PBUF[param], PBUF[param+1], PBUF[param+2])` to `data_bits` (the IR's `requantize` op),
  then max(., 0) if `relu`. Takes `rows` cycles on the vector unit.
- `vadd / vmul dst a b n shift`: `OBUF[dst+i] = sat(OBUF[a+i] + OBUF[b+i])` or
  `sat((OBUF[a+i] * OBUF[b+i] + 2^(shift-1)) >> shift)`; `vrelu dst a n`: max(OBUF[a+i], 0);
  `vmax dst a n`: every lane of `OBUF[dst]` = the max over the lanes of `OBUF[a..a+n-1]`;
  `vsum dst a n`: every lane of `PBUF[dst]` = their sum (wrapping in `acc_bits`). `n` cycles.
  The unit streams a word per cycle, so `dst` may equal a source but not lie inside one.
- The integer nonlinearities, each exactly its IR op (`ir/reference.py`, defined there once);
  a row is `n` consecutive words whose first `len` lanes (in lane order, word after word)
  hold the values; constant `i` of an instruction is lane 0 of `PBUF[param + i]`:
  - `vacc dst stride bank`: `PBUF[dst + r*stride] = ACC[bank][r]` for each row r (raw
    accumulators, e.g. attention scores); `rows` cycles.
  - `vsoftmax dst a n len param masked mask`: `OBUF[dst...] = int_softmax(PBUF[a...])` over
    the row (constants multiplier, shift, ln2, b, c, out_bits; lanes past `len` give 0); with
    `masked`, over the lanes whose lane in `PBUF[mask...]` is non-zero (the IR's mask: the
    others give 0, a row with none gives zeros); three passes over the row and a division:
    `3n + 6 + D` cycles (a mask word is read beside each row word; `D = 64 / divider_steps`,
    the divider's cycles: `3n + 38` at the default 2 steps a cycle).
  - `vlayernorm dst a n len param`: `OBUF[dst...] = int_layer_norm(PBUF[a...])` to
    `data_bits` (constants eps, shift; then `n` words of per-channel weights and `2n` of
    biases, low `acc_bits` bits then high); `6n + 3 + 2D + Q` cycles (three passes over the
    row, the last also reading its weights and both bias halves; two divisions, a square root
    of `Q = ceil(31 / divider_steps)` cycles: `6n + 83` at 2 steps a cycle).
  - `vgelu dst a n param`: `OBUF[dst+i] = int_gelu(OBUF[a+i])` to `data_bits` lane by lane
    (constants multiplier, shift, clip, one, out_multiplier, out_shift); `n + 8` cycles.
  - `vresadd dst a b n param wide`: the residual add, `PBUF[dst+i] = rq(rq(OBUF[a+i]; m_a,
    s_a) + rq(B[b+i]; m_b, s_b); m, s)` (rq: `requantize`, to i32 inside, to `out_bits` at the
    end; constants m_a, s_a, m_b, s_b, m, s, out_bits); B is OBUF, or with `wide` PBUF (a
    pre-norm residual stream, wider than `data_bits`, kept in `acc_bits` lanes); `n + 8` cycles.

A config may leave units out (`AccelConfig.vector_unit`, `sparse_unit`, `binary_unit`,
`nonlinear_unit`):
programs using their opcodes are refused (`Instruction.problem`); requant is there in every
config (it is the array's output path).
"""

from __future__ import annotations

import functools
import math
import re
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Callable

import numpy as np

from .config import AccelConfig, Buffer

INSTRUCTION_BITS = 128
FETCH_CYCLES = 1  # the program memory is read synchronously: instruction 0 issues in cycle 1
TOKEN_BITS = 8  # each token counter holds 0..255
MAGIC = b"TCCACCEL"
VERSION = 4  # 4: nine tokens (st2ld), the wait and signal masks 9 bits wide


class SimulationError(RuntimeError):
    """A program that cannot run, from any simulator of this ISA: out of range, deadlocked,
    racing, or over its cycle limit."""


class Opcode(IntEnum):
    HALT = 0
    LOAD = 1
    STORE = 2
    GEMM = 3
    REQUANT = 4
    VADD = 5
    VMUL = 6
    VRELU = 7
    VMAX = 8
    VSUM = 9
    SPGEMM = 10
    BGEMM = 11
    VACC = 12
    VSOFTMAX = 13
    VLAYERNORM = 14
    VGELU = 15
    VRESADD = 16
    TLOAD = 17
    SSTORE = 18
    SPLOAD = 19
    WGEMM = 20


class Token(IntEnum):
    """The nine token counters, named for the hand-off they carry (`HANDOFF`)."""
    LD2AR = 0  # operands loaded, the array may read them
    AR2LD = 1  # the array is done with a buffer slot, load may overwrite it
    LD2VE = 2  # loaded, the vector unit may read it
    VE2LD = 3  # the vector unit is done with a slot, load may overwrite it
    AR2VE = 4  # accumulators full, the vector unit may requantize them
    VE2AR = 5  # accumulators read, the array may overwrite them
    VE2ST = 6  # results ready, store may write them out
    ST2VE = 7  # results stored, the vector unit may overwrite them
    ST2LD = 8  # stored to DRAM (or a buffer slot read out), load may read it (or overwrite the slot)


class Unit(Enum):
    """The four units that run concurrently, each one instruction at a time (`UNITS`)."""
    LOAD = "load"
    ARRAY = "array"
    VECTOR = "vector"
    STORE = "store"


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int


OPCODE = Field("opcode", 0, 8)
HEADER = (Field("wait", 8, 9), Field("signal", 17, 9))  # in every instruction, after the opcode
_DMA = (Field("buf", 26, 2), Field("addr", 32, 16), Field("count", 48, 16), Field("dram", 64, 32))
_VEC = (Field("dst", 32, 16), Field("a", 48, 16), Field("b", 64, 16), Field("n", 80, 16), Field("shift", 96, 6))
_GEMM = (Field("a", 32, 16), Field("b", 48, 16), Field("k", 64, 16), Field("acc", 80, 1), Field("bank", 81, 1))

FORMATS: dict[Opcode, tuple[Field, ...]] = {
    Opcode.HALT: (),
    Opcode.LOAD: _DMA,
    Opcode.STORE: _DMA,
    Opcode.TLOAD: (*_DMA, Field("step", 96, 16), Field("stride", 112, 16)),
    Opcode.SSTORE: (*_DMA, Field("step", 96, 16)),
    Opcode.SPLOAD: (*_DMA, Field("steps", 96, 16), Field("nnz", 112, 8), Field("bw", 120, 8)),
    Opcode.GEMM: _GEMM,
    Opcode.SPGEMM: (Field("a", 32, 16), Field("b", 48, 16), Field("blocks", 64, 16), Field("nnz", 80, 8),
                    Field("bw", 88, 8), Field("span", 104, 16), Field("acc", 96, 1), Field("bank", 97, 1)),
    Opcode.BGEMM: _GEMM,
    Opcode.WGEMM: _GEMM,
    Opcode.REQUANT: (Field("dst", 32, 16), Field("param", 48, 16), Field("relu", 64, 1), Field("bank", 65, 1)),
    Opcode.VACC: (Field("dst", 32, 16), Field("stride", 48, 16), Field("bank", 64, 1)),
    Opcode.VSOFTMAX: (*_VEC[:2], Field("n", 64, 16), Field("len", 80, 16), Field("param", 96, 16),
                      Field("masked", 26, 1), Field("mask", 112, 16)),
    Opcode.VLAYERNORM: (*_VEC[:2], Field("n", 64, 16), Field("len", 80, 16), Field("param", 96, 16)),
    Opcode.VGELU: (*_VEC[:2], Field("n", 64, 16), Field("param", 80, 16)),
    Opcode.VRESADD: (*_VEC[:4], Field("param", 96, 16), Field("wide", 112, 1)),
    Opcode.VADD: _VEC[:4],
    Opcode.VMUL: _VEC,
    Opcode.VRELU: (_VEC[0], _VEC[1], _VEC[3]),
    Opcode.VMAX: (_VEC[0], _VEC[1], _VEC[3]),
    Opcode.VSUM: (_VEC[0], _VEC[1], _VEC[3]),
}

# the buffer each address field points into, by opcode (`Instruction.relocated` moves them):
# a `Buffer`, "buf" (the one its `buf` field names), "wide" (PBUF with wide=1, else OBUF) or
# "masked" (PBUF, only with masked=1)
ADDRESSES: dict[Opcode, tuple[tuple[str, Buffer | str], ...]] = {
    **{op: (("addr", "buf"),) for op in (Opcode.LOAD, Opcode.STORE, Opcode.TLOAD, Opcode.SSTORE)},
    Opcode.SPLOAD: (("addr", Buffer.BBUF),),
    **{op: (("a", Buffer.ABUF), ("b", Buffer.BBUF)) for op in (Opcode.GEMM, Opcode.SPGEMM, Opcode.BGEMM,
                                                               Opcode.WGEMM)},
    Opcode.REQUANT: (("dst", Buffer.OBUF), ("param", Buffer.PBUF)),
    Opcode.VACC: (("dst", Buffer.PBUF),),
    Opcode.VSOFTMAX: (("dst", Buffer.OBUF), ("a", Buffer.PBUF), ("param", Buffer.PBUF), ("mask", "masked")),
    Opcode.VLAYERNORM: (("dst", Buffer.OBUF), ("a", Buffer.PBUF), ("param", Buffer.PBUF)),
    Opcode.VGELU: (("dst", Buffer.OBUF), ("a", Buffer.OBUF), ("param", Buffer.PBUF)),
    Opcode.VRESADD: (("dst", Buffer.PBUF), ("a", Buffer.OBUF), ("b", "wide"), ("param", Buffer.PBUF)),
    **{op: (("dst", Buffer.OBUF), ("a", Buffer.OBUF), ("b", Buffer.OBUF)) for op in (Opcode.VADD, Opcode.VMUL)},
    **{op: (("dst", Buffer.OBUF), ("a", Buffer.OBUF)) for op in (Opcode.VRELU, Opcode.VMAX)},
    Opcode.VSUM: (("dst", Buffer.PBUF), ("a", Buffer.OBUF)),
}
# what each field holds (the generated reference, docs/isa.md, lists them; `python docs/generate.py`):
# by field name, or by (opcode, name) where an opcode reads a field its own way
FIELD_DOCS: dict[str | tuple[Opcode, str], str] = {
    "opcode": "the instruction (`Opcode`)",
    "wait": "mask of the tokens (`Token`) it waits for; issuing takes one of each",
    "signal": "mask of the tokens it signals when it ends",
    "buf": "the buffer (`Buffer`; in assembly abuf, bbuf, obuf or pbuf)",
    "addr": "first buffer word",
    "count": "buffer words moved",
    "dram": "first DRAM word",
    "a": "first word of the first source",
    "b": "first word of the second source",
    "dst": "first word written",
    "n": "words per source, one a cycle (a row's words for vsoftmax and vlayernorm)",
    "k": "operand steps: ABUF and BBUF words read, one a cycle",
    "acc": "1: add to the accumulators; 0: start from zero",
    "bank": "the accumulator bank (0 or 1)",
    "shift": "right shift of each product, rounding half up",
    "param": "PBUF word of the first constant",
    "len": "lanes of the row that hold values",
    "masked": "1: keep only the lanes whose mask lane is non-zero (the others give 0)",
    "mask": "with masked=1, PBUF word of the row's first mask word (`n` words, read beside the row's)",
    "relu": "1: max(result, 0)",
    "wide": "1: the second source is PBUF's acc_bits lanes (a residual stream wider than data_bits); 0: OBUF",
    "stride": "PBUF words from one row to the next",
    "blocks": "kept blocks run by this instruction",
    "nnz": "steps per block: the weights' row_nnz",
    "bw": "block width: the words of each block's activation window",
    "span": "ABUF words from `a` that the blocks' windows may read",
    (Opcode.SPGEMM, "a"): "first ABUF word of block 0's window (a multiple of bw)",
    (Opcode.WGEMM, "a"): "first ABUF word (a multiple of binary_weight_group G): step i reads G words from a + i*G",
    (Opcode.WGEMM, "b"): "first BBUF word: step i's weight word, lane c's bit j the sign of column c's weight "
                         "for ABUF word a + i*G + j (set: +1)",
    (Opcode.WGEMM, "k"): "steps, one a cycle: G ABUF words and one BBUF word each",
    (Opcode.VRESADD, "b"): "first word of the second source (in OBUF, or with wide=1 in PBUF)",
    (Opcode.TLOAD, "buf"): "the buffer (abuf or bbuf; the array must be square)",
    (Opcode.TLOAD, "count"): "tiles moved: lanes(buf) buffer words each",
    (Opcode.TLOAD, "dram"): "DRAM word of tile 0's first source word",
    "step": "DRAM words from a tile's source word to the next",
    (Opcode.SSTORE, "step"): "DRAM words from one buffer word's first DRAM word to the next's",
    (Opcode.TLOAD, "stride"): "DRAM words from a tile's first source word to the next tile's",
    (Opcode.SPGEMM, "b"): "first BBUF word: weight words and index words alternate (even)",
    (Opcode.SPLOAD, "buf"): "bbuf (the only buffer spload fills)",
    (Opcode.SPLOAD, "addr"): "first BBUF word written (even): weight words and index words alternate, as spgemm reads them",
    (Opcode.SPLOAD, "count"): "stream words read (weight words and packed index words, `beats` DRAM words each)",
    (Opcode.SPLOAD, "steps"): "spgemm steps the stream expands to (whole blocks of `nnz`)",
    (Opcode.REQUANT, "dst"): "first OBUF word of the `rows` results",
    (Opcode.REQUANT, "param"): "PBUF word of the bias; the multiplier and the shift follow",
}

# the vector ALU's opcodes: a config may leave it out (`AccelConfig.vector_unit`); requant is
# the array's output path and always there
NONLINEAR_OPS = (Opcode.VACC, Opcode.VSOFTMAX, Opcode.VLAYERNORM, Opcode.VGELU, Opcode.VRESADD)
VECTOR_OPS = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VMAX, Opcode.VSUM) + NONLINEAR_OPS
DIVIDER_BITS, SQRT_STEPS = 64, 31  # the row ops' restoring division (quotient bits) and `_isqrt`'s steps


def divider_cycles(config: AccelConfig) -> int:
    """Cycles of one division of the vector unit (`divider_steps` quotient bits a cycle)."""
    return DIVIDER_BITS // config.divider_steps


def sqrt_cycles(config: AccelConfig) -> int:
    """Cycles of vlayernorm's square root (`divider_steps` of its steps a cycle)."""
    return math.ceil(SQRT_STEPS / config.divider_steps)


def passes(config: AccelConfig) -> dict[Opcode, tuple[int, int]]:
    """(cycles per word, fixed cycles) of the row and lane nonlinearities on `config`: the row
    ops' fixed cycles hold their divisions and square root."""
    div = divider_cycles(config)
    return {Opcode.VSOFTMAX: (3, 6 + div), Opcode.VLAYERNORM: (6, 3 + 2 * div + sqrt_cycles(config)),
            Opcode.VGELU: (1, 8), Opcode.VRESADD: (1, 8)}


PASSES = passes(AccelConfig())  # at the default divider: the table docs/isa.md shows
# the constants each reads
CONSTANTS = {Opcode.VSOFTMAX: 6, Opcode.VLAYERNORM: 2, Opcode.VGELU: 6, Opcode.VRESADD: 7}
ARRAY_OPS = (Opcode.GEMM, Opcode.SPGEMM, Opcode.BGEMM, Opcode.WGEMM)
# the config flag each optional unit's opcodes need
NEEDS: dict[Opcode, tuple[str, ...]] = ({op: ("vector_unit",) for op in VECTOR_OPS}
                                        | {op: ("vector_unit", "nonlinear_unit") for op in NONLINEAR_OPS}
                                        | {Opcode.SPGEMM: ("sparse_unit",), Opcode.SPLOAD: ("sparse_unit",),
                                   Opcode.BGEMM: ("binary_unit",), Opcode.WGEMM: ("binary_weight_group",)})

UNITS: dict[Opcode, Unit] = ({op: Unit.VECTOR for op in Opcode} | {op: Unit.ARRAY for op in ARRAY_OPS}
                             | {Opcode.LOAD: Unit.LOAD, Opcode.TLOAD: Unit.LOAD, Opcode.SPLOAD: Unit.LOAD,
                                Opcode.STORE: Unit.STORE, Opcode.SSTORE: Unit.STORE})
# the token carrying each hand-off (producer unit, consumer unit)
HANDOFF: dict[tuple[Unit, Unit], Token] = {
    (Unit.LOAD, Unit.ARRAY): Token.LD2AR, (Unit.ARRAY, Unit.LOAD): Token.AR2LD,
    (Unit.LOAD, Unit.VECTOR): Token.LD2VE, (Unit.VECTOR, Unit.LOAD): Token.VE2LD,
    (Unit.ARRAY, Unit.VECTOR): Token.AR2VE, (Unit.VECTOR, Unit.ARRAY): Token.VE2AR,
    (Unit.VECTOR, Unit.STORE): Token.VE2ST, (Unit.STORE, Unit.VECTOR): Token.ST2VE,
    (Unit.STORE, Unit.LOAD): Token.ST2LD}


def steps(op: Opcode, field: Callable[[str], int]) -> int:
    """An array instruction's cycles feeding the array (one operand step each), from its
    fields (`field(name)`)."""
    return field("blocks") * field("nnz") if op is Opcode.SPGEMM else field("k")


def occupancy(op: Opcode, field: Callable[[str], int], config: AccelConfig) -> int:
    """Cycles an instruction (`op`, its fields by `field(name)`) keeps its unit from issuing
    the next one (halt: 1): the ISA's timing, with `duration`. Addresses never matter."""
    if op in (Opcode.LOAD, Opcode.STORE, Opcode.SSTORE, Opcode.SPLOAD):
        return config.dram_latency + field("count") * config.beats(field("buf"))
    if op is Opcode.TLOAD:  # each tile's source words, then the last tile's columns written
        lanes = config.lanes(Buffer(field("buf")))
        return config.dram_latency + field("count") * lanes * config.beats(field("buf")) + lanes
    if op in ARRAY_OPS:
        return steps(op, field)
    if op in (Opcode.REQUANT, Opcode.VACC):
        return config.rows
    if op is Opcode.HALT:
        return 1
    per_word, fixed = _passes(config).get(op, (1, 0))
    return per_word * field("n") + fixed


@functools.lru_cache(maxsize=64)
def _passes(config: AccelConfig) -> dict[Opcode, tuple[int, int]]:  # the schedulers ask per instruction
    return passes(config)


def drain(op: Opcode, config: AccelConfig) -> int:
    """Cycles an instruction ends after its occupancy: the array's drain after its steps."""
    return config.rows + config.cols - 2 if op in ARRAY_OPS else 0


def duration(op: Opcode, field: Callable[[str], int], config: AccelConfig) -> int:
    """Cycles from an instruction's issue to its end: its tokens signal and its memory is free
    then."""
    return occupancy(op, field, config) + drain(op, config)


@dataclass(frozen=True)
class Instruction:
    """One instruction: `op`, its fields (`args`, in `FORMATS` order) and its token masks."""

    op: Opcode
    args: tuple[int, ...] = ()
    wait: int = 0
    signal: int = 0

    def __post_init__(self) -> None:
        spec = FORMATS[self.op]
        if len(self.args) != len(spec):
            raise ValueError(f"{self.mnemonic} takes {len(spec)} fields ({', '.join(f.name for f in spec)}), "
                             f"got {len(self.args)}")
        for f, value in zip(HEADER + spec, (self.wait, self.signal) + self.args):
            if not isinstance(value, int) or not 0 <= value < 1 << f.width:
                raise ValueError(f"{self.mnemonic}: field '{f.name}' = {value} does not fit {f.width} bits")

    @classmethod
    def make(cls, op: Opcode, wait: tuple[Token, ...] = (), signal: tuple[Token, ...] = (), **fields: int):
        """`Instruction.make(Opcode.GEMM, a=0, b=0, k=64, acc=0, bank=0, wait=(Token.LD2AR,))`."""
        names = [f.name for f in FORMATS[op]]
        unknown = sorted(set(fields) - set(names))
        missing = [n for n in names if n not in fields]
        if unknown or missing:
            raise ValueError(f"{op.name.lower()}: " + (f"unknown field '{unknown[0]}'" if unknown
                                                        else f"missing field '{missing[0]}'"))
        return cls(op, tuple(int(fields[n]) for n in names), _mask(wait), _mask(signal))

    @property
    def mnemonic(self) -> str:
        return self.op.name.lower()

    @property
    def unit(self) -> Unit:
        return UNITS[self.op]

    def __getitem__(self, name: str) -> int:
        for f, value in zip(FORMATS[self.op], self.args):
            if f.name == name:
                return value
        raise KeyError(f"{self.mnemonic} has no field '{name}'")

    def encode(self) -> int:
        word = int(self.op) << OPCODE.lsb
        for f, value in zip(HEADER, (self.wait, self.signal)):
            word |= value << f.lsb
        for f, value in zip(FORMATS[self.op], self.args):
            word |= value << f.lsb
        return word

    def text(self) -> str:
        parts = [self.mnemonic]
        for f, value in zip(FORMATS[self.op], self.args):
            parts.append(f"{f.name}={Buffer(value).name.lower() if f.name == 'buf' else value}")
        for name, mask in (("wait", self.wait), ("signal", self.signal)):
            if mask:
                parts.append(f"{name}=" + "|".join(t.name.lower() for t in Token if mask >> t & 1))
        return " ".join(parts)

    def steps(self) -> int:
        """Array instructions: the cycles they feed the array (one operand step each)."""
        return steps(self.op, self.__getitem__)

    def occupancy(self, config: AccelConfig) -> int:
        """Cycles the instruction keeps its unit from issuing the next one (halt: 1)."""
        return occupancy(self.op, self.__getitem__, config)

    def duration(self, config: AccelConfig) -> int:
        """Cycles from issue to the end: its tokens signal and its memory is free then."""
        return duration(self.op, self.__getitem__, config)

    def accesses(self, config: AccelConfig) -> tuple[tuple[str, int, int, bool], ...]:
        """The memory ranges it touches: (space, first, end, writes) with space a buffer name,
        "ACC0"/"ACC1" (the accumulator banks, in rows) or "DRAM" (in words)."""
        op = self.op
        if op in (Opcode.LOAD, Opcode.STORE):
            buf = Buffer(self["buf"])
            dram = (self["dram"], self["dram"] + self["count"] * config.beats(buf))
            return (("DRAM", *dram, op is Opcode.STORE), (buf.name, self["addr"], self["addr"] + self["count"],
                                                          op is Opcode.LOAD))
        if op is Opcode.SPLOAD:
            dram = (self["dram"], self["dram"] + self["count"] * config.beats(Buffer.BBUF))
            return ("DRAM", *dram, False), ("BBUF", self["addr"], self["addr"] + 2 * self["steps"], True)
        if op is Opcode.SSTORE:  # the DRAM words its strided words span
            buf = Buffer(self["buf"])
            end = self["dram"] + (self["count"] - 1) * self["step"] + config.beats(buf)
            return (("DRAM", self["dram"], end, True), (buf.name, self["addr"], self["addr"] + self["count"], False))
        if op is Opcode.TLOAD:  # the DRAM words its tiles' source words span
            buf = Buffer(self["buf"])
            lanes, beats = config.lanes(buf), config.beats(buf)
            end = self["dram"] + (self["count"] - 1) * self["stride"] + (lanes - 1) * self["step"] + beats
            return (("DRAM", self["dram"], end, False), (buf.name, self["addr"], self["addr"] + self["count"] * lanes,
                                                         True))
        if op in ARRAY_OPS:
            if op is Opcode.SPGEMM:
                a_words, b_words = self["span"], 2 * self.steps()
            else:
                a_words = b_words = self["k"]
                if op is Opcode.WGEMM:
                    a_words *= config.binary_weight_group
            return (("ABUF", self["a"], self["a"] + a_words, False), ("BBUF", self["b"], self["b"] + b_words, False),
                    (f"ACC{self['bank']}", 0, config.rows, True))
        if op is Opcode.REQUANT:
            return ((f"ACC{self['bank']}", 0, config.rows, False), ("PBUF", self["param"], self["param"] + 3, False),
                    ("OBUF", self["dst"], self["dst"] + config.rows, True))
        if op is Opcode.HALT:
            return ()
        if op is Opcode.VACC:
            return ((f"ACC{self['bank']}", 0, config.rows, False),
                    ("PBUF", self["dst"], self["dst"] + (config.rows - 1) * self["stride"] + 1, True))
        n = self["n"]
        if op in CONSTANTS:
            params = CONSTANTS[op] + (3 * n if op is Opcode.VLAYERNORM else 0)
            source = "PBUF" if op in (Opcode.VSOFTMAX, Opcode.VLAYERNORM) else "OBUF"
            reads = [(source, self["a"], self["a"] + n, False), ("PBUF", self["param"], self["param"] + params, False)]
            if op is Opcode.VSOFTMAX:  # the mask words, when masked (an empty range when not)
                reads.append(("PBUF", self["mask"] * self["masked"], (self["mask"] + n) * self["masked"], False))
            if op is Opcode.VRESADD:
                reads.append(("PBUF" if self["wide"] else "OBUF", self["b"], self["b"] + n, False))
            return (*reads, ("PBUF" if op is Opcode.VRESADD else "OBUF", self["dst"], self["dst"] + n, True))
        reads = [("OBUF", self["a"], self["a"] + n, False)]
        if op in (Opcode.VADD, Opcode.VMUL):
            reads.append(("OBUF", self["b"], self["b"] + n, False))
        if op in (Opcode.VMAX, Opcode.VSUM):
            dst = ("PBUF" if op is Opcode.VSUM else "OBUF", self["dst"], self["dst"] + 1, True)
        else:
            dst = ("OBUF", self["dst"], self["dst"] + n, True)
        return (*reads, dst)

    def with_field(self, name: str, value: int) -> "Instruction":
        """This instruction with field `name` set to `value`."""
        return Instruction(self.op, tuple(value if f.name == name else v for f, v in zip(FORMATS[self.op], self.args)),
                           self.wait, self.signal)

    def relocated(self, offsets: dict[Buffer, int]) -> "Instruction":
        """This instruction with its addresses in each buffer moved on by `offsets[buffer]` words
        (`ADDRESSES`): what it touches moves with it."""
        fields = dict(zip((f.name for f in FORMATS[self.op]), self.args))
        for name, space in ADDRESSES.get(self.op, ()):
            if space == "masked" and not fields["masked"]:
                continue
            buffer = Buffer(fields["buf"]) if space == "buf" else Buffer.PBUF if space == "masked" or (
                space == "wide" and fields["wide"]) else Buffer.OBUF if space == "wide" else space
            fields[name] += offsets.get(buffer, 0)
        return Instruction(self.op, tuple(fields.values()), self.wait, self.signal)

    def problem(self, config: AccelConfig) -> str | None:
        """Why this instruction cannot run on `config` (a unit the config leaves out, a range
        outside DRAM or a buffer, an empty transfer, a malformed sparse block), or None."""
        op = self.op
        missing = [flag for flag in NEEDS.get(op, ()) if not getattr(config, flag)]
        if missing:
            return f"{self.mnemonic} needs the {missing[0].replace('_', ' ')}, which this config leaves out " \
                   f"({missing[0]}=0)"
        if op in (Opcode.GEMM, Opcode.BGEMM, Opcode.WGEMM) and self["k"] < 1:
            return "k must be at least 1"
        if op is Opcode.WGEMM and self["a"] % config.binary_weight_group:
            return f"a must be a multiple of binary_weight_group ({config.binary_weight_group}), got {self['a']}"
        if op in (Opcode.SPGEMM, Opcode.SPLOAD):
            bw, limit = self["bw"], min(config.abuf_banks, 1 << config.data_bits - 1)
            if bw < 1 or bw & (bw - 1) or bw > limit:
                return f"bw must be a power of two of at most {limit} (abuf_banks and the index lanes), got {bw}"
            if not 1 <= self["nnz"] <= bw:
                return f"nnz must lie in [1, bw], got nnz={self['nnz']}"
        if op is Opcode.SPGEMM:
            bw = self["bw"]
            if self["blocks"] < 1:
                return f"blocks must be at least 1, got {self['blocks']}"
            if self["a"] % bw or self["span"] % bw or self["b"] % 2:
                return f"a and span must be multiples of bw ({bw}) and b even, got a={self['a']} " \
                       f"span={self['span']} b={self['b']}"
            if self["span"] < self["blocks"] * bw:
                return f"span ({self['span']}) must hold the blocks' windows ({self['blocks']} x bw={bw})"
        if op in (Opcode.LOAD, Opcode.STORE, Opcode.TLOAD, Opcode.SSTORE) and self["count"] < 1:
            return "count must be at least 1"
        if op is Opcode.SPLOAD:
            steps, nnz = self["steps"], self["nnz"]
            if self["buf"] != Buffer.BBUF or self["addr"] % 2 or steps < 1 or steps % nnz:
                return f"spload fills bbuf from an even addr with whole blocks (steps a multiple of nnz={nnz}), " \
                       f"got {Buffer(self['buf']).name.lower()} addr={self['addr']} steps={steps}"
            words = len(sparse_stream(steps, nnz, self["bw"], config.cols, config.data_bits))
            if self["count"] != words:
                return f"count must be the stream's {words} words ({steps} steps of nnz={nnz}, bw={self['bw']}), " \
                       f"got {self['count']}"
        if op is Opcode.SSTORE and self["count"] > 1 and self["step"] < config.beats(Buffer(self["buf"])):
            return f"step must be at least the buffer word's {config.beats(Buffer(self['buf']))} DRAM words " \
                   f"(words would overlap), got {self['step']}"
        if op is Opcode.TLOAD and (self["buf"] not in (Buffer.ABUF, Buffer.BBUF) or config.rows != config.cols):
            return f"tload transposes square tiles into abuf or bbuf of a square array, got " \
                   f"{Buffer(self['buf']).name.lower()} on {config.rows}x{config.cols}"
        if op in VECTOR_OPS and op is not Opcode.VACC and self["n"] < 1:
            return "n must be at least 1"
        if op in (Opcode.VSOFTMAX, Opcode.VLAYERNORM) and not 1 <= self["len"] <= self["n"] * config.cols:
            return f"len must be in [1, n * cols] = [1, {self['n'] * config.cols}], got {self['len']}"
        if op in (Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VGELU):
            sources = ("a", "b") if op in (Opcode.VADD, Opcode.VMUL) else ("a",)
            for src in sources:
                if self[src] < self["dst"] < self[src] + self["n"]:
                    return (f"dst {self['dst']} lies inside source {src} [{self[src]}, {self[src] + self['n']}): "
                            "the unit streams, so it would read words it already wrote")
        limits = {b.name: config.buffer_depth(b) for b in Buffer} | {"ACC0": config.rows, "ACC1": config.rows,
                                                                     "DRAM": config.dram_words}
        for space, first, end, writes in self.accesses(config):
            if end > limits[space]:
                verb = "writes" if writes else "reads"
                unit = "rows" if space.startswith("ACC") else "words"
                return f"{verb} {space} {unit} [{first}, {end}) outside its {limits[space]} {unit}"
        return None


def _mask(tokens) -> int:
    mask = 0
    for t in tokens:
        mask |= 1 << Token(t)
    return mask


def decode(word: int) -> Instruction:
    """The instruction of a 128-bit word; ValueError for an unknown opcode or stray bits."""
    code = word & ((1 << OPCODE.width) - 1)
    try:
        op = Opcode(code)
    except ValueError:
        raise ValueError(f"unknown opcode {code}") from None
    spec = FORMATS[op]
    used = sum(((1 << f.width) - 1) << f.lsb for f in (OPCODE, *HEADER))
    args = []
    for f in spec:
        args.append(word >> f.lsb & ((1 << f.width) - 1))
        used |= ((1 << f.width) - 1) << f.lsb
    if word & ~used or word >> INSTRUCTION_BITS:
        raise ValueError(f"{op.name.lower()}: bits set outside its fields")
    wait, signal = (word >> f.lsb & ((1 << f.width) - 1) for f in HEADER)
    return Instruction(op, tuple(args), wait, signal)


def to_binary(program: list[Instruction] | tuple[Instruction, ...]) -> bytes:
    """`program.bin`: the magic, version and count (16 bytes), then each instruction as 16
    little-endian bytes."""
    out = bytearray(MAGIC + struct.pack("<II", VERSION, len(program)))
    for instr in program:
        out += instr.encode().to_bytes(INSTRUCTION_BITS // 8, "little")
    return bytes(out)


def from_binary(data: bytes, where: str = "program") -> tuple[Instruction, ...]:
    """Parse `program.bin`; ValueError naming `where` and the instruction index."""
    if len(data) < 16 or data[:8] != MAGIC:
        raise ValueError(f"{where}: not a tcc accelerator program (bad magic)")
    version, count = struct.unpack("<II", data[8:16])
    if version != VERSION:
        raise ValueError(f"{where}: program version {version}, this tcc reads {VERSION}")
    size = INSTRUCTION_BITS // 8
    if len(data) != 16 + count * size:
        raise ValueError(f"{where}: {len(data) - 16} bytes of instructions, the header says {count} x {size}")
    program = []
    for i in range(count):
        word = int.from_bytes(data[16 + i * size:16 + (i + 1) * size], "little")
        try:
            program.append(decode(word))
        except ValueError as e:
            raise ValueError(f"{where}: instruction {i}: {e}") from None
    return tuple(program)


def to_assembly(program, comments: dict[int, str] | None = None) -> str:
    """The assembly listing: one instruction per line; `comments[i]` is printed as `# ...`
    lines before instruction `i` (sections, layers)."""
    lines = []
    for i, instr in enumerate(program):
        if comments and i in comments:
            lines.extend(f"# {line}" for line in comments[i].splitlines())
        lines.append(instr.text())
    return "\n".join(lines) + "\n"


_NAMED = {"buf": {b.name.lower(): int(b) for b in Buffer}}
_ITEM = re.compile(r"([a-z_]+)=(\S+)$")


def parse_assembly(text: str, where: str = "program.s") -> tuple[Instruction, ...]:
    """Parse the assembly form; ValueError as `where:LINE: problem`."""
    program = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            program.append(_parse_line(line))
        except ValueError as e:
            raise ValueError(f"{where}:{lineno}: {e}") from None
    return tuple(program)


def _parse_line(line: str) -> Instruction:
    mnemonic, *items = line.split()
    try:
        op = Opcode[mnemonic.upper()]
    except KeyError:
        raise ValueError(f"unknown mnemonic '{mnemonic}'") from None
    fields: dict[str, int] = {}
    tokens: dict[str, tuple[Token, ...]] = {"wait": (), "signal": ()}
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"expected NAME=VALUE, got '{item}'")
        name, value = m.groups()
        if name in tokens:
            try:
                tokens[name] = tuple(Token[t.upper()] for t in value.split("|"))
            except KeyError:
                raise ValueError(f"unknown token in '{item}' (tokens: {', '.join(t.name.lower() for t in Token)})") \
                    from None
        elif name in _NAMED and value in _NAMED[name]:
            fields[name] = _NAMED[name][value]
        else:
            try:
                fields[name] = int(value, 0)
            except ValueError:
                raise ValueError(f"field '{name}' needs an integer, got '{value}'") from None
    return Instruction.make(op, tokens["wait"], tokens["signal"], **fields)


def check_program(program, config: AccelConfig) -> None:
    """ValueError naming the first instruction that cannot run on `config`, or a program
    without a final `halt` or longer than the program memory."""
    if len(program) > config.imem_depth:
        raise ValueError(f"the program has {len(program)} instructions, the program memory holds {config.imem_depth}")
    for i, instr in enumerate(program):
        problem = instr.problem(config)
        if problem:
            raise ValueError(f"instruction {i} ({instr.text()}): {problem}")
    if not program or program[-1].op is not Opcode.HALT:
        raise ValueError("the program does not end with halt")


def wrap(values: np.ndarray, bits: int) -> np.ndarray:
    """Two's complement wrap of int64 `values` to `bits`."""
    shift = 64 - bits
    return (values.astype(np.int64) << shift) >> shift


_LANE_DTYPES = {8: "<i1", 16: "<i2", 32: "<i4", 64: "<i8"}  # byte-wide lanes: plain little-endian words


def pack_words(values: np.ndarray, lane_bits: int, word_bytes: int) -> np.ndarray:
    """[n, lanes] signed lanes -> [n, word_bytes] bytes, lane j at bits [j*w, (j+1)*w)
    (values wrap to `lane_bits`); bytes past the lanes are zero."""
    n, lanes = values.shape
    out = np.zeros((n, word_bytes), np.uint8)
    if lane_bits in _LANE_DTYPES:
        used = lanes * lane_bits // 8
        lanes_le = np.ascontiguousarray(values.astype(np.int64).astype(_LANE_DTYPES[lane_bits]))
        out[:, :used] = lanes_le.view(np.uint8).reshape(n, used)
        return out
    bits = ((values.astype(np.int64)[:, :, None] >> np.arange(lane_bits)) & 1).astype(np.uint8)
    padded = np.zeros((n, word_bytes * 8), np.uint8)
    padded[:, :lanes * lane_bits] = bits.reshape(n, lanes * lane_bits)
    return np.packbits(padded, axis=1, bitorder="little")


def unpack_words(data: np.ndarray, lanes: int, lane_bits: int) -> np.ndarray:
    """[n, bytes] -> [n, lanes] signed int64 lanes (the inverse of `pack_words`)."""
    if lane_bits in _LANE_DTYPES:
        used = lanes * lane_bits // 8
        return np.ascontiguousarray(data[:, :used]).view(_LANE_DTYPES[lane_bits]).astype(np.int64)
    bits = np.unpackbits(data, axis=1, bitorder="little")[:, :lanes * lane_bits].astype(np.int64)
    values = (bits.reshape(len(data), lanes, lane_bits) << np.arange(lane_bits)).sum(axis=2)
    return wrap(values, lane_bits)


@functools.lru_cache(maxsize=512)
def sparse_stream(steps: int, nnz: int, bw: int, cols: int, data_bits: int) -> tuple[int, ...]:
    """spload's stream, word by word: -1 for an index word, s for step s's weight word. An
    index word comes first whenever the bits left over are fewer than the next step takes
    (`cols` indices of log2(bw) bits, and a block's last step its skip); a step never takes
    more than a word's bits, so one index word is always enough."""
    ib = bw.bit_length() - 1
    words, left = [], 0
    for s in range(steps):
        need = cols * ib + (data_bits - ib if s % nnz == nnz - 1 else 0)
        if left < need:
            words.append(-1)
            left += cols * data_bits
        words.append(s)
        left -= need
    return tuple(words)


@functools.lru_cache(maxsize=512)
def _index_bits(steps: int, nnz: int, bw: int, cols: int, data_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit positions in spload's index bit stream: [steps, cols, ib] of each step's indices,
    [blocks, data_bits - ib] of each block's skip (after its last step's indices). Cached (the
    simulator expands every spload): read only."""
    ib = bw.bit_length() - 1
    need = np.full(steps, cols * ib)
    need[nnz - 1::nnz] += data_bits - ib
    start = np.concatenate([[0], np.cumsum(need)[:-1]])
    index = start[:, None, None] + (np.arange(cols) * ib)[None, :, None] + np.arange(ib)
    skip = start[nnz - 1::nnz, None] + cols * ib + np.arange(data_bits - ib)
    return index, skip


def unpack_sparse(words: np.ndarray, steps: int, nnz: int, bw: int, data_bits: int) -> np.ndarray:
    """spload's semantics: its stream words ([count, cols] lanes) -> the [2 * steps, cols]
    BBUF words it writes (weight and index words alternating, as spgemm reads them)."""
    cols, ib = words.shape[1], bw.bit_length() - 1
    kinds = np.array(sparse_stream(steps, nnz, bw, cols, data_bits))
    lanes = words[kinds < 0] & (1 << data_bits) - 1
    stream = ((lanes[:, :, None] >> np.arange(data_bits)) & 1).reshape(-1)
    at, skip_at = _index_bits(steps, nnz, bw, cols, data_bits)
    index = (stream[at] << np.arange(ib)).sum(axis=2)
    index[nnz - 1::nnz, 0] += (stream[skip_at] << np.arange(data_bits - ib)).sum(axis=1) << ib
    out = np.empty((2 * steps, cols), np.int64)
    out[0::2] = words[kinds >= 0]
    out[1::2] = wrap(index, data_bits)
    return out


def pack_sparse(pairs: np.ndarray, nnz: int, bw: int, data_bits: int) -> np.ndarray:
    """The inverse of `unpack_sparse`: spgemm's [2 * steps, cols] weight and index words
    (index lanes below bw, but lane 0 of a block's last step: below 2^data_bits) -> spload's
    stream words; the last index word's unused bits are zero."""
    steps, cols, ib = len(pairs) // 2, pairs.shape[1], bw.bit_length() - 1
    kinds = np.array(sparse_stream(steps, nnz, bw, cols, data_bits))
    index = pairs[1::2] & (1 << data_bits) - 1
    at, skip_at = _index_bits(steps, nnz, bw, cols, data_bits)
    stream = np.zeros(int(np.count_nonzero(kinds < 0)) * cols * data_bits, np.int64)
    stream[at] = ((index & bw - 1)[:, :, None] >> np.arange(ib)) & 1
    stream[skip_at] = (index[nnz - 1::nnz, 0, None] >> ib >> np.arange(data_bits - ib)) & 1
    lanes = (stream.reshape(-1, cols, data_bits) << np.arange(data_bits)).sum(axis=2)
    out = np.empty((len(kinds), cols), np.int64)
    out[kinds < 0] = wrap(lanes, data_bits)
    out[kinds >= 0] = pairs[0::2]
    return out
