"""The accelerator's RTL, generated with PyRTL from one `AccelConfig`, and its PyRTL simulation.

`build(config)` returns a `Design`: a PyRTL block with
- instruction fetch from a program memory (`imem_depth` x 128 bits, written through the
  `imem_we/imem_waddr/imem_wdata` port while the machine is held in reset) and decode: field
  positions come from `isa.FORMATS` and `isa.HEADER`, opcodes from `isa.Opcode`;
- an in-order dispatcher with the eight token counters (`isa.Token`, `TOKEN_BITS` each);
- the four units of `isa.UNITS`: the DMA load engine (DRAM -> buffer); the array, an
  output-stationary `rows x cols` systolic array of `data_bits` multipliers with two banks of
  `acc_bits` accumulators per PE (gemm, and where the config has them spgemm's gather and
  bgemm's XNOR-popcount mode); the `cols`-lane vector unit (requant, and where the config has
  it the vector ALU for vadd/vmul/vrelu/vmax/vsum, vacc and the nonlinearities vresadd, vgelu,
  vsoftmax and vlayernorm); the DMA store engine;
- the buffers ABUF/BBUF/OBUF/PBUF (lane layout as `isa.pack_words`); ABUF as `abuf_banks`
  memories, low-order interleaved (word a in bank a % banks); with the sparse unit, BBUF as two
  (even and odd words).

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
multiply to `2 * popcount(XNOR) - data_bits`. The vector unit's requant and vacc read either
bank.

The vector unit's lanes share their multipliers (one instruction runs at a time): each lane has
`_Slot`s, a multiplier with an adder and the rounding shift after it (`round((a * b + add) >>
s)`, the sum in int64), whose operands are those of the running instruction: slot a ((acc_bits
+ 1) x 33 bits: requant, vmul, and the nonlinearities' first product), b ((acc_bits + 1)^2) and d
(64 x 32 bits, plus layernorm's bias); vgelu has one more multiplier of its own (data_bits x 2
acc_bits). The nonlinearities read on a `_Plan`: counting the cycles since issue, the unit reads
constants (lane 0 of PBUF words, three a cycle through the param ports), then row words (a word
a cycle: PBUF through param port 0, OBUF through the ALU's ports); a tag travels with each word
through the lanes' pipelines and becomes the write. vsoftmax and vlayernorm make three passes
over their row (max or sum; sums of e or of c^2; the outputs, vlayernorm's reading a row word,
its weight word and its two bias words through the one port, four cycles a word) with a shared
restoring divider (`_STEPS` quotient bits a cycle, 64 in all) and vlayernorm's square root
(`_STEPS` of `_isqrt`'s steps a cycle) between them. Each writes its last result before the end
of the ISA's budget (`isa.PASSES`, checked when the plans are built) and the unit stays
occupied for exactly that. The arithmetic is the IR reference ops' int64 arithmetic, with wires
sized from the bounds their docstrings give (softmax: multiplier >= 0, ln2 > 0, 0 <= (p + b)^2 +
c < 2^31; layernorm: 0 <= sum(c^2) + eps < 2^62, |bias| <= 2^60; gelu: |g * out_multiplier| <=
2^62; shifts in [0, 62]): within them the results are the simulator's bit for bit.

`vector_unit=False` leaves out the vector ALU and the nonlinearities, the two OBUF read ports,
slots b and d and PBUF's vector bank; `nonlinear_unit=False` the nonlinearities and vacc (the
sequencer, the divider and square root, slots b and d), and PBUF's vector bank then keeps one
lane (vsum writes its value to every lane); `sparse_unit=False` the gather, its delay lines and
BBUF's split; `binary_unit=False` the PEs' XNOR-popcount: the opcodes of a missing unit never
issue (`isa.check_program` refuses programs that use them); requant, the array's output path,
stays.

DRAM lies outside: each cycle the design drives `dram_raddr` (with `dram_re`) and receives in
`dram_rdata` the word at the address it requested in the previous cycle (a registered read); it
writes with `dram_we/dram_waddr/dram_wdata` (applied at the end of the cycle). `done` rises in
the cycle after `halt` issues: the run's cycle count (`isa_sim.Stats.cycles`) is the number of
clock steps after reset until `done` is seen.

Timing is the ISA's contract (`isa.Instruction.occupancy` and `duration`): an instruction
issues in cycle t when its unit is free and its tokens are there, keeps the unit from issuing
until t + occupancy and signals at the edge ending t + duration - 1; `halt` waits until every
instruction has ended (the units idle, the array's delay line empty). To meet it with block-RAM
buffers (synchronous reads), every buffer read port has a registered address (a transparent
synchronous read: it sees the writes of the previous edge) and each unit presents the first
addresses of the next instruction one cycle ahead (the fetch stage holds the instruction after
the current one). Buffers written by two units (OBUF, PBUF) keep one bank per writer and a
live-value table saying which bank holds the newest word."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pyrtl
from pyrtl import Const, Input, MemBlock, Output, Register, WireVector, concat, concat_list, mux, select

from . import isa
from .config import AccelConfig
from .isa import ARRAY_OPS, FORMATS, INSTRUCTION_BITS, NEEDS, TOKEN_BITS, UNITS, Buffer, Opcode, Token, Unit

# The instruction header (wait/signal masks): the fields `isa.FORMATS` leaves out; the opcode
# holds the bits below it.
_HEADER = {f.name: f for f in isa.HEADER}
_PARAM_WORDS = 3  # requant reads PBUF[param], [param+1], [param+2]: bias, multiplier, shift
# the vector unit's instructions: rows of an accumulator bank (requant is in every config); the
# ALU's, a word a cycle from issue; the nonlinearities, on a `_Plan`
_ROW_OPS = (Opcode.REQUANT, Opcode.VACC)
_ALU_OPS = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU, Opcode.VMAX, Opcode.VSUM)
_ELEMENTWISE = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU)  # one OBUF word out per word in
_NONLINEAR = tuple(o for o in isa.NONLINEAR_OPS if o not in _ROW_OPS)
_ROWWISE = (Opcode.VSOFTMAX, Opcode.VLAYERNORM)  # over rows of PBUF words, `len` lanes long
DRAM_ADDR_BITS = 32


class RTLSimulationError(isa.SimulationError):
    """An RTL run that did not finish: over its cycle limit (a deadlock looks the same)."""
# ----------------------------------------------------------------------------------------------
# small circuit helpers (PyRTL widens with zeros; every signed step here is explicit)

def _bits(n: int) -> int:
    """Address bits for `n` entries (at least 1)."""
    return max(1, (n - 1).bit_length())


def _fit(w, n: int) -> WireVector:
    """`w` truncated or zero-extended to `n` bits."""
    w = pyrtl.as_wires(w)
    return w[:n] if len(w) > n else w.zero_extended(n)


def _sfit(w, n: int) -> WireVector:
    """`w` (two's complement) truncated or sign-extended to `n` bits."""
    return w[:n] if len(w) > n else w.sign_extended(n)


def _nonzero(w) -> WireVector:
    return pyrtl.or_all_bits(w) if len(w) > 1 else w


def _any(ws) -> WireVector:
    ws = list(ws)
    return pyrtl.rtl_any(*ws) if len(ws) > 1 else ws[0] if ws else Const(0, 1)


def _all(ws) -> WireVector:
    ws = list(ws)
    return pyrtl.rtl_all(*ws) if len(ws) > 1 else ws[0] if ws else Const(1, 1)


def _sel(cases, default) -> WireVector:
    """The first value whose condition holds: `cases` = [(cond, value), ...]."""
    out = pyrtl.as_wires(default)
    for cond, value in reversed(cases):
        out = select(cond, value, out)
    return out


def _smul(a: WireVector, b: WireVector) -> WireVector:
    """Exact signed product, len(a) + len(b) bits: an unsigned multiplier (what DSP blocks map
    well) and the two's complement corrections."""
    na, nb = len(a), len(b)
    n = na + nb
    p = (a * b)[:n]
    corr = select(a[-1], concat(b, Const(0, na)), Const(0, n)) + select(b[-1], concat(a, Const(0, nb)), Const(0, n))
    return (p - corr)[:n]


def _shr_arith(x: WireVector, s: WireVector) -> WireVector:
    """x >> s, arithmetic (s unsigned; shifts past the width give the sign)."""
    width, sign = len(x), x[-1]
    for i in range(len(s)):
        amount = 1 << i
        shifted = sign.sign_extended(width) if amount >= width else concat(sign.sign_extended(amount), x[amount:])
        x = select(s[i], shifted, x)
    return x


def _one_hot(s: WireVector, width: int) -> WireVector:
    """1 << s in `width` bits (0 when s >= width), as a barrel shifter of 1."""
    x = Const(1, width)
    for i in range(len(s)):
        amount = 1 << i
        shifted = Const(0, width) if amount >= width else concat(x[:width - amount], Const(0, amount))
        x = select(s[i], shifted, x)
    return x


def _round_shift(p: WireVector, s: WireVector) -> WireVector:
    """(p + 2^(s-1)) >> s exactly (round half up, arithmetic shift; s = 0: p) for signed p
    (`len(p) + 2` bits). Shifts of at least len(p) give 0 like any larger one, so s is clamped
    there."""
    n = len(p)
    sbits = n.bit_length()
    s_eff = select(s > n, Const(n, sbits), _fit(s, sbits)) if len(s) > sbits or (1 << len(s)) - 1 > n else s
    width = n + 2
    half = _one_hot(s_eff, width + 1)[1:]  # 2^(s-1), 0 for s = 0
    return _shr_arith((p.sign_extended(width) + half)[:width], s_eff)


def _saturate(x: WireVector, bits: int) -> WireVector:
    """Signed x clipped to [-2^(bits-1), 2^(bits-1) - 1], `bits` wide."""
    if len(x) <= bits:
        return x.sign_extended(bits)
    top = x[bits - 1:]
    fits = (top == 0) | (top == (1 << len(top)) - 1)
    low, high = Const(1 << (bits - 1), bits), Const((1 << (bits - 1)) - 1, bits)
    return select(fits, x[:bits], select(x[-1], low, high))


def _clip(x: WireVector, low: WireVector, high: WireVector) -> WireVector:
    """Signed x clipped to [low, high] (signed wires), as wide as the widest."""
    width = max(len(x), len(low), len(high))
    x, low, high = (w.sign_extended(width) for w in (x, low, high))
    return select(pyrtl.signed_lt(high, x), high, select(pyrtl.signed_lt(x, low), low, x))


def _saturate_to(x: WireVector, bits: WireVector, width: int) -> WireVector:
    """Signed x clipped to the range of `bits` (a wire, 1 <= bits <= width) signed bits."""
    top = _one_hot(_fit(bits - 1, len(bits)), width + 1)  # 2^(bits-1)
    return _clip(x, ~(top - 1)[:width + 1], (top - 1)[:width + 1])[:width]


def _smax(a: WireVector, b: WireVector) -> WireVector:
    width = max(len(a), len(b))
    a, b = a.sign_extended(width), b.sign_extended(width)
    return select(pyrtl.signed_lt(a, b), b, a)


def _smin(a: WireVector, b: WireVector) -> WireVector:
    width = max(len(a), len(b))
    a, b = a.sign_extended(width), b.sign_extended(width)
    return select(pyrtl.signed_lt(a, b), a, b)


def _sadd(a: WireVector, b: WireVector, width: int) -> WireVector:
    """a + b of signed wires, in (wrapping to) `width` bits."""
    return (_sfit(a, width) + _sfit(b, width))[:width]


def _ssub(a: WireVector, b: WireVector, width: int) -> WireVector:
    """a - b of signed wires, in (wrapping to) `width` bits."""
    return (_sfit(a, width) - _sfit(b, width))[:width]


def _sneg(a: WireVector, width: int) -> WireVector:
    """-a of a signed wire, in (wrapping to) `width` bits."""
    return _ssub(Const(0, 1), a, width)


def _tree(op, items):
    items = list(items)
    while len(items) > 1:
        items = [op(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def _lanes(word: WireVector, lanes: int, bits: int) -> list[WireVector]:
    return [word[j * bits:(j + 1) * bits] for j in range(lanes)]


def _const_mul(w: WireVector, k: int, width: int) -> WireVector:
    """w * k (k a constant) by shifts and adds, `width` bits."""
    out = Const(0, width)
    for i in range(k.bit_length()):
        if k >> i & 1:
            out = _fit(out + _fit(concat(w, Const(0, i)) if i else w, width), width)
    return out


DELAY_LINE = "dl_"  # name prefix of data delay-line registers (see `_delay`)


def _delay(w: WireVector, cycles: int, line: str = "") -> WireVector:
    """`w` `cycles` cycles late. A named `line` carries data that only a tag travelling beside
    it makes count: its registers are named `DELAY_LINE + line + stage` and the Verilog export
    gives them no reset, so synthesis can pack the line into shift registers."""
    for i in range(cycles):
        r = Register(len(w), name=f"{DELAY_LINE}{line}_{i}" if line else "")
        r.next <<= w
        w = r
    return w


def _field(op: Opcode, name: str) -> isa.Field:
    for f in FORMATS[op]:
        if f.name == name:
            return f
    raise KeyError(f"{op.name.lower()} has no field '{name}'")


def _slice(word: WireVector, f: isa.Field) -> WireVector:
    return word[f.lsb:f.lsb + f.width]


def _decode_field(word: WireVector, opcode: WireVector, ops, name: str) -> WireVector:
    """Field `name` of `word` for whichever of `ops` it holds (one slice when the field sits in
    the same place in all of them, else chosen by the opcode)."""
    places: dict[tuple[int, int], list[Opcode]] = {}
    for op in ops:
        f = _field(op, name)
        places.setdefault((f.lsb, f.width), []).append(op)
    slices = [(_slice(word, isa.Field(name, lsb, width)), group) for (lsb, width), group in places.items()]
    if len(slices) == 1:
        return slices[0][0]
    width = max(len(s) for s, _ in slices)
    return _sel([(_any(opcode == int(o) for o in group), _fit(s, width)) for s, group in slices[1:]],
                _fit(slices[0][0], width))


def _popcount(w: WireVector) -> WireVector:
    """The number of set bits of `w` (an adder tree)."""
    return _tree(lambda x, y: x + y, [w[i] for i in range(len(w))])


class _Memory:
    """A buffer: one bank (a MemBlock with one write port) per writing unit, a live-value table
    when several units write it, and one read port per reader with a registered address: the
    data of the address presented in cycle c is there in cycle c + 1 and includes the writes of
    the edge ending c. Yosys maps each bank to block RAM (replicated per read port).

    `interleave` > 1 (a power of two) splits each writer's bank into that many memories, word
    `a` in memory `a % interleave` at index `a // interleave`: a reader's registered address
    picks the index (its high bits) in every memory and the memory (its low bits) whose word
    comes out, so reads and writes behave, cycle for cycle, as with one memory. A buffer with
    one writer also gives each reader `group[reader]`: the words at that index in every memory,
    i.e. the `interleave` consecutive words of the aligned group holding the address, all read
    in the same cycle."""

    def __init__(self, name: str, depth: int, width: int, writers: list[str], readers: list[str],
                 broadcast: dict[str, int] | None = None, interleave: int = 1):
        """`broadcast[w] = bits`: writer `w` only writes words whose lanes all hold one
        `bits`-wide value; its bank stores that value once."""
        assert interleave >= 1 and not interleave & (interleave - 1)
        self.name, self.depth, self.width = name, depth, width
        self.interleave, self.sel_bits = interleave, (interleave - 1).bit_length()
        self.index_bits = _bits(-(-depth // interleave))
        self.aw = self.sel_bits + self.index_bits  # = _bits(depth) without interleaving
        self.narrow = broadcast or {}

        def bank(w: str, i: int) -> MemBlock:
            suffix = f"_b{i}" if interleave > 1 else ""
            return MemBlock(self.narrow.get(w, width), self.index_bits, name=f"{name}_{w}{suffix}",
                            max_read_ports=len(readers), max_write_ports=1)

        self.banks = {w: [bank(w, i) for i in range(interleave)] for w in writers}
        self.index = {w: i for i, w in enumerate(writers)}
        self.lvt = None
        if len(writers) > 1:
            self.lvt = MemBlock(_bits(len(writers)), self.aw, name=f"{name}_lvt", max_read_ports=len(readers),
                                max_write_ports=len(writers))
        self.addr: dict[str, Register] = {}
        self.data: dict[str, WireVector] = {}
        self.group: dict[str, list[WireVector]] = {}
        for r in readers:
            reg = Register(self.aw, name=f"{name}_raddr_{r}")
            groups = {w: [b[reg[self.sel_bits:]] for b in banks] for w, banks in self.banks.items()}
            values = [self._widen(w, g[0] if interleave == 1 else mux(reg[:self.sel_bits], *g))
                      for w, g in groups.items()]
            self.addr[r] = reg
            self.data[r] = values[0] if self.lvt is None else mux(self.lvt[reg], *values, default=values[0])
            if self.lvt is None:
                self.group[r] = groups[writers[0]]

    def _widen(self, writer: str, value: WireVector) -> WireVector:
        if writer not in self.narrow:
            return value
        return _fit(concat_list([value] * -(-self.width // len(value))), self.width)

    def read(self, reader: str, addr) -> None:
        """Present `addr` to `reader`'s port: its word is in `data[reader]` next cycle."""
        self.addr[reader].next <<= _fit(addr, self.aw)

    def write(self, writer: str, addr, data, enable) -> None:
        addr = _fit(addr, self.aw)
        width = self.narrow.get(writer, self.width)
        data = _fit(data, width)
        banks = self.banks[writer]
        if self.interleave == 1:
            banks[0][addr] <<= MemBlock.EnabledWrite(data, enable)
        else:
            index, sel = addr[self.sel_bits:], addr[:self.sel_bits]
            for i, b in enumerate(banks):
                b[index] <<= MemBlock.EnabledWrite(data, enable & (sel == i))
        if self.lvt is not None:
            self.lvt[addr] <<= MemBlock.EnabledWrite(Const(self.index[writer], self.lvt.bitwidth), enable)

    def memblocks(self) -> list[MemBlock]:
        return [*(b for banks in self.banks.values() for b in banks), *([self.lvt] if self.lvt is not None else [])]


class _Slot:
    """A multiplier of one vector lane with an adder and the rounding shift after it,
    `round((a * b + add) >> shift)`: `a * b + add` wraps to 64 bits as in the IR's int64
    reference ops, then the exact `_round_shift` (shift 0: the plain sum). The vector unit's
    instructions share it (one runs at a time): each use (`__call__`, with the condition that
    its instruction runs) gets the same output, and `build` muxes the operands of the first use
    whose condition holds (the last use's when none does), so a use whose condition may hold
    with another's (a stale one) must come after it. Operands are signed; shifts unsigned."""

    def __init__(self, name: str, a_bits: int, b_bits: int, add_bits: int = 0):
        self.a_bits, self.b_bits, self.add_bits = a_bits, b_bits, add_bits
        self.width = min(64, max(a_bits + b_bits, add_bits) + bool(add_bits))
        self.out = WireVector(self.width + 2, name)
        self.uses: list[tuple[WireVector, ...]] = []

    def __call__(self, when, a, b, shift=None, add=None) -> WireVector:
        assert len(a) <= self.a_bits and len(b) <= self.b_bits and (add is None or len(add) <= self.add_bits)
        self.uses.append((when, a, b, Const(0, 1) if shift is None else shift,
                          Const(0, 1) if add is None else add))
        return self.out

    def build(self) -> None:
        def pick(k: int, fit) -> WireVector:
            values = [fit(use[k]) for use in self.uses]
            return _sel([(use[0], v) for use, v in zip(self.uses[:-1], values[:-1])], values[-1])

        shift_bits = max(len(use[3]) for use in self.uses)
        total = _sfit(_smul(pick(1, lambda w: _sfit(w, self.a_bits)), pick(2, lambda w: _sfit(w, self.b_bits))),
                      self.width)
        if self.add_bits:
            total = _sadd(total, pick(4, lambda w: _sfit(w, self.add_bits)), self.width)
        self.out <<= _round_shift(total, pick(3, lambda w: _fit(w, shift_bits)))


class _LaneSlots:
    """The shared `_Slot`s of one vector lane: `a` (requant's and vmul's product and a
    nonlinearity's first one) and, with the nonlinearities, `b` and `d` (their later products;
    `d` also adds layernorm's bias)."""

    def __init__(self, cfg: AccelConfig, lane: int):
        AB, W1 = cfg.acc_bits, cfg.acc_bits + 1
        if cfg.vector_unit and cfg.nonlinear_unit:  # layernorm's c = x - mean takes AB + 1 bits, its 2^31 // r 33
            self.a = _Slot(f"ve_mul_a{lane}", W1, max(W1, 33))
            self.b, self.d = _Slot(f"ve_mul_b{lane}", W1, W1), _Slot(f"ve_mul_d{lane}", 64, 32, 2 * AB)
        else:
            self.a = _Slot(f"ve_mul_a{lane}", AB, AB)

    def build(self) -> None:
        for slot in vars(self).values():
            slot.build()


_STEPS = 2  # iterations a cycle of the vector unit's divider and square root
_DIV_CYCLES = 64 // _STEPS  # a 64-bit dividend: a quotient bit an iteration
_SQRT_CYCLES = -(-31 // _STEPS)  # `_isqrt`'s 31 steps


def _iterate(name: str, start: WireVector, initial: list[WireVector], step, cycles: int):
    """A sequential unit: takes the state `initial` in the cycle `start` is set and applies
    `step` (state -> state) `_STEPS` times a cycle for `cycles` cycles. Returns its state
    registers (the result from the cycle after the last step on, kept until the next start)
    and `done`, set in that cycle."""
    count = Register(_bits(cycles + 1), f"{name}_left")
    left = select(start, Const(cycles, len(count)), count)
    active = _nonzero(left)
    regs = [Register(len(w), f"{name}_{i}") for i, w in enumerate(initial)]
    state = after = [select(start, w, r) for w, r in zip(initial, regs)]
    for _ in range(_STEPS):
        after = step(after)
    for r, now, nxt in zip(regs, state, after):
        r.next <<= select(active, nxt, now)
    count.next <<= _fit(select(active, left - 1, left), len(count))
    done = Register(1, f"{name}_done")
    done.next <<= active & (left == 1)
    return regs, done


def _divide_step(divisor: WireVector):
    """One restoring-division step on (remainder, dividend / quotient): the dividend's top bit
    joins the remainder, the quotient bit enters at the bottom (unsigned; remainder < divisor)."""
    def step(state):
        rest, quotient = state
        shifted = concat(rest[:-1], quotient[-1])
        fits = shifted >= divisor
        return [_fit(select(fits, shifted - divisor, shifted), len(rest)), concat(quotient[:-1], fits)]
    return step


def _isqrt_step(state):
    """One step of `_isqrt` (ir/reference.py) on (rest, root, bit = 1 << 2k), int64; a no-op
    once bit is 0."""
    rest, root, bit = state
    trial = (root + bit)[:64]
    live = _nonzero(bit)
    fits = live & ~pyrtl.signed_lt(rest, trial)
    half = concat(Const(0, 1), root[1:])
    return [select(fits, (rest - trial)[:64], rest), select(live, select(fits, (half + bit)[:64], half), root),
            concat(Const(0, 2), bit[2:])]


def _gap(ready: int, use: int) -> int:
    """Idle read cycles between two passes when the next pass needs, `use` cycles after its
    first word arrives, a result that is there `ready` cycles after the last word of the
    previous pass arrived."""
    return ready - use - 1


@dataclass(frozen=True)
class _Plan:
    """When a nonlinearity reads, in cycles after its issue: `consts` cycles of constants (three
    a cycle, one per PBUF param port), pass 1 over the row (a word a cycle), `gap1` idle cycles,
    pass 2, `gap2` idle cycles, pass 3 (`group` words a row word); a word read in cycle t is
    there in t + 1, and the last one's result is written `latency` cycles after that."""
    consts: int
    passes: int = 1
    gap1: int = 0
    gap2: int = 0
    group: int = 1
    latency: int = 0

    def words(self) -> int:
        """Reads per row word, over all passes."""
        return 1 + (self.passes > 1) + (self.passes > 2) * self.group

    def last_write(self, n: int) -> int:
        """The cycle after issue of the last write, for rows of n words."""
        return self.consts + self.words() * n + (self.passes > 1) * self.gap1 + (self.passes > 2) * self.gap2 \
            + self.latency


_GELU_STAGES = 4  # u; t and the sign of u; erf + one; g; then the result, written
_RESADD_STAGES = 1  # the i32 sum; then the result, written
_E_STAGES = 3  # softmax's e: u; z and p + b; e, registered: then summed (pass 2) or scaled and written (pass 3)
_PLANS = {
    Opcode.VGELU: _Plan(consts=2, latency=_GELU_STAGES),
    Opcode.VRESADD: _Plan(consts=3, latency=_RESADD_STAGES),
    # the max is there a cycle after pass 1; 2^62 // s a division after s, summed a cycle after e
    Opcode.VSOFTMAX: _Plan(consts=2, passes=3, gap1=_gap(1, 0), gap2=_gap(_E_STAGES + 1 + _DIV_CYCLES, _E_STAGES),
                           latency=_E_STAGES),
    # the sum a cycle after pass 1, then the mean's division; the squares' sum two cycles after
    # pass 2, then the square root and 2^31 // r; pass 3 reads the row word, its weight word
    # and its two bias words, and writes when the last arrives
    Opcode.VLAYERNORM: _Plan(consts=1, passes=3, gap1=_gap(1 + _DIV_CYCLES, 0),
                             gap2=_gap(2 + _SQRT_CYCLES + _DIV_CYCLES, 0), group=4),
}


@dataclass
class Design:
    """A built accelerator: its PyRTL block and the handles the runners need."""
    config: AccelConfig
    block: pyrtl.Block
    imem: MemBlock  # the program memory's bank
    memories: list[tuple[str, int, int]] = field(default_factory=list)  # (Verilog name, words, bits) of every memory
    imem_addr_bits: int = 1

# ----------------------------------------------------------------------------------------------

def build(config: AccelConfig) -> Design:
    """Generate the accelerator for `config` in a fresh PyRTL block (the working block is left
    as it was)."""
    if isa.FETCH_CYCLES != 1:
        raise NotImplementedError(f"the RTL fetches in one cycle, the ISA says FETCH_CYCLES = {isa.FETCH_CYCLES}")
    block = pyrtl.Block()
    with pyrtl.set_working_block(block, no_sanity_check=True):
        design = _Builder(config, block).design
    return design


def _present_ops(config: AccelConfig) -> tuple[Opcode, ...]:
    """The opcodes `config`'s machine runs: all but those of the units it leaves out."""
    return tuple(o for o in Opcode if all(getattr(config, flag) for flag in NEEDS.get(o, ())))


class _Builder:
    """Generates one config's accelerator into the working block: the memories, fetch, each
    unit, then the dispatcher and the token counters."""

    def __init__(self, cfg: AccelConfig, block: pyrtl.Block):
        self.cfg = cfg
        ntok = len(Token)
        assert max(Opcode) < 1 << isa.OPCODE.width
        assert _HEADER["wait"].width == _HEADER["signal"].width == ntok
        self.ops = _present_ops(cfg)
        self.dma_width = (65535 * max(cfg.beats(b) for b in Buffer) + cfg.dram_latency).bit_length()
        self._memories()
        self._fetch()
        # an opcode of a unit the config leaves out never issues (nor does an unknown one): the
        # machine stalls; `isa.check_program` refuses such programs before they run
        unit_of = {u: _any(self.is_op[o] for o in self.ops if UNITS[o] is u and o is not Opcode.HALT) for u in Unit}
        self.issue_u = {u: self.issue & unit_of[u] for u in Unit}

        # each unit: (idle at the start of this cycle, an instruction ends this cycle, its mask)
        units = {Unit.LOAD: self._load(), Unit.STORE: self._store(), Unit.ARRAY: self._array(),
                 Unit.VECTOR: self._vector()}

        # ---- dispatcher: in order, one instruction a cycle
        idle = {u: units[u][0] for u in Unit}
        tokens = [Register(TOKEN_BITS, f"token_{t.name.lower()}") for t in Token]
        tokens_ok = _all(~self.waitm[t] | _nonzero(tokens[t]) for t in range(ntok))
        all_ended = _all(idle.values()) & ~self.draining
        unit_ok = _any([unit_of[u] & idle[u] for u in Unit] + [self.is_op[Opcode.HALT] & all_ended])
        self.issue <<= self.ir_valid & ~self.done & tokens_ok & unit_ok
        self.done.next <<= self.done | (self.issue & self.is_op[Opcode.HALT])

        # ---- tokens: +1 per unit signalling, -1 per issue waiting
        for t in range(ntok):
            inc = _tree(lambda x, y: x + y, [_fit(fire & sig[t], 3) for _idle, fire, sig in units.values()])
            tokens[t].next <<= _fit(tokens[t] + inc - (self.issue & self.waitm[t]), TOKEN_BITS)

        memories = []
        for m in [*self.mems.values(), self.imem]:
            for mb in m.memblocks():
                memories.append((mb.name, 1 << mb.addrwidth, mb.bitwidth))
        self.design = Design(cfg, block, self.imem.banks["load"][0], memories, self.imem.aw)

    # ---- memories, ports, fetch

    def _memories(self) -> None:
        cfg = self.cfg
        vec = cfg.vector_unit  # without it: no vector ALU, no OBUF ports for it, PBUF written by loads only
        self.mems = {
            Buffer.ABUF: _Memory("abuf", cfg.abuf_depth, cfg.word_bits(Buffer.ABUF), ["load"], ["array", "store"],
                                 interleave=cfg.abuf_banks),
            # spgemm reads a weight word (even) and an index word (odd) each cycle
            Buffer.BBUF: _Memory("bbuf", cfg.bbuf_depth, cfg.word_bits(Buffer.BBUF), ["load"], ["array", "store"],
                                 interleave=2 if cfg.sparse_unit else 1),
            Buffer.OBUF: _Memory("obuf", cfg.obuf_depth, cfg.word_bits(Buffer.OBUF), ["load", "vector"],
                                 ["vec_a", "vec_b", "store"] if vec else ["store"]),
            # the vector unit writes PBUF with vsum (one value in every lane) and, with the
            # nonlinearities, vacc and vresadd; it reads requant's three parameter words, and the
            # nonlinearities' rows and constants, through the param ports
            Buffer.PBUF: _Memory("pbuf", cfg.pbuf_depth, cfg.word_bits(Buffer.PBUF), ["load", "vector"] if vec
                                 else ["load"], [f"param{j}" for j in range(_PARAM_WORDS)] + ["store"],
                                 broadcast={"vector": cfg.acc_bits} if vec and not cfg.nonlinear_unit else None),
        }
        self.imem = _Memory("imem", cfg.imem_depth, INSTRUCTION_BITS, ["load"], ["fetch"])

    def _fetch(self) -> None:
        """Ports and fetch: `ir` holds the instruction that may issue, the program memory's
        output the one after it (so the next instruction's buffer addresses can be presented a
        cycle early)."""
        cfg, imem = self.cfg, self.imem
        self.dram_rdata = Input(cfg.dram_bits, "dram_rdata")
        imem_we, imem_waddr = Input(1, "imem_we"), Input(imem.aw, "imem_waddr")
        imem_wdata = Input(INSTRUCTION_BITS, "imem_wdata")
        imem.write("load", imem_waddr, imem_wdata, imem_we)

        pcw = imem.aw + 1
        ir, self.ir_valid = Register(INSTRUCTION_BITS, "ir"), Register(1, "ir_valid")
        pc, self.done = Register(pcw, "pc"), Register(1, "done_r")
        nxt = imem.data["fetch"]
        self.issue = issue = WireVector(1, "issue")  # driven by the dispatcher
        advance = ~self.ir_valid | issue
        cand = select(advance, nxt, ir)  # the instruction that may issue next cycle
        pc_next = _fit(select(self.ir_valid, pc + issue, Const(0, pcw)), pcw)
        pc.next <<= pc_next
        imem.read("fetch", pc_next + 1)
        ir.next <<= cand
        self.ir_valid.next <<= 1
        o_done = Output(1, "done")
        o_done <<= self.done

        op = _slice(ir, isa.OPCODE)
        self.ir, self.op, self.cand, self.cand_op = ir, op, cand, _slice(cand, isa.OPCODE)
        self.is_op = {o: op == int(o) for o in Opcode}
        self.waitm, self.sigm = _slice(ir, _HEADER["wait"]), _slice(ir, _HEADER["signal"])

    def f(self, o: Opcode, name: str) -> WireVector:
        """Field `name` of the instruction in `ir`, read as an `o`."""
        return _slice(self.ir, _field(o, name))

    def _held(self, u: Unit, name: str, at_issue: WireVector) -> WireVector:
        """A value unit `u` takes when it issues and keeps until its next issue (in a register
        named `name`): this cycle's."""
        reg = Register(len(at_issue), name)
        eff = select(self.issue_u[u], at_issue, reg)
        reg.next <<= eff
        return eff

    def _busy(self, u: Unit, occupancy: WireVector, width: int) -> tuple[WireVector, WireVector]:
        """Unit `u`'s occupancy counter, `occupancy` at issue: (the cycles it stays occupied,
        this one included: 0 when free; idle: it was free when this cycle began)."""
        rem = Register(width, f"{u.value}_rem")
        eff = _fit(select(self.issue_u[u], _fit(occupancy, width), rem), width)
        rem.next <<= _fit(select(_nonzero(eff), eff - 1, Const(0, width)), width)
        return eff, rem == 0

    def _beats_of(self, buf: WireVector, minus: int = 0) -> WireVector:
        return mux(buf, *[Const(self.cfg.beats(b) - minus, 16) for b in Buffer])

    def _transfer_beats(self, o: Opcode) -> WireVector:
        """count * beats(buf) of the DMA instruction in `ir`."""
        count, buf = self.f(o, "count"), self.f(o, "buf")
        return mux(buf, *[_const_mul(count, self.cfg.beats(b), self.dma_width) for b in Buffer])

    # ---- the units: each returns (idle: free when this cycle began, an instruction ends this
    # cycle, its signal mask)

    def _load(self):
        """The load engine: requests beat j at k = L-1+j (k: cycles since issue), receives it at
        k = L+j, writes a buffer word when its last beat arrives."""
        cfg, mems, f = self.cfg, self.mems, self.f
        D, L, dma_width = cfg.dram_bits, cfg.dram_latency, self.dma_width
        iss = self.issue_u[Unit.LOAD]
        busy, idle = self._busy(Unit.LOAD, Const(L, dma_width) + self._transfer_beats(Opcode.LOAD), dma_width)
        sig = self._held(Unit.LOAD, "load_sig", self.sigm)
        o_raddr, o_re = Output(DRAM_ADDR_BITS, "dram_raddr"), Output(1, "dram_re")

        lw = max(1, (L - 1).bit_length())
        l_wait, l_left = Register(lw, "ld_wait"), Register(dma_width, "ld_left")
        l_addr = Register(DRAM_ADDR_BITS, "ld_dram")
        eff_wait = select(iss, Const(L - 1, lw), l_wait)
        eff_left = _fit(select(iss, self._transfer_beats(Opcode.LOAD), l_left), dma_width)
        eff_addr = _fit(select(iss, f(Opcode.LOAD, "dram"), l_addr), DRAM_ADDR_BITS)
        request = (eff_wait == 0) & _nonzero(eff_left)
        l_wait.next <<= _fit(select(eff_wait == 0, Const(0, lw), eff_wait - 1), lw)
        l_left.next <<= _fit(select(request, eff_left - 1, eff_left), dma_width)
        l_addr.next <<= _fit(select(request, eff_addr + 1, eff_addr), DRAM_ADDR_BITS)
        o_raddr <<= eff_addr
        o_re <<= request

        rvalid = Register(1, "ld_rvalid")
        rvalid.next <<= request
        max_beats = max(cfg.beats(b) for b in Buffer)
        bw = max(1, (max_beats - 1).bit_length())
        l_buf, l_beat = Register(2, "ld_buf"), Register(bw, "ld_beat")
        l_waddr = Register(16, "ld_waddr")
        last_beat = l_beat == _fit(self._beats_of(l_buf, 1), bw)
        word_done = rvalid & last_beat
        l_buf.next <<= select(iss, f(Opcode.LOAD, "buf"), l_buf)
        l_beat.next <<= _fit(select(iss | word_done, Const(0, bw), select(rvalid, l_beat + 1, l_beat)), bw)
        l_waddr.next <<= _fit(select(iss, f(Opcode.LOAD, "addr"), select(word_done, l_waddr + 1, l_waddr)), 16)
        parts = []
        for p in range(max_beats - 1):
            r = Register(D, f"ld_beat{p}")
            r.next <<= select(rvalid & (l_beat == p), self.dram_rdata, r)
            parts.append(r)
        for b in Buffer:
            word = concat_list(parts[:cfg.beats(b) - 1] + [self.dram_rdata])
            mems[b].write("load", l_waddr, _fit(word, cfg.word_bits(b)), word_done & (l_buf == int(b)))
        return idle, busy == 1, sig

    def _store(self):
        """The store engine: presents buffer word w at k = L-1+w*beats, writes beat j at k = L+j."""
        cfg, mems, f = self.cfg, self.mems, self.f
        D, L, dma_width = cfg.dram_bits, cfg.dram_latency, self.dma_width
        iss = self.issue_u[Unit.STORE]
        busy, idle = self._busy(Unit.STORE, Const(L, dma_width) + self._transfer_beats(Opcode.STORE), dma_width)
        sig = self._held(Unit.STORE, "store_sig", self.sigm)
        o_we, o_waddr = Output(1, "dram_we"), Output(DRAM_ADDR_BITS, "dram_waddr")
        o_wdata = Output(D, "dram_wdata")

        sw = L.bit_length()
        bw = max(1, (max(cfg.beats(b) for b in Buffer) - 1).bit_length())
        s_wait, s_left = Register(sw, "st_wait"), Register(dma_width, "st_left")
        s_beat, s_rptr = Register(bw, "st_beat"), Register(16, "st_rptr")
        s_buf, s_daddr = Register(2, "st_buf"), Register(DRAM_ADDR_BITS, "st_dram")
        eff_wait = select(iss, Const(L, sw), s_wait)
        eff_left = _fit(select(iss, self._transfer_beats(Opcode.STORE), s_left), dma_width)
        eff_beat = select(iss, Const(0, bw), s_beat)
        eff_rptr = select(iss, f(Opcode.STORE, "addr"), s_rptr)
        eff_buf = select(iss, f(Opcode.STORE, "buf"), s_buf)
        writing = (eff_wait == 0) & _nonzero(eff_left)
        last_in_word = eff_beat == _fit(self._beats_of(eff_buf, 1), bw)
        next_left = _fit(select(writing, eff_left - 1, eff_left), dma_width)
        present = (writing & last_in_word & _nonzero(next_left)) | (~writing & (eff_wait == 1) & _nonzero(eff_left))
        s_wait.next <<= _fit(select(eff_wait == 0, Const(0, sw), eff_wait - 1), sw)
        s_left.next <<= next_left
        s_beat.next <<= _fit(select(writing, select(last_in_word, Const(0, bw), eff_beat + 1), eff_beat), bw)
        s_rptr.next <<= _fit(select(present, eff_rptr + 1, eff_rptr), 16)
        s_buf.next <<= eff_buf
        s_daddr.next <<= _fit(select(iss, f(Opcode.STORE, "dram"), select(writing, s_daddr + 1, s_daddr)),
                              DRAM_ADDR_BITS)
        beat_data = []
        for b in Buffer:
            m = mems[b]
            m.read("store", select(present, _fit(eff_rptr, m.aw), m.addr["store"]))
            word = _fit(m.data["store"], cfg.beats(b) * D)
            slices = [word[j * D:(j + 1) * D] for j in range(cfg.beats(b))]
            beat_data.append(slices[0] if len(slices) == 1 else mux(s_beat, *slices, default=Const(0, D)))
        o_we <<= writing
        o_waddr <<= s_daddr
        o_wdata <<= mux(s_buf, *beat_data)
        return idle, busy == 1, sig

    def _array(self):
        """The systolic array and its input stage (see the module's doc). Sets `self.acc`
        ([bank][row][col] registers) and `self.draining` (an issued array instruction has not
        ended: its mask is in the delay line)."""
        cfg, f, is_op, ir, op = self.cfg, self.f, self.is_op, self.ir, self.op
        R, C, DB = cfg.rows, cfg.cols, cfg.data_bits
        ops = [o for o in ARRAY_OPS if o in self.ops]
        sparse, binary = Opcode.SPGEMM in ops, Opcode.BGEMM in ops
        abuf, bbuf = self.mems[Buffer.ABUF], self.mems[Buffer.BBUF]
        iss = self.issue_u[Unit.ARRAY]

        def held(name: str, at_issue) -> WireVector:
            return self._held(Unit.ARRAY, f"ar_{name}", at_issue)

        # the steps come in blocks: spgemm's `blocks` of `nnz` steps, gemm's and bgemm's k of one
        n_blocks = _decode_field(ir, op, [o for o in ops if o is not Opcode.SPGEMM], "k")
        blocks = Register(16, "ar_blocks")  # blocks left, the current one included
        if sparse:
            is_sparse = held("sparse", is_op[Opcode.SPGEMM])
            n_blocks = select(is_op[Opcode.SPGEMM], f(Opcode.SPGEMM, "blocks"), n_blocks)
            nnz = held("nnz", select(is_op[Opcode.SPGEMM], f(Opcode.SPGEMM, "nnz"), Const(1, 8)))
            bw = held("bw", f(Opcode.SPGEMM, "bw"))
            step = Register(8, "ar_step")  # the step within the block
            eff_step = select(iss, Const(0, 8), step)
            block_end = eff_step == _fit(nnz - 1, 8)
            step.next <<= _fit(select(block_end, Const(0, 8), eff_step + 1), 8)
        else:
            block_end = Const(1, 1)
        eff_blocks = select(iss, n_blocks, blocks)
        feeding = _nonzero(eff_blocks)
        last = feeding & block_end & (eff_blocks == 1)
        more = feeding & ~last  # another step follows: present its addresses now
        blocks.next <<= _fit(select(feeding & block_end, eff_blocks - 1, eff_blocks), 16)

        # addresses: a step's ABUF word (spgemm: its window's first) and BBUF word (spgemm: the
        # weight word, the index word after it)
        a_ptr, b_ptr = Register(16, "ar_a"), Register(16, "ar_b")
        eff_a = select(iss, _decode_field(ir, op, ops, "a"), a_ptr)
        eff_b = select(iss, _decode_field(ir, op, ops, "b"), b_ptr)
        if sparse:  # spgemm's window moves on by bw * (1 + skip) after a block (lane 0 of its last index word)
            x0 = bbuf.group["array"][1][:DB]
            advance = select(is_sparse, bw + (x0 & ~_fit(bw - 1, DB)), Const(1, 8))
            next_a = _fit(select(block_end, eff_a + advance, eff_a), 16)
            next_b = _fit(eff_b + select(is_sparse, Const(2, 2), Const(1, 2)), 16)
        else:
            next_a, next_b = _fit(eff_a + 1, 16), _fit(eff_b + 1, 16)
        a_ptr.next <<= next_a
        b_ptr.next <<= next_b
        abuf.read("array", select(more, next_a, _decode_field(self.cand, self.cand_op, ops, "a")))
        bbuf.read("array", select(more, next_b, _decode_field(self.cand, self.cand_op, ops, "b")))

        # the signal mask, with a valid bit, leaves the last step for the delay line
        ntok = len(Token)
        tag = concat(last, held("sig", self.sigm))
        stages = []
        for _ in range(R + C - 2):
            tag = _delay(tag, 1)
            stages.append(tag[ntok])
        self.draining = _any(stages)

        # control tags entering with A: valid, clear (the first step of acc=0), bank, mode
        clear0 = iss & ~_decode_field(ir, op, ops, "acc")
        ctl0 = [feeding, clear0, held("bank", _decode_field(ir, op, ops, "bank"))]
        if binary:
            ctl0.append(held("binary", is_op[Opcode.BGEMM]))
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
                    x = _fit(x_word[c * DB:(c + 1) * DB], sb) & _fit(bw - 1, sb)
                    word = mux(abuf.addr["array"][:sb] | x, *window)
                else:
                    word = window[0]
                for r in range(R):
                    gather[r][c] = _delay(word[r * DB:(r + 1) * DB], r + c, f"g{r}_{c}")

        modes = (Opcode.GEMM, Opcode.BGEMM) if binary else (Opcode.GEMM,)
        self.acc = _pe_grid(cfg, abuf.data["array"], bbuf.data["array"], ctl0, modes, gather)
        return blocks == 0, tag[ntok], tag[:ntok]

    def _vector(self):
        """The vector unit: requant and vacc (a row of an accumulator bank a cycle) and, in a
        config with it, the vector ALU (vadd, vmul, vrelu, vmax, vsum: a word a cycle) and the
        nonlinearities (`_Nonlinear`). A lane's multipliers and rounding shifts are `_Slot`s
        all of them share; requant and vmul, which use slot a from their issue on, come first."""
        cfg, f, is_op, ir, op, mems = self.cfg, self.f, self.is_op, self.ir, self.op, self.mems
        R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
        vec, nl = cfg.vector_unit, cfg.vector_unit and cfg.nonlinear_unit
        ops = [o for o in self.ops if UNITS[o] is Unit.VECTOR and o is not Opcode.HALT]
        iss = self.issue_u[Unit.VECTOR]
        cand, cand_op = self.cand, self.cand_op
        obuf, pbuf = mems[Buffer.OBUF], mems[Buffer.PBUF]

        def held(name: str, at_issue) -> WireVector:
            return self._held(Unit.VECTOR, f"ve_{name}", at_issue)

        # occupancy (`isa.Instruction.occupancy`): rows, n, or per_word * n + fixed (`isa.PASSES`)
        width = max([R, 65535] + [per_word * 65535 + fixed for per_word, fixed in isa.PASSES.values()]).bit_length()
        occupancy = Const(R)
        if vec:
            cases = [(_any(is_op[o] for o in _ROW_OPS if o in ops), Const(R))]
            nonlinear_ops = _NONLINEAR if nl else ()
            n = _decode_field(ir, op, _ALU_OPS + nonlinear_ops, "n")
            for passes in sorted({isa.PASSES[o] for o in nonlinear_ops}):
                same = [o for o in nonlinear_ops if isa.PASSES[o] == passes]
                cases.append((_any(is_op[o] for o in same), _const_mul(n, passes[0], width) + passes[1]))
            occupancy = _sel(cases, n)
        busy, idle = self._busy(Unit.VECTOR, occupancy, width)
        sig = held("sig", self.sigm)
        feeding = _nonzero(busy)
        more = busy > 1  # another word follows: present its address now
        last = busy == 1
        eff_op = held("op", op)
        ex = {o: eff_op == int(o) for o in ops}
        slots = [_LaneSlots(cfg, c) for c in range(C)]

        # requant: row eff_row of ACC[bank] with PBUF[param .. param+2] -> OBUF[dst + row]; vacc:
        # the row as it is -> PBUF[dst + row * stride]
        rw = _bits(R)
        v_row = Register(rw, "ve_row")
        eff_row = _fit(select(iss, Const(0, rw), v_row), rw)
        v_row.next <<= _fit(eff_row + 1, rw)
        eff_relu = held("relu", f(Opcode.REQUANT, "relu"))
        eff_bank = held("bank", _decode_field(ir, op, [o for o in _ROW_OPS if o in ops], "bank"))

        def acc_row(k: int) -> WireVector:
            rows = [concat_list(self.acc[k][r]) for r in range(R)]
            return rows[0] if R == 1 else mux(eff_row, *rows, default=rows[0])

        row = select(eff_bank, acc_row(1), acc_row(0))
        bias, mult, shift = (_lanes(pbuf.data[f"param{j}"], C, AB) for j in range(_PARAM_WORDS))
        rq = []
        for c, slot in enumerate(slots):
            x = (row[c * AB:(c + 1) * AB] + bias[c])[:AB]
            y = _saturate(slot.a(ex[Opcode.REQUANT], x, mult[c], shift[c]), DB)
            rq.append(select(eff_relu & y[-1], Const(0, DB), y))
        out_words = [(ex[Opcode.REQUANT], concat_list(rq))]

        if vec:  # the ALU: a word of OBUF lanes (two for vadd and vmul) a cycle; then the nonlinearities
            va, vb = _lanes(obuf.data["vec_a"], C, DB), _lanes(obuf.data["vec_b"], C, DB)
            eff_shift = held("shift", f(Opcode.VMUL, "shift"))
            out_words += [
                (ex[Opcode.VADD], concat_list([_saturate(_sadd(x, y, DB + 1), DB) for x, y in zip(va, vb)])),
                (ex[Opcode.VMUL], concat_list([_saturate(slot.a(ex[Opcode.VMUL], x, y, eff_shift), DB)
                                               for x, y, slot in zip(va, vb, slots)])),
                (ex[Opcode.VRELU], concat_list([select(x[-1], Const(0, DB), x) for x in va]))]
            v_max, v_sum = Register(DB, "ve_max"), Register(AB, "ve_sum")
            word_max = _tree(_smax, va)
            eff_max = select(iss, word_max, _smax(v_max, word_max))
            v_max.next <<= eff_max
            word_sum = _tree(lambda x, y: (x + y)[:AB], [x.sign_extended(AB) for x in va])
            eff_sum = select(iss, word_sum, (v_sum + word_sum)[:AB])
            v_sum.next <<= eff_sum
            nonlinear = _Nonlinear(self, held, eff_op, ex, feeding, slots) if nl else None
        for slot in slots:
            slot.build()

        def pointer(name: str, at_issue: WireVector, step, amount=1) -> WireVector:
            reg = Register(16, name)
            eff = _fit(select(iss, at_issue, reg), 16)
            reg.next <<= _fit(select(step, eff + amount, eff), 16)
            return eff

        # the destination advances a word (vacc: stride words) with each word written in order
        row_advance = feeding & _any(ex[o] for o in (*_ROW_OPS, *_ELEMENTWISE) if o in ops)
        nl_writes = nonlinear.obuf_writes + nonlinear.pbuf_writes if nl else []
        amount = select(ex[Opcode.VACC], held("stride", f(Opcode.VACC, "stride")), Const(1)) if nl else 1
        wptr = pointer("ve_dst", _decode_field(ir, op, ops, "dst"), row_advance | _any(we for we, _ in nl_writes),
                       amount)

        # read ports: the running instruction's next word, else the first word of the instruction
        # that may issue next cycle
        runs_nonlinear = [(_any(ex[o] for o in _NONLINEAR) & more, nonlinear.reads)] if nl else []
        la_param = _decode_field(cand, cand_op, [Opcode.REQUANT], "param")
        for j in range(_PARAM_WORDS):  # held while requant runs
            port = f"param{j}"
            pbuf.read(port, _sel([(ex[Opcode.REQUANT] & more, pbuf.addr[port])]
                                 + [(when, reads[port]) for when, reads in runs_nonlinear], la_param + j))
        if not vec:  # no vector ALU: requant rows are all the unit writes
            obuf.write("vector", wptr, out_words[0][1], row_advance)
            return idle, last, sig
        p1 = pointer("ve_a", _decode_field(ir, op, _ALU_OPS, "a"), Const(1))
        p2 = pointer("ve_b", _decode_field(ir, op, _ELEMENTWISE[:2], "b"), Const(1))
        for port, ptr, alu_ops, name in (("vec_a", p1, _ALU_OPS, "a"), ("vec_b", p2, _ELEMENTWISE[:2], "b")):
            first = _decode_field(cand, cand_op, alu_ops, name)
            obuf.read(port, _sel([(_any(ex[o] for o in alu_ops) & more, ptr + 1)]
                                 + [(when, reads[port]) for when, reads in runs_nonlinear], first))

        writes = nonlinear.obuf_writes if nl else []
        obuf.write("vector", wptr, _sel(out_words + writes, concat_list([eff_max] * C)),
                   feeding & _any(ex[o] for o in (Opcode.REQUANT, *_ELEMENTWISE))
                   | (feeding & ex[Opcode.VMAX] & last) | _any(we for we, _word in writes))
        # vsum: the sum in every lane (stored once without the nonlinearities); vacc: the row
        writes = [(feeding & ex[Opcode.VACC], row), *nonlinear.pbuf_writes] if nl else []
        pbuf.write("vector", wptr, _sel(writes, concat_list([eff_sum] * C)),
                   (feeding & ex[Opcode.VSUM] & last) | _any(we for we, _word in writes))
        return idle, last, sig


class _Nonlinear:
    """The vector unit's nonlinearities: vgelu and vresadd (a word a cycle through a pipeline)
    and the row ops vsoftmax and vlayernorm (passes over a row of PBUF words; the divider and
    layernorm's square root between them), exactly the IR's int64 reference ops (`_int_gelu`,
    `requantize`, `_int_softmax`, `_int_layer_norm` in ir/reference.py) on values within the
    bounds their docstrings give. Each reads on its `_Plan` (`reads`: the port addresses while
    one runs); a tag travels with each word read (`tag`, as the word arrives) and the lanes'
    pipelines, on the shared `_Slot`s, turn it into writes (`obuf_writes`, `pbuf_writes`:
    (enable, word)). The sequencer knows the instruction from its issue on (`ex`); the
    datapaths, whose first word arrives two cycles later, from the cycle after it (`runs`), so
    that the slots' operands do not wait for the dispatcher."""

    def __init__(self, builder: "_Builder", held, eff_op: WireVector, ex: dict, feeding: WireVector,
                 slots: list[_LaneSlots]):
        cfg = builder.cfg
        for o, plan in _PLANS.items():  # the plans meet the ISA's cycle counts
            per_word, fixed = isa.PASSES[o]
            assert plan.group in (1, 4) and plan.words() <= per_word and plan.last_write(1) < per_word + fixed, o
        self.cfg, self.ex, self.slots = cfg, ex, slots
        running = _delay(eff_op, 1)
        self.runs = {o: running == int(o) for o in _NONLINEAR}
        self.obuf_writes: list[tuple[WireVector, WireVector]] = []
        self.pbuf_writes: list[tuple[WireVector, WireVector]] = []
        self.divisions: list[tuple[WireVector, WireVector, WireVector]] = []  # (start, dividend, divisor)
        self.quotient = WireVector(64, "nl_quotient")
        self._schedule(builder, held, feeding)
        C, DB, AB = cfg.cols, cfg.data_bits, cfg.acc_bits
        obuf, pbuf = builder.mems[Buffer.OBUF], builder.mems[Buffer.PBUF]
        self.row = _lanes(pbuf.data["param0"], C, AB)  # the row ops' words
        self.va, self.vb = _lanes(obuf.data["vec_a"], C, DB), _lanes(obuf.data["vec_b"], C, DB)
        self._gelu()
        self._resadd()
        self._softmax()
        self._layernorm()
        self._divider()

    def _schedule(self, builder: "_Builder", held, feeding: WireVector) -> None:
        """The read sequencer: k counts the cycles since issue; the plan's windows say what is
        read. Sets `reads`, `tag` (as the words arrive), `consts` (registers), `length`,
        `lane_ok` (lanes of the arriving row word among the first `len`)."""
        cfg, ex, ir, op = self.cfg, self.ex, builder.ir, builder.op
        C, AB = cfg.cols, cfg.acc_bits
        pbuf = builder.mems[Buffer.PBUF]
        n = held("nl_n", _decode_field(ir, op, _NONLINEAR, "n"))
        self.length = Register(16, "nl_len")  # used from the cycle after issue on: the register will do
        self.length.next <<= select(builder.issue_u[Unit.VECTOR], _decode_field(ir, op, _ROWWISE, "len"), self.length)
        a = held("nl_a", _decode_field(ir, op, _NONLINEAR, "a"))
        src_b = held("nl_b", builder.f(Opcode.VRESADD, "b"))
        param = held("nl_param", _decode_field(ir, op, _NONLINEAR, "param"))
        KW = 21  # k and the windows' arithmetic: occupancies stay below 2^19
        k_reg = Register(KW, "nl_k")
        k = _fit(select(builder.issue_u[Unit.VECTOR], Const(0, KW), k_reg), KW)
        k_reg.next <<= _fit(k + 1, KW)

        def per_op(value) -> WireVector:
            return _sel([(ex[o], Const(value(plan), KW)) for o, plan in _PLANS.items()], Const(0, KW))

        def window(start: WireVector, count: WireVector) -> tuple[WireVector, WireVector]:
            rel = _fit(k - start, KW)  # before start it wraps past any count
            return rel, rel < count

        on = feeding & _any(ex[o] for o in _NONLINEAR)
        grouped = _any(ex[o] for o, plan in _PLANS.items() if plan.group > 1)
        n_k = _fit(n, KW)
        starts = (per_op(lambda p: p.consts), _fit(n_k + per_op(lambda p: p.consts + p.gap1), KW),
                  _fit(concat(n_k, Const(0, 1)) + per_op(lambda p: p.consts + p.gap1 + p.gap2), KW))
        windows = [window(starts[0], n_k), window(starts[1], n_k),
                   window(starts[2], select(grouped, _fit(concat(n_k, Const(0, 2)), KW), n_k))]
        passes = [on & inside & _any(ex[o] for o, plan in _PLANS.items() if plan.passes > p)
                  for p, (_rel, inside) in enumerate(windows)]
        in_const = on & (k < starts[0])
        rel = _sel([(passes[0], windows[0][0]), (passes[1], windows[1][0])], windows[2][0])
        quad = passes[2] & grouped
        i = _fit(select(quad, rel[2:], rel), 16)
        sub = select(quad, rel[:2], Const(0, 2))

        # addresses: constant 3j + p on param port p in cycle j; the row word (layernorm's pass
        # 3: the row word, then its weight word and its two bias words)
        j = _fit(k, 2)
        three_j = _fit(concat(j, Const(0, 1)) + j, 4)
        consts = [_fit(param + three_j + p, 16) for p in range(3)]
        weights = _fit(param + isa.CONSTANTS[Opcode.VLAYERNORM], 16)
        row = _sel([(sub == s, weights + _const_mul(n, s - 1, 18) + i) for s in (1, 2, 3)], a + i)
        self.reads = {"param0": select(in_const, consts[0], row), "param1": consts[1], "param2": consts[2],
                      "vec_a": a + i, "vec_b": src_b + i}
        tag = {"const": in_const, "j": j, "p1": passes[0], "p2": passes[1], "p3": passes[2], "i": i, "sub": sub,
               "first": (i == 0) & (sub == 0), "last": (i == _fit(n - 1, 16)) & (~quad | (sub == 3))}
        self.tag = t = {name: _delay(w, 1) for name, w in tag.items()}

        self.consts = []
        for idx in range(max(isa.CONSTANTS.values())):
            cycle, port = divmod(idx, 3)
            reg = Register(AB, f"nl_const{idx}")
            reg.next <<= select(t["const"] & (t["j"] == cycle), pbuf.data[f"param{port}"][:AB], reg)
            self.consts.append(reg)
        first_lane = _const_mul(t["i"], C, 25)
        self.lane_ok = [_fit(first_lane + c, 25) < self.length for c in range(C)]

    def _gelu(self) -> None:
        """vgelu (`_int_gelu`), lane by lane: u = round(x * multiplier >> shift) (slot a);
        erf + one = 2 one - t^2, t^2 or one by the sign of u, t = min(|u|, clip) - clip (slot
        b); g = x (erf + one) (the lane's own data_bits x 2 acc_bits multiplier, int64); the
        result round(g * out_multiplier >> out_shift) (slot d), saturated and written."""
        DB, AB = self.cfg.data_bits, self.cfg.acc_bits
        mult, shift, clip, one, out_mult, out_shift = self.consts[:6]
        on = self.runs[Opcode.VGELU]
        out = []
        for x, slot in zip(self.va, self.slots):
            u = _delay(_sfit(slot.a(on, x, mult, shift), DB + AB), 1)  # |x * multiplier| < 2^(DB+AB-2)
            magnitude = select(u[-1], _sneg(u, DB + AB + 1), _sfit(u, DB + AB + 1))
            t = _delay(_ssub(_smin(magnitude, clip), clip, AB + 1), 1)  # in [-clip, 0]: |t| < 2^(AB-1)
            positive, negative = _delay(~u[-1] & _nonzero(u), 1), _delay(u[-1], 1)
            square = _sfit(slot.b(on, t, t), 2 * AB)
            erf1 = _sel([(positive, _ssub(_sadd(one, one, 2 * AB), square, 2 * AB)), (negative, square)],
                        _sfit(one, 2 * AB))
            g = _delay(_sfit(_smul(_delay(x, 3), _delay(erf1, 1)), 64), 1)
            out.append(_saturate(slot.d(on, g, out_mult, out_shift), DB))
        self.obuf_writes.append((on & _delay(self.tag["p1"], _GELU_STAGES), concat_list(out)))

    def _resadd(self) -> None:
        """vresadd: rq(a) + rq(b) in i32 (slots a and b), then rq of the sum (slot d) to i32 and
        to out_bits, written to PBUF (rq: `requantize`, saturating)."""
        AB = self.cfg.acc_bits
        m_a, s_a, m_b, s_b, m, s, bits = self.consts[:7]
        on = self.runs[Opcode.VRESADD]
        out = []
        for x, y, slot in zip(self.va, self.vb, self.slots):
            total = _sadd(_saturate(slot.a(on, x, m_a, s_a), 32), _saturate(slot.b(on, y, m_b, s_b), 32), 32)
            result = _saturate(slot.d(on, _delay(total, _RESADD_STAGES), m, s), 32)
            out.append(_saturate_to(result, _fit(bits, 6), AB))
        self.pbuf_writes.append((on & _delay(self.tag["p1"], _RESADD_STAGES), concat_list(out)))

    def _softmax(self) -> None:
        """vsoftmax (`_int_softmax`): pass 1 the row max m; passes 2 and 3 e of each lane: d = x -
        m, u = max(round(d * multiplier >> shift), -31 ln2) (slot a), z = -u // ln2 and its
        remainder (five restoring steps), p + b = b - remainder, e = ((p + b)^2 + c) >> z (slot
        b); pass 2 sums e, the divider makes r = 2^62 // s, pass 3 writes clip(round(e * r >>
        (62 - out_bits))) (slot d). Lanes past len: e = 0, so they give 0."""
        DB, AB = self.cfg.data_bits, self.cfg.acc_bits
        mult, shift, ln2, b, c, out_bits = self.consts[:6]
        on, t = self.runs[Opcode.VSOFTMAX], self.tag
        lowest = Const(1 << AB - 1, AB)
        word_max = _tree(_smax, [select(ok, x, lowest) for x, ok in zip(self.row, self.lane_ok)])
        m = Register(AB, "sm_max")
        m.next <<= select(on & t["p1"], select(t["first"], word_max, _smax(m, word_max)), m)

        UW = AB + 6  # u in [-31 ln2, 0]
        floor = _sneg(_ssub(concat(ln2, Const(0, 5)), ln2, UW), UW)
        es = []
        for x, ok, slot in zip(self.row, self.lane_ok, self.slots):
            u = _delay(_sfit(_smax(slot.a(on, _ssub(x, m, AB + 1), mult, shift), floor), UW), 1)
            rest, z = _sneg(u, UW), []
            for bit in range(4, -1, -1):
                part = _fit(concat(ln2, Const(0, bit)) if bit else ln2, UW)
                z.append(rest >= part)
                rest = select(z[-1], _fit(rest - part, UW), rest)
            q, z = _delay(_ssub(b, rest, AB + 1), 1), _delay(concat(*z), 1)
            e = _shr_arith(_sadd(slot.b(on, q, q), c, 64), z)  # in [0, 2^31)
            es.append(_delay(select(_delay(ok, 2), e[:32], Const(0, 32)), 1))
        late = {name: _delay(t[name], _E_STAGES) for name in ("p2", "p3", "first", "last")}
        word_sum = _tree(lambda x, y: _sadd(x, y, 48), es)  # s < len * 2^31 < 2^47
        s = Register(48, "sm_sum")
        s.next <<= select(on & late["p2"], select(late["first"], word_sum, _sadd(s, word_sum, 48)), s)
        self.divisions.append((on & _delay(late["p2"] & late["last"], 1), Const(1 << 62, 64),
                               select(s == 0, Const(1, 48), s)))
        high = (_one_hot(_fit(out_bits, 5), 17) - 1)[:17]  # 2^out_bits - 1 (out_bits < data_bits)
        down = _fit(Const(62, 7) - _fit(out_bits, 7), 7)
        out = [_sfit(_clip(slot.d(on, self.quotient, e, down), Const(0, 1), high), DB)
               for e, slot in zip(es, self.slots)]
        self.obuf_writes.append((on & late["p3"], concat_list(out)))

    def _layernorm(self) -> None:
        """vlayernorm (`_int_layer_norm`): pass 1 the row sum s, the divider makes mean = (2s +
        N) // (2N) (from |2s + N|, rounded up when negative); pass 2 sums c^2 (c = x - mean,
        slot a), then r = max(isqrt(v + eps), 1) (31 steps) and f = 2^31 // r (the divider);
        pass 3 reads four words a row word: at the row word n = c * f (slot a), then its weight
        and low bias word are kept, and with the high bias word round((n * w + bias) >> shift)
        (slot d) is saturated and written. Lanes past len give 0."""
        DB, AB = self.cfg.data_bits, self.cfg.acc_bits
        eps, shift = self.consts[:2]
        on, t = self.runs[Opcode.VLAYERNORM], self.tag
        SW = AB + 17  # the row sum: fewer than 2^16 lanes
        word = _tree(lambda x, y: _sadd(x, y, SW), [select(ok, _sfit(x, SW), Const(0, SW))
                                                     for x, ok in zip(self.row, self.lane_ok)])
        s = Register(SW, "ln_sum")
        s.next <<= select(on & t["p1"], select(t["first"], word, _sadd(s, word, SW)), s)
        count = self.length.zero_extended(17)
        numerator = _sadd(concat(s, Const(0, 1)), count, SW + 2)  # 2s + N
        negative = numerator[-1]
        den = concat(self.length, Const(0, 1))  # 2N
        magnitude = select(negative, _sneg(numerator, SW + 2), numerator)
        self.divisions.append((on & _delay(t["p1"] & t["last"], 1),
                               _fit(magnitude + select(negative, den - 1, Const(0, 1)), 64), den))
        quotient = _fit(self.quotient, AB + 1)  # |mean| <= 2^(AB-1)
        mean = Register(AB + 1, "ln_mean")
        eff_mean = select(on & t["p2"] & t["first"],
                          select(negative, _sneg(quotient, AB + 1), quotient), mean)
        mean.next <<= eff_mean

        fw = max(AB + 1, 33)
        f = _sfit(concat(Const(0, 1), _fit(self.quotient, 32)), fw)  # 2^31 // r <= 2^31
        row_word, weight_word, low_word = (t["p3"] & (t["sub"] == k) for k in range(3))
        squares, out = [], []
        for x, ok, slot in zip(self.row, self.lane_ok, self.slots):
            cx = _ssub(x, eff_mean, AB + 1)
            product = _sfit(slot.a(on, cx, select(t["p3"], f, _sfit(cx, fw))), 64)  # c^2, or c * f
            squares.append(_delay(select(ok, product, Const(0, 64)), 1))
            kept = []
            for when, value in ((row_word, product), (weight_word, x), (low_word, x)):
                reg = Register(len(value))
                reg.next <<= select(when, value, reg)
                kept.append(reg)
            normed, w, low = kept
            y = _saturate(slot.d(on, normed, w, shift, add=concat(x, low)), DB)
            out.append(select(ok, y, Const(0, DB)))
        t1 = {name: _delay(t[name], 1) for name in ("p2", "first", "last")}
        v_word = _tree(lambda x, y: _sadd(x, y, 64), squares)
        v = Register(64, "ln_var")
        v.next <<= select(on & t1["p2"], select(t1["first"], v_word, _sadd(v, v_word, 64)), v)
        (_rest, root, _bit), done = _iterate("ln_sqrt", on & _delay(t1["p2"] & t1["last"], 1),
                                             [_sadd(v, eps, 64), Const(0, 64), Const(1 << 60, 64)], _isqrt_step,
                                             _SQRT_CYCLES)
        self.divisions.append((on & done, Const(1 << 31, 64), select(root == 0, Const(1, 48), _fit(root, 48))))
        self.obuf_writes.append((on & t["p3"] & (t["sub"] == 3), concat_list(out)))

    def _divider(self) -> None:
        """The divider the row ops share: a 64-bit dividend by a divisor below 2^48, restoring,
        `_STEPS` quotient bits a cycle (`_DIV_CYCLES` cycles); its quotient stays until the next
        division starts."""
        start = _any(s for s, _dividend, _divisor in self.divisions)
        dividend = _sel([(s, d) for s, d, _ in self.divisions[1:]], self.divisions[0][1])
        divisor = _sel([(s, _fit(d, 48)) for s, _, d in self.divisions[1:]], _fit(self.divisions[0][2], 48))
        held = Register(48, "div_divisor")
        eff = select(start, divisor, held)
        held.next <<= eff
        (_rest, quotient), _done = _iterate("div", start, [Const(0, 49), dividend], _divide_step(eff), _DIV_CYCLES)
        self.quotient <<= quotient


def _pe_grid(cfg: AccelConfig, a_word: WireVector, b_word: WireVector, ctl0: WireVector, modes: tuple[Opcode, ...],
             gather: list[list[WireVector]] | None = None) -> list[list[list[Register]]]:
    """The `rows x cols` PEs with their skew registers: A lane r enters row r skewed by r
    cycles and moves right, B lane c enters column c skewed by c and moves down, the control
    tags `ctl0` (valid, clear, bank, then `modes`' selector when there are two, then the
    sparse flag when `gather` is given) travel with A; PE(i, j) does step m in cycle t+m+i+j.
    `modes`: what a PE computes of its operands, `Opcode.GEMM` (the signed product) and/or
    `Opcode.BGEMM` (2 * popcount(XNOR) - data_bits). `gather[r][c]`: spgemm's operand for
    PE(r, c), taking A's place when the sparse flag is set. Returns the accumulators,
    [bank][row][col]."""
    R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
    a_in = [[None] * C for _ in range(R)]
    b_in = [[None] * C for _ in range(R)]
    ctl_in = [[None] * C for _ in range(R)]
    for r in range(R):
        a_in[r][0] = _delay(a_word[r * DB:(r + 1) * DB], r, f"a{r}")
        ctl_in[r][0] = _delay(ctl0, r)
    for c in range(C):
        b_in[0][c] = _delay(b_word[c * DB:(c + 1) * DB], c, f"b{c}")
    acc = [[[Register(AB, f"acc{k}_{r}_{c}") for c in range(C)] for r in range(R)] for k in range(2)]
    for r in range(R):
        for c in range(C):
            a, b, ctl = a_in[r][c], b_in[r][c], ctl_in[r][c]
            if c + 1 < C:
                a_in[r][c + 1], ctl_in[r][c + 1] = _delay(a, 1), _delay(ctl, 1)
            if r + 1 < R:
                b_in[r + 1][c] = _delay(b, 1)
            valid, clear, bank = ctl[0], ctl[1], ctl[2]
            if gather is not None:
                a = select(ctl[-1], gather[r][c], a)
            products = []
            if Opcode.GEMM in modes:
                products.append(_sfit((a.sign_extended(2 * DB) * b.sign_extended(2 * DB))[:2 * DB], AB))
            if Opcode.BGEMM in modes:
                same = _fit(concat(_popcount(~(a ^ b)), Const(0, 1)), AB)
                products.append((same - Const(DB, AB))[:AB])
            product = select(ctl[3], products[1], products[0]) if len(products) > 1 else products[0]
            acc0, acc1 = acc[0][r][c], acc[1][r][c]
            total = (select(clear, Const(0, AB), select(bank, acc1, acc0)) + product)[:AB]
            acc0.next <<= select(valid & ~bank, total, acc0)
            acc1.next <<= select(valid & bank, total, acc1)
    return acc


def build_array(config: AccelConfig, mode: Opcode) -> pyrtl.Block:
    """Just the PE array of `config` in one mode, for synthesis: `Opcode.GEMM` (`data_bits`
    multiply-accumulate: rows x cols MACs a cycle) or `Opcode.BGEMM` (XNOR-popcount: rows x
    cols x data_bits binary MACs a cycle). The PEs and skew registers as in the accelerator
    (two accumulator banks), without buffers or control: inputs `a` (an ABUF word), `b` (a
    BBUF word), `valid`, `clear`, `bank`; output `acc`, every accumulator (so none is
    optimized away). A fresh block; the working block is left as it was."""
    if mode not in (Opcode.GEMM, Opcode.BGEMM):
        raise ValueError(f"the array's modes are gemm and bgemm, got {mode.name.lower()}")
    block = pyrtl.Block()
    with pyrtl.set_working_block(block, no_sanity_check=True):
        a, b = Input(config.word_bits(Buffer.ABUF), "a"), Input(config.word_bits(Buffer.BBUF), "b")
        ctl0 = concat_list([Input(1, "valid"), Input(1, "clear"), Input(1, "bank")])
        acc = _pe_grid(config, a, b, ctl0, (mode,))
        out = Output(2 * config.pes * config.acc_bits, "acc")
        out <<= concat_list([x for bank in acc for row in bank for x in row])
    return block


# ----------------------------------------------------------------------------------------------
# PyRTL simulation

@functools.lru_cache(maxsize=8)
def design(config: AccelConfig) -> Design:
    """The design of `config`, built once per process."""
    return build(config)


def dram_extent(program, config: AccelConfig) -> int:
    """DRAM words [0, extent) cover every address `program` touches."""
    end = 0
    for instr in program:
        for space, _first, last, _writes in instr.accesses(config):
            if space == "DRAM":
                end = max(end, last)
    return end


def _dram_image(program, config: AccelConfig, dram) -> tuple[bytearray, int]:
    """The DRAM as a bytearray of whole words, grown to cover the program; and the byte
    length to hand back."""
    if dram is None:
        dram = b""
    image = np.frombuffer(bytes(dram), np.uint8) if isinstance(dram, (bytes, bytearray)) else \
        np.asarray(dram, dtype=np.uint8).ravel()
    word = config.dram_bits // 8
    size = max(len(image), dram_extent(program, config) * word)
    words = -(-size // word)
    buf = bytearray(words * word)
    buf[:len(image)] = image.tobytes()
    return buf, size


def run_pyrtl(program, config: AccelConfig, dram: np.ndarray, max_cycles: int) -> tuple[np.ndarray, int]:
    """Run `program` on the PyRTL simulation of `config`'s accelerator (FastSimulation), DRAM
    driven from Python. Returns (final DRAM bytes, cycles): the DRAM as long as `dram` or grown
    to cover every word the program touches. ValueError for a program `isa.check_program`
    rejects; `RTLSimulationError` when `halt` has not issued within `max_cycles` cycles."""
    isa.check_program(program, config)
    d = design(config)
    image, size = _dram_image(program, config, dram)
    word = config.dram_bits // 8
    nwords = len(image) // word
    sim = pyrtl.FastSimulation(tracer=None, block=d.block,
                               memory_value_map={d.imem: {i: instr.encode() for i, instr in enumerate(program)}})
    step, inspect = sim.step, sim.inspect
    inputs = {"dram_rdata": 0, "imem_we": 0, "imem_waddr": 0, "imem_wdata": 0}
    for cycle in range(max_cycles + 1):
        step(inputs)
        if inspect("done"):
            return np.frombuffer(bytes(image[:size]), np.uint8).copy(), cycle
        if inspect("dram_re"):
            addr = inspect("dram_raddr")
            inputs["dram_rdata"] = int.from_bytes(image[addr * word:(addr + 1) * word], "little") if addr < nwords else 0
        if inspect("dram_we"):
            addr = inspect("dram_waddr")
            if addr < nwords:
                image[addr * word:(addr + 1) * word] = inspect("dram_wdata").to_bytes(word, "little")
    raise RTLSimulationError(f"the PyRTL simulation did not reach halt within {max_cycles} cycles "
                             "(cycle limit, or a program that waits for a token never signalled)")
