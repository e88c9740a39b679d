"""How the units read the instruction: its fields as wires (`isa.FORMATS` places them per
opcode) and the opcode groups the vector unit decodes."""

from __future__ import annotations

from pyrtl import WireVector

from .. import isa
from ..isa import FORMATS, Opcode
from .circuits import any_of, fit, select_first

PARAM_WORDS = 3  # requant reads PBUF[param], [param+1], [param+2]: bias, multiplier, shift
# the vector unit's instructions: rows of an accumulator bank (requant is in every config); the
# ALU's, a word a cycle from issue; the nonlinearities, on a plan (`nonlinear`)
ROW_OPS = (Opcode.REQUANT, Opcode.VACC)
ALU_OPS = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VMAX, Opcode.VSUM)
ELEMENTWISE = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU)  # one OBUF word out per word in
NONLINEAR = tuple(o for o in isa.NONLINEAR_OPS if o not in ROW_OPS)
ROWWISE = (Opcode.VSOFTMAX, Opcode.VLAYERNORM)  # over rows of PBUF words, `len` lanes long


def format_field(op: Opcode, name: str) -> isa.Field:
    for f in FORMATS[op]:
        if f.name == name:
            return f
    raise KeyError(f"{op.name.lower()} has no field '{name}'")


def field_bits(word: WireVector, f: isa.Field) -> WireVector:
    return word[f.lsb:f.lsb + f.width]


def decode_field(word: WireVector, opcode: WireVector, ops, name: str) -> WireVector:
    """Field `name` of `word` for whichever of `ops` it holds (one slice when the field sits in
    the same place in all of them, else chosen by the opcode)."""
    places: dict[tuple[int, int], list[Opcode]] = {}
    for op in ops:
        f = format_field(op, name)
        places.setdefault((f.lsb, f.width), []).append(op)
    slices = [(field_bits(word, isa.Field(name, lsb, width)), group) for (lsb, width), group in places.items()]
    if len(slices) == 1:
        return slices[0][0]
    width = max(len(s) for s, _ in slices)
    return select_first([(any_of(opcode == int(o) for o in group), fit(s, width)) for s, group in slices[1:]],
                        fit(slices[0][0], width))
