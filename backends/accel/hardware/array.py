"""The systolic array: its input stage (`array_unit`: addresses, spgemm's gather, the signal
mask's delay line) and the PEs (`pe_grid`), alone for synthesis in `build_array`.

The array is a pipeline: operands enter it skewed (A lane r, with the control tags valid /
clear / bank / mode, enters row r r cycles late and moves right; B lane c enters column c c
cycles late and moves down), so PE(r, c) does step m of an instruction issued in cycle t in
cycle t+m+r+c. An instruction occupies the array's input for its steps
(`isa.Instruction.occupancy`); the next one streams in right behind it, and its signal mask
goes down a delay line of `rows + cols - 2` stages, firing when its last step has left
PE(rows-1, cols-1) (`isa.Instruction.duration`). spgemm reads, per step, a window of `bw`
ABUF words (one per ABUF bank, the same index in each) and BBUF's weight word (even bank) and
index word (odd bank); each column picks its window word, and lane r of column c's word goes
to PE(r, c) through r + c registers, skewed like the weights. On a block's last step the next
window's address adds bw and the index word's lane 0 above its low log2(bw) bits (the skip). bgemm switches the PEs from
multiply to `2 * popcount(XNOR) - data_bits`. wgemm (the W1A8 unit, G = `binary_weight_group`)
reads G consecutive ABUF words a step (one per bank, from the aligned group the address picks):
A's lanes are G words wide in such a config, and a PE adds or subtracts each of its G
activations by a bit of its weight lane."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyrtl
from pyrtl import Const, Input, Output, Register, WireVector, concat, concat_list, mux, select

from ..config import AccelConfig
from ..isa import ARRAY_OPS, Buffer, Opcode, Token, Unit
from .circuits import any_of, delay, fit, nonzero, popcount, sfit, tree
from .decode import decode_field

if TYPE_CHECKING:
    from .core import Builder


def array_unit(builder: Builder):
    """The systolic array and its input stage (see the module's doc). Sets `builder.acc`
    ([bank][row][col] registers) and `builder.draining` (an issued array instruction has not
    ended: its mask is in the delay line)."""
    cfg, f, is_op, ir, op = builder.cfg, builder.f, builder.is_op, builder.ir, builder.op
    R, C, DB = cfg.rows, cfg.cols, cfg.data_bits
    ops = [o for o in ARRAY_OPS if o in builder.ops]
    sparse, binary, signs = Opcode.SPGEMM in ops, Opcode.BGEMM in ops, Opcode.WGEMM in ops
    group = cfg.binary_weight_group
    abuf, bbuf = builder.mems[Buffer.ABUF], builder.mems[Buffer.BBUF]
    iss = builder.issue_u[Unit.ARRAY]

    def held(name: str, at_issue) -> WireVector:
        return builder.held(Unit.ARRAY, f"ar_{name}", at_issue)

    # the steps come in blocks: spgemm's `blocks` of `nnz` steps, gemm's and bgemm's k of one
    n_blocks = decode_field(ir, op, [o for o in ops if o is not Opcode.SPGEMM], "k")
    blocks = Register(16, "ar_blocks")  # blocks left, the current one included
    if sparse:
        is_sparse = held("sparse", is_op[Opcode.SPGEMM])
        n_blocks = select(is_op[Opcode.SPGEMM], f(Opcode.SPGEMM, "blocks"), n_blocks)
        nnz = held("nnz", select(is_op[Opcode.SPGEMM], f(Opcode.SPGEMM, "nnz"), Const(1, 8)))
        bw = held("bw", f(Opcode.SPGEMM, "bw"))
        step = Register(8, "ar_step")  # the step within the block
        eff_step = select(iss, Const(0, 8), step)
        block_end = eff_step == fit(nnz - 1, 8)
        step.next <<= fit(select(block_end, Const(0, 8), eff_step + 1), 8)
    else:
        block_end = Const(1, 1)
    eff_blocks = select(iss, n_blocks, blocks)
    feeding = nonzero(eff_blocks)
    last = feeding & block_end & (eff_blocks == 1)
    more = feeding & ~last  # another step follows: present its addresses now
    blocks.next <<= fit(select(feeding & block_end, eff_blocks - 1, eff_blocks), 16)

    # addresses: a step's ABUF word (spgemm: its window's first) and BBUF word (spgemm: the
    # weight word, the index word after it)
    a_ptr, b_ptr = Register(16, "ar_a"), Register(16, "ar_b")
    eff_a = select(iss, decode_field(ir, op, ops, "a"), a_ptr)
    eff_b = select(iss, decode_field(ir, op, ops, "b"), b_ptr)
    if sparse:  # spgemm's window moves on by bw * (1 + skip) after a block (lane 0 of its last index word)
        x0 = bbuf.group["array"][1][:DB]
        advance = select(is_sparse, bw + (x0 & ~fit(bw - 1, DB)), Const(1, 8))
        next_a = fit(select(block_end, eff_a + advance, eff_a), 16)
        next_b = fit(eff_b + select(is_sparse, Const(2, 2), Const(1, 2)), 16)
    else:
        next_a, next_b = fit(eff_a + 1, 16), fit(eff_b + 1, 16)
    is_signs = held("signs", is_op[Opcode.WGEMM]) if signs else None
    if signs:  # wgemm's step reads G activation words
        next_a = select(is_signs, fit(eff_a + group, 16), next_a)
    a_ptr.next <<= next_a
    b_ptr.next <<= next_b
    abuf.read("array", select(more, next_a, decode_field(builder.cand, builder.cand_op, ops, "a")))
    bbuf.read("array", select(more, next_b, decode_field(builder.cand, builder.cand_op, ops, "b")))

    # the signal mask, with a valid bit, leaves the last step for the delay line
    ntok = len(Token)
    tag = concat(last, held("sig", builder.sigm))
    stages = []
    for _ in range(R + C - 2):
        tag = delay(tag, 1)
        stages.append(tag[ntok])
    builder.draining = any_of(stages)

    # control tags entering with A: valid, clear (the first step of acc=0), bank, mode
    clear0 = iss & ~decode_field(ir, op, ops, "acc")
    ctl0 = [feeding, clear0, held("bank", decode_field(ir, op, ops, "bank"))]
    if binary:
        ctl0.append(held("binary", is_op[Opcode.BGEMM]))
    if signs:
        ctl0.append(is_signs)
    if sparse:
        ctl0.append(is_sparse)
    ctl0 = concat_list(ctl0)

    # spgemm: column c gathers window word X[c] mod bw (X: the index word); lane r of it
    # reaches PE(r, c) through r + c registers, with the weights
    gather = None
    if sparse:
        gather = [[None] * C for _ in range(R)]
        window, sb = abuf.group["array"], abuf.sel_bits
        x_word = bbuf.group["array"][1]
        for c in range(C):
            if sb:  # the window's first bank (the address' low bits), plus X mod bw
                x = fit(x_word[c * DB:(c + 1) * DB], sb) & fit(bw - 1, sb)
                word = mux(abuf.addr["array"][:sb] | x, *window)
            else:
                word = window[0]
            for r in range(R):
                gather[r][c] = delay(word[r * DB:(r + 1) * DB], r + c, f"g{r}_{c}")

    a_word = abuf.data["array"]
    if signs and group > 1:  # lane r: word 0 (the addressed word, gemm's) and wgemm's G - 1 after it
        window, sb, gb = abuf.group["array"], abuf.sel_bits, (group - 1).bit_length()
        after = [mux(abuf.addr["array"][gb:sb], *window[j::group]) if sb > gb else window[j] for j in range(1, group)]
        a_word = concat_list([concat_list([w[r * DB:(r + 1) * DB] for w in (a_word, *after)]) for r in range(R)])
    modes = (Opcode.GEMM,) + ((Opcode.BGEMM,) if binary else ()) + ((Opcode.WGEMM,) if signs else ())
    builder.acc = pe_grid(cfg, a_word, bbuf.data["array"], ctl0, modes, gather)
    return blocks == 0, tag[ntok], tag[:ntok]


def pe_grid(cfg: AccelConfig, a_word: WireVector, b_word: WireVector, ctl0: WireVector, modes: tuple[Opcode, ...],
            gather: list[list[WireVector]] | None = None) -> list[list[list[Register]]]:
    """The `rows x cols` PEs with their skew registers: A lane r enters row r skewed by r
    cycles and moves right, B lane c enters column c skewed by c and moves down, the control
    tags `ctl0` (valid, clear, bank, then a flag for each of `modes` after the first, then the
    sparse flag when `gather` is given) travel with A; PE(i, j) does step m in cycle t+m+i+j.
    `modes`: what a PE computes of its operands, the first unless a later one's flag is set:
    `Opcode.GEMM` (the signed product), `Opcode.BGEMM` (2 * popcount(XNOR) - data_bits),
    `Opcode.WGEMM` (the sum of its A lane's G values, each negated where its bit of the B lane
    is clear; A's lanes are then G words wide, `a_word` lane r the G words' lanes r, word 0
    first, which the other modes read). `gather[r][c]`: spgemm's operand for PE(r, c), taking
    A's place when the sparse flag is set. Returns the accumulators, [bank][row][col]."""
    R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
    group = cfg.binary_weight_group if Opcode.WGEMM in modes else 1
    AW = DB * group  # an A lane's bits
    a_in = [[None] * C for _ in range(R)]
    b_in = [[None] * C for _ in range(R)]
    ctl_in = [[None] * C for _ in range(R)]
    for r in range(R):
        a_in[r][0] = delay(a_word[r * AW:(r + 1) * AW], r, f"a{r}")
        ctl_in[r][0] = delay(ctl0, r)
    for c in range(C):
        b_in[0][c] = delay(b_word[c * DB:(c + 1) * DB], c, f"b{c}")
    acc = [[[Register(AB, f"acc{k}_{r}_{c}") for c in range(C)] for r in range(R)] for k in range(2)]
    for r in range(R):
        for c in range(C):
            a, b, ctl = a_in[r][c], b_in[r][c], ctl_in[r][c]
            if c + 1 < C:
                a_in[r][c + 1], ctl_in[r][c + 1] = delay(a, 1), delay(ctl, 1)
            if r + 1 < R:
                b_in[r + 1][c] = delay(b, 1)
            valid, clear, bank = ctl[0], ctl[1], ctl[2]
            product = _pe_product(cfg, a, b, ctl, modes, group, gather[r][c] if gather is not None else None)
            acc0, acc1 = acc[0][r][c], acc[1][r][c]
            total = (select(clear, Const(0, AB), select(bank, acc1, acc0)) + product)[:AB]
            acc0.next <<= select(valid & ~bank, total, acc0)
            acc1.next <<= select(valid & bank, total, acc1)
    return acc


def _product(a: WireVector, b: WireVector, data_bits: int, acc_bits: int) -> WireVector:
    """gemm's signed product, to `acc_bits`."""
    return sfit((a.sign_extended(2 * data_bits) * b.sign_extended(2 * data_bits))[:2 * data_bits], acc_bits)


def _xnor_popcount(a: WireVector, b: WireVector, data_bits: int, acc_bits: int) -> WireVector:
    """bgemm's 2 * popcount(XNOR(a, b)) - data_bits, to `acc_bits`."""
    same = fit(concat(popcount(~(a ^ b)), Const(0, 1)), acc_bits)
    return (same - Const(data_bits, acc_bits))[:acc_bits]


def _pe_product(cfg: AccelConfig, lane: WireVector, b: WireVector, ctl: WireVector, modes: tuple[Opcode, ...],
                group: int, gathered: WireVector | None) -> WireVector:
    """What a PE adds to its accumulator: the product of `modes[0]`, or of a later mode whose
    flag (after valid, clear and bank in `ctl`) is set. `lane`: its A lane, with wgemm `group`
    words (word 0 first, the other modes' operand; `gathered`, spgemm's, takes its place when
    the sparse flag is set). A wgemm of G = 2 is the pair times +-1 (s0 a0 + s1 a1 = s0 (a0 +
    s0 s1 a1): a DSP slice of its own, yosys shows), of 4 or 8 an adder tree of +-a_j in LUTs."""
    DB, AB = cfg.data_bits, cfg.acc_bits
    a = lane[:DB] if group > 1 else lane
    if gathered is not None:
        a = select(ctl[-1], gathered, a)
    product = None
    for i, mode in enumerate(modes):
        if mode is Opcode.GEMM:
            value = _product(a, b, DB, AB)
        elif mode is Opcode.BGEMM:
            value = _xnor_popcount(a, b, DB, AB)
        elif group == 2:
            a0, a1 = sfit(lane[:DB], DB + 1), sfit(lane[DB:2 * DB], DB + 1)
            pair = (a0 + select(b[0] ^ b[1], (Const(0, DB + 1) - a1)[:DB + 1], a1))[:DB + 1]
            sign = select(b[0], Const(1, 2), Const(3, 2))  # +1 or -1; DB + 2 bits hold the product
            value = sfit((pair.sign_extended(DB + 2) * sign.sign_extended(DB + 2))[:DB + 2], AB)
        else:  # +-a_j by bit j of b
            width = DB + group.bit_length()
            terms = [sfit(lane[j * DB:(j + 1) * DB], width) for j in range(group)]
            terms = [select(b[j], t, (Const(0, width) - t)[:width]) for j, t in enumerate(terms)]
            value = sfit(tree(lambda u, v: (u + v)[:width], terms), AB)
        product = value if product is None else select(ctl[2 + i], value, product)
    return product


def build_array(config: AccelConfig, mode: Opcode) -> pyrtl.Block:
    """Just the PE array of `config` in one mode, for synthesis: `Opcode.GEMM` (`data_bits`
    multiply-accumulate: rows x cols MACs a cycle), `Opcode.BGEMM` (XNOR-popcount: rows x cols
    x data_bits binary MACs a cycle) or `Opcode.WGEMM` (the W1A8 unit: rows x cols x
    `binary_weight_group` activations added or subtracted a cycle). The PEs and skew registers
    as in the accelerator (two accumulator banks), without buffers or control: inputs `a` (an
    ABUF word, G words for wgemm), `b` (a BBUF word), `valid`, `clear`, `bank`; output `acc`,
    every accumulator (so none is optimized away). A fresh block; the working block is left as
    it was."""
    if mode not in (Opcode.GEMM, Opcode.BGEMM, Opcode.WGEMM):
        raise ValueError(f"the array's modes are gemm, bgemm and wgemm, got {mode.name.lower()}")
    if mode is Opcode.WGEMM and not config.binary_weight_group:
        raise ValueError("wgemm needs binary_weight_group > 0")
    group = config.binary_weight_group if mode is Opcode.WGEMM else 1
    block = pyrtl.Block()
    with pyrtl.set_working_block(block, no_sanity_check=True):
        a, b = Input(group * config.word_bits(Buffer.ABUF), "a"), Input(config.word_bits(Buffer.BBUF), "b")
        ctl0 = concat_list([Input(1, "valid"), Input(1, "clear"), Input(1, "bank")])
        acc = pe_grid(config, a, b, ctl0, (mode,))
        out = Output(2 * config.pes * config.acc_bits, "acc")
        out <<= concat_list([x for bank in acc for row in bank for x in row])
    return block


# ----------------------------------------------------------------------------------------------
