"""The vector unit: requant and vacc (a row of an accumulator bank a cycle) and, in a config
with them, the vector ALU (vadd, vmul, vrelu, vmax, vsum) and the nonlinearities
(`nonlinear`), on the lanes' shared multipliers (`slots`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyrtl import Const, Register, WireVector, concat_list, mux, select

from .. import isa
from ..isa import UNITS, Buffer, Opcode, Unit
from .circuits import (address_bits, any_of, const_mul, fit, nonzero, sadd, saturate, select_first, smax,
                       split_lanes, tree)
from .decode import ALU_OPS, ELEMENTWISE, NONLINEAR, PARAM_WORDS, ROW_OPS, decode_field
from .nonlinear import Nonlinear
from .slots import LaneSlots

if TYPE_CHECKING:
    from .core import Builder


def vector_unit(builder: Builder):
    """The vector unit: requant and vacc (a row of an accumulator bank a cycle) and, in a
    config with it, the vector ALU (vadd, vmul, vrelu, vmax, vsum: a word a cycle) and the
    nonlinearities (`Nonlinear`). A lane's multipliers and rounding shifts are `Slot`s
    all of them share; requant and vmul, which use slot a from their issue on, come first."""
    cfg, f, is_op, ir, op, mems = builder.cfg, builder.f, builder.is_op, builder.ir, builder.op, builder.mems
    R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
    vec, nl = cfg.vector_unit, cfg.vector_unit and cfg.nonlinear_unit
    ops = [o for o in builder.ops if UNITS[o] is Unit.VECTOR and o is not Opcode.HALT]
    iss = builder.issue_u[Unit.VECTOR]
    cand, cand_op = builder.cand, builder.cand_op
    obuf, pbuf = mems[Buffer.OBUF], mems[Buffer.PBUF]

    def held(name: str, at_issue) -> WireVector:
        return builder.held(Unit.VECTOR, f"ve_{name}", at_issue)

    # occupancy (`isa.Instruction.occupancy`): rows, n, or per_word * n + fixed (`isa.passes`)
    budget = isa.passes(cfg)
    width = max([R, 65535] + [per_word * 65535 + fixed for per_word, fixed in budget.values()]).bit_length()
    occupancy = Const(R)
    if vec:
        cases = [(any_of(is_op[o] for o in ROW_OPS if o in ops), Const(R))]
        nonlinear_ops = NONLINEAR if nl else ()
        n = decode_field(ir, op, ALU_OPS + nonlinear_ops, "n")
        for passes in sorted({budget[o] for o in nonlinear_ops}):
            same = [o for o in nonlinear_ops if budget[o] == passes]
            cases.append((any_of(is_op[o] for o in same), const_mul(n, passes[0], width) + passes[1]))
        occupancy = select_first(cases, n)
    busy, idle = builder.busy(Unit.VECTOR, occupancy, width)
    sig = held("sig", builder.sigm)
    feeding = nonzero(busy)
    more = busy > 1  # another word follows: present its address now
    last = busy == 1
    eff_op = held("op", op)
    ex = {o: eff_op == int(o) for o in ops}
    slots = [LaneSlots(cfg, c) for c in range(C)]

    # requant: row eff_row of ACC[bank] with PBUF[param .. param+2] -> OBUF[dst + row]; vacc:
    # the row as it is -> PBUF[dst + row * stride]
    rw = address_bits(R)
    v_row = Register(rw, "ve_row")
    eff_row = fit(select(iss, Const(0, rw), v_row), rw)
    v_row.next <<= fit(eff_row + 1, rw)
    eff_relu = held("relu", f(Opcode.REQUANT, "relu"))
    eff_bank = held("bank", decode_field(ir, op, [o for o in ROW_OPS if o in ops], "bank"))

    def acc_row(k: int) -> WireVector:
        rows = [concat_list(builder.acc[k][r]) for r in range(R)]
        return rows[0] if R == 1 else mux(eff_row, *rows, default=rows[0])

    row = select(eff_bank, acc_row(1), acc_row(0))
    bias, mult, shift = (split_lanes(pbuf.data[f"param{j}"], C, AB) for j in range(PARAM_WORDS))
    rq = []
    for c, slot in enumerate(slots):
        x = (row[c * AB:(c + 1) * AB] + bias[c])[:AB]
        y = saturate(slot.a(ex[Opcode.REQUANT], x, mult[c], shift[c]), DB)
        rq.append(select(eff_relu & y[-1], Const(0, DB), y))
    out_words = [(ex[Opcode.REQUANT], concat_list(rq))]

    if vec:  # the ALU: a word of OBUF lanes (two for vadd and vmul) a cycle; then the nonlinearities
        va, vb = split_lanes(obuf.data["vec_a"], C, DB), split_lanes(obuf.data["vec_b"], C, DB)
        eff_shift = held("shift", f(Opcode.VMUL, "shift"))
        out_words += [
            (ex[Opcode.VADD], concat_list([saturate(sadd(x, y, DB + 1), DB) for x, y in zip(va, vb)])),
            (ex[Opcode.VMUL], concat_list([saturate(slot.a(ex[Opcode.VMUL], x, y, eff_shift), DB)
                                           for x, y, slot in zip(va, vb, slots)])),
            (ex[Opcode.VRELU], concat_list([select(x[-1], Const(0, DB), x) for x in va]))]
        v_max, v_sum = Register(DB, "ve_max"), Register(AB, "ve_sum")
        word_max = tree(smax, va)
        eff_max = select(iss, word_max, smax(v_max, word_max))
        v_max.next <<= eff_max
        word_sum = tree(lambda x, y: (x + y)[:AB], [x.sign_extended(AB) for x in va])
        eff_sum = select(iss, word_sum, (v_sum + word_sum)[:AB])
        v_sum.next <<= eff_sum
        nonlinear = Nonlinear(builder, held, eff_op, ex, feeding, slots) if nl else None
    for slot in slots:
        slot.build()

    def pointer(name: str, at_issue: WireVector, step, amount=1) -> WireVector:
        reg = Register(16, name)
        eff = fit(select(iss, at_issue, reg), 16)
        reg.next <<= fit(select(step, eff + amount, eff), 16)
        return eff

    # the destination advances a word (vacc: stride words) with each word written in order
    row_advance = feeding & any_of(ex[o] for o in (*ROW_OPS, *ELEMENTWISE) if o in ops)
    nl_writes = nonlinear.obuf_writes + nonlinear.pbuf_writes if nl else []
    amount = select(ex[Opcode.VACC], held("stride", f(Opcode.VACC, "stride")), Const(1)) if nl else 1
    wptr = pointer("ve_dst", decode_field(ir, op, ops, "dst"), row_advance | any_of(we for we, _ in nl_writes),
                   amount)

    # read ports: the running instruction's next word, else the first word of the instruction
    # that may issue next cycle
    runs_nonlinear = [(any_of(ex[o] for o in NONLINEAR) & more, nonlinear.reads)] if nl else []
    la_param = decode_field(cand, cand_op, [Opcode.REQUANT], "param")
    for j in range(PARAM_WORDS):  # held while requant runs
        port = f"param{j}"
        pbuf.read(port, select_first([(ex[Opcode.REQUANT] & more, pbuf.addr[port])]
                                     + [(when, reads[port]) for when, reads in runs_nonlinear], la_param + j))
    if not vec:  # no vector ALU: requant rows are all the unit writes
        obuf.write("vector", wptr, out_words[0][1], row_advance)
        return idle, last, sig
    p1 = pointer("ve_a", decode_field(ir, op, ALU_OPS, "a"), Const(1))
    p2 = pointer("ve_b", decode_field(ir, op, ELEMENTWISE[:2], "b"), Const(1))
    for port, ptr, alu_ops, name in (("vec_a", p1, ALU_OPS, "a"), ("vec_b", p2, ELEMENTWISE[:2], "b")):
        first = decode_field(cand, cand_op, alu_ops, name)
        obuf.read(port, select_first([(any_of(ex[o] for o in alu_ops) & more, ptr + 1)]
                                     + [(when, reads[port]) for when, reads in runs_nonlinear], first))

    writes = nonlinear.obuf_writes if nl else []
    obuf.write("vector", wptr, select_first(out_words + writes, concat_list([eff_max] * C)),
               feeding & any_of(ex[o] for o in (Opcode.REQUANT, *ELEMENTWISE))
               | (feeding & ex[Opcode.VMAX] & last) | any_of(we for we, _word in writes))
    # vsum: the sum in every lane (stored once without the nonlinearities); vacc: the row
    writes = [(feeding & ex[Opcode.VACC], row), *nonlinear.pbuf_writes] if nl else []
    pbuf.write("vector", wptr, select_first(writes, concat_list([eff_sum] * C)),
               (feeding & ex[Opcode.VSUM] & last) | any_of(we for we, _word in writes))
    return idle, last, sig
