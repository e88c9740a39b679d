"""The accelerator's energy from its activity, not power x time.

Every instruction's work is counted (`activity`: from its opcode and fields, as the ISA defines
them, like its cycles): the PEs' multiply-accumulates (int and binary), the bits its buffers
read and write, the vector unit's lane operations and divider iterations, and the bits it moves
to and from DRAM. `Activity.energy_j` prices the counts at per-operation energies:

- Arithmetic and on-chip SRAM at 45 nm (M. Horowitz, "Computing's energy problem (and what we
  can do about it)", ISSCC 2014, Figure 1.1.9): integer add 0.03 pJ (8-bit) and 0.1 pJ
  (32-bit), multiply 0.2 pJ (8-bit) and 3.1 pJ (32-bit); a 64-bit read of an 8 KB SRAM 10 pJ
  (the buffers are built of 36 Kb block RAMs: each access reads or writes small memories).
  Other widths: multiplies scale with the square of the width, adds linearly. A binary MAC
  (XNOR and its popcount adder-tree bit) costs one full adder: an 8-bit add's eighth.
  A binary-weight MAC of the W1A8 unit (wgemm) adds or subtracts an activation: an add of
  `data_bits`, and its share of the accumulator's add (one a step for its G).
- On an FPGA the same logic costs more: x `FPGA_DYNAMIC`, 7.1 (I. Kuon and J. Rose,
  "Measuring the Gap Between FPGAs and ASICs", IEEE TCAD 26(2), 2007: dynamic power of FPGA
  over standard-cell designs using the FPGA's hard multipliers and block memories, both at
  90 nm), and x `process_nm / 45` for the part's process (to first order the switched
  capacitance scales with the feature size at about constant voltage).
- DRAM: 1.3 nJ per 64-bit word (Horowitz: DDR3 1.3-2.6 nJ), the off-chip interface's, not
  scaled by the fabric.

The static power of the part comes on top, for the whole run (`tcc.passes.cost_model`)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Callable, Iterable

from .config import AccelConfig, Buffer
from .isa import ARRAY_OPS, DIVIDER_BITS, NONLINEAR_OPS, SQRT_STEPS, Opcode, passes, steps

ADD8_PJ, ADD32_PJ, MUL8_PJ, MUL32_PJ = 0.03, 0.1, 0.2, 3.1  # Horowitz 2014, 45 nm
SRAM_PJ_PER_BIT = 10.0 / 64  # an 8 KB SRAM's 64-bit access, Horowitz 2014, 45 nm
DRAM_PJ_PER_BIT = 1300.0 / 64  # a DDR3 64-bit access, Horowitz 2014
NODE_NM = 45  # the node of the figures above
FPGA_DYNAMIC = 7.1  # FPGA / ASIC dynamic power with hard multipliers and memories (Kuon & Rose 2007)


@dataclass(frozen=True)
class Activity:
    """What a run does, counted: multiply-accumulates of the PEs (`macs`: data_bits x data_bits
    into acc_bits; `binary_macs`: XNOR-popcount bits; `sign_macs`: wgemm's activations added or
    subtracted by a binary weight), bits read or written in the buffers
    (`buffer_bits`), the vector unit's lane operations (`wide_ops`: an acc_bits multiply-add,
    requantization and the nonlinearities' passes; `narrow_adds`, `narrow_muls`: data_bits
    vadd/vrelu/vmax and vmul; `wide_adds`: vsum's acc_bits adds), its divider's iterations
    (`divider_steps`: a subtract-and-shift each, of the row ops' divisions and square root),
    and bits moved to or from DRAM (`dram_bits`)."""

    macs: int = 0
    binary_macs: int = 0
    sign_macs: int = 0
    buffer_bits: int = 0
    wide_ops: int = 0
    narrow_adds: int = 0
    narrow_muls: int = 0
    wide_adds: int = 0
    divider_steps: int = 0
    dram_bits: int = 0

    def counts(self) -> tuple[int, ...]:
        """The counts in field order (`dataclasses.astuple` deep-copies: the codegen adds up
        hundreds of thousands of these)."""
        return tuple(getattr(self, f) for f in _COUNTS)

    def __add__(self, other: Activity) -> Activity:
        return Activity(*map(operator.add, self.counts(), other.counts()))

    def __mul__(self, times: int) -> Activity:
        return Activity(*(a * times for a in self.counts()))

    def energy_j(self, config: AccelConfig, process_nm: float) -> dict[str, float]:
        """Joules by component (array, buffers, vector, dram) on an FPGA of `process_nm`."""
        scale = FPGA_DYNAMIC * process_nm / NODE_NM * 1e-12
        width = config.data_bits / 8
        mac = MUL8_PJ * width ** 2 + ADD32_PJ * config.acc_bits / 32
        wide = MUL32_PJ * (config.acc_bits / 32) ** 2 + ADD32_PJ * config.acc_bits / 32
        vector = (self.wide_ops * wide + self.narrow_adds * ADD8_PJ * width + self.narrow_muls * MUL8_PJ * width ** 2
                  + self.wide_adds * ADD32_PJ * config.acc_bits / 32 + self.divider_steps * 2 * ADD32_PJ)
        group = max(config.binary_weight_group, 1)
        sign = ADD8_PJ * width + ADD32_PJ * config.acc_bits / 32 / group
        return {"array": scale * (self.macs * mac + self.binary_macs * ADD8_PJ / 8 + self.sign_macs * sign),
                "buffers": scale * self.buffer_bits * SRAM_PJ_PER_BIT,
                "vector": scale * vector,
                "dram": self.dram_bits * DRAM_PJ_PER_BIT * 1e-12}


def activity(op: Opcode, field: Callable[[str], int], config: AccelConfig) -> Activity:
    """The work of one instruction (`op`, its fields by `field(name)`), from its fields alone
    (addresses never matter): what `Activity` counts."""
    bits = config.word_bits
    rows, cols = config.rows, config.cols
    if op in (Opcode.LOAD, Opcode.STORE, Opcode.SSTORE, Opcode.TLOAD, Opcode.SPLOAD):
        buf = Buffer(field("buf"))
        words = field("count") * (config.lanes(buf) if op is Opcode.TLOAD else 1)
        written = 2 * field("steps") if op is Opcode.SPLOAD else words  # spload expands its stream
        return Activity(buffer_bits=written * bits(buf), dram_bits=words * config.beats(buf) * config.dram_bits)
    if op in ARRAY_OPS:
        k = steps(op, field)
        a_words = field("bw") if op is Opcode.SPGEMM else config.binary_weight_group if op is Opcode.WGEMM else 1
        b_words = 2 if op is Opcode.SPGEMM else 1  # a weight word and an index word
        read = k * (a_words * bits(Buffer.ABUF) + b_words * bits(Buffer.BBUF))
        if op is Opcode.BGEMM:
            return Activity(binary_macs=k * rows * cols * config.data_bits, buffer_bits=read)
        if op is Opcode.WGEMM:
            return Activity(sign_macs=k * rows * cols * a_words, buffer_bits=read)
        return Activity(macs=k * rows * cols, buffer_bits=read)
    if op is Opcode.REQUANT:
        return Activity(wide_ops=rows * cols, buffer_bits=3 * bits(Buffer.PBUF) + rows * bits(Buffer.OBUF))
    if op is Opcode.VACC:
        return Activity(buffer_bits=rows * bits(Buffer.PBUF))
    if op is Opcode.HALT:
        return Activity()
    n = field("n")
    if op is Opcode.VRESADD:  # both operands' words in, the sums' out (PBUF's wide lanes)
        b = bits(Buffer.PBUF if field("wide") else Buffer.OBUF)
        return Activity(wide_ops=n * cols, buffer_bits=n * (bits(Buffer.OBUF) + b + bits(Buffer.PBUF)))
    if op in NONLINEAR_OPS:  # a word read and its lanes worked each pass cycle; the row ops divide
        per_word, _fixed = passes(config)[op]
        iterations = {Opcode.VSOFTMAX: DIVIDER_BITS, Opcode.VLAYERNORM: 2 * DIVIDER_BITS + SQRT_STEPS}.get(op, 0)
        source = Buffer.PBUF if op in (Opcode.VSOFTMAX, Opcode.VLAYERNORM) else Buffer.OBUF
        return Activity(wide_ops=per_word * n * cols, divider_steps=iterations,
                        buffer_bits=per_word * n * bits(source) + n * bits(Buffer.OBUF))
    word = bits(Buffer.OBUF)
    if op in (Opcode.VADD, Opcode.VMUL):
        lanes = {"narrow_muls" if op is Opcode.VMUL else "narrow_adds": n * cols}
        return Activity(buffer_bits=3 * n * word, **lanes)
    if op is Opcode.VSUM:
        return Activity(wide_adds=n * cols, buffer_bits=n * word + bits(Buffer.PBUF))
    return Activity(narrow_adds=n * cols, buffer_bits=n * word + (word if op is Opcode.VMAX else n * word))


_COUNTS = tuple(f.name for f in dataclasses.fields(Activity))


def total(instructions: Iterable, config: AccelConfig) -> Activity:
    """The summed `activity` of instructions (or the codegen's nodes): anything with `op` and
    fields by name (`fields`, or `__getitem__`)."""
    sums = [0] * len(_COUNTS)
    for ins in instructions:
        fields = getattr(ins, "fields", None)
        sums = list(map(operator.add, sums, activity(ins.op, fields.__getitem__ if fields is not None
                                                     else ins.__getitem__, config).counts()))
    return Activity(*sums)
