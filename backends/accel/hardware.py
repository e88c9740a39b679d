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
  it the vector ALU for vadd/vmul/vrelu/vmax/vsum); the DMA store engine;
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
to PE(r, c) through r + c registers, skewed like the weights. bgemm switches the PEs from
multiply to `2 * popcount(XNOR) - data_bits`. The vector unit's requant reads either bank.

`vector_unit=False` leaves out the vector ALU, its two OBUF read ports and PBUF's vector bank;
`sparse_unit=False` the gather, its delay lines and BBUF's split; `binary_unit=False` the PEs'
XNOR-popcount: the opcodes of a missing unit never issue (`isa.check_program` refuses programs
that use them); requant, the array's output path, stays.

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
_VECTOR_OPS = isa.VECTOR_OPS  # the vector ALU's, left out when `AccelConfig.vector_unit` is False
_ELEMENTWISE = (Opcode.VADD, Opcode.VMUL, Opcode.VRELU)  # one OBUF word out per word in
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
    """Exact signed product of two n-bit values, 2n bits: an unsigned n x n multiplier (what
    DSP blocks map well) and the two's complement corrections."""
    n = len(a)
    assert len(b) == n
    p = a * b
    corr = select(a[-1], concat(b, Const(0, n)), Const(0, 2 * n)) + \
        select(b[-1], concat(a, Const(0, n)), Const(0, 2 * n))
    return (p - corr)[:2 * n]


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
    """(p + 2^(s-1)) >> s exactly (round half up, arithmetic shift; s = 0: p) for p the exact
    2m-bit signed product of two m-bit values. Shifts of at least 2m give 0 like any larger
    one, so s is clamped there and the sum needs 2m + 2 bits."""
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


def _smax(a: WireVector, b: WireVector) -> WireVector:
    return select(pyrtl.signed_lt(a, b), b, a)


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


def _delay(w: WireVector, cycles: int) -> WireVector:
    for _ in range(cycles):
        r = Register(len(w))
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
    return tuple(o for o in Opcode if o not in NEEDS or getattr(config, NEEDS[o]))


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
            # the vector unit writes PBUF only with vsum: one value in every lane
            Buffer.PBUF: _Memory("pbuf", cfg.pbuf_depth, cfg.word_bits(Buffer.PBUF), ["load", "vector"] if vec
                                 else ["load"], [f"param{j}" for j in range(_PARAM_WORDS)] + ["store"],
                                 broadcast={"vector": cfg.acc_bits} if vec else None),
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
        if sparse:
            next_a = _fit(select(block_end, eff_a + select(is_sparse, bw, Const(1, 8)), eff_a), 16)
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
                    gather[r][c] = _delay(word[r * DB:(r + 1) * DB], r + c)

        modes = (Opcode.GEMM, Opcode.BGEMM) if binary else (Opcode.GEMM,)
        self.acc = _pe_grid(cfg, abuf.data["array"], bbuf.data["array"], ctl0, modes, gather)
        return blocks == 0, tag[ntok], tag[:ntok]

    def _vector(self):
        """The vector unit: requant (a row of an accumulator bank a cycle) and, in a config
        with it, the vector ALU (a word a cycle)."""
        cfg, f, is_op, ir, op, mems = self.cfg, self.f, self.is_op, self.ir, self.op, self.mems
        R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
        vec = cfg.vector_unit
        vector_ops = _VECTOR_OPS if vec else ()
        iss = self.issue_u[Unit.VECTOR]
        cand, cand_op = self.cand, self.cand_op
        ops_a = [o for o in vector_ops if "a" in {x.name for x in FORMATS[o]}]
        ops_b = [o for o in vector_ops if "b" in {x.name for x in FORMATS[o]}]
        ops_dst = [Opcode.REQUANT, *vector_ops]

        def held(name: str, at_issue) -> WireVector:
            return self._held(Unit.VECTOR, f"ve_{name}", at_issue)

        occupancy = _sel([(is_op[Opcode.REQUANT], Const(R))], _decode_field(ir, op, vector_ops, "n")) if vec \
            else Const(R)
        busy, idle = self._busy(Unit.VECTOR, occupancy, max(65535, R).bit_length())
        sig = held("sig", self.sigm)
        feeding = _nonzero(busy)
        more = busy > 1  # another word follows: present its address now
        last = busy == 1
        eff_op = held("op", op)
        ex = {o: eff_op == int(o) for o in ops_dst}

        def pointer(name: str, at_issue: WireVector, step) -> WireVector:
            reg = Register(16, name)
            eff = _fit(select(iss, at_issue, reg), 16)
            reg.next <<= _fit(select(step, eff + 1, eff), 16)
            return eff

        row_advance = feeding & _any(ex[o] for o in (Opcode.REQUANT, *(_ELEMENTWISE if vec else ())))
        wptr = pointer("ve_dst", _decode_field(ir, op, ops_dst, "dst"), row_advance)
        rw = _bits(R)
        v_row = Register(rw, "ve_row")
        eff_row = _fit(select(iss, Const(0, rw), v_row), rw)
        v_row.next <<= _fit(eff_row + 1, rw)
        eff_relu = held("relu", f(Opcode.REQUANT, "relu"))
        eff_bank = held("bank", f(Opcode.REQUANT, "bank"))

        # read ports: the running instruction's next word, else the first word of the instruction
        # that may issue next cycle
        obuf, pbuf = mems[Buffer.OBUF], mems[Buffer.PBUF]
        if vec:
            p1 = pointer("ve_a", _decode_field(ir, op, ops_a, "a"), Const(1))
            p2 = pointer("ve_b", _decode_field(ir, op, ops_b, "b"), Const(1))
            for port, ptr, ops, name in (("vec_a", p1, ops_a, "a"), ("vec_b", p2, ops_b, "b")):
                first = _decode_field(cand, cand_op, ops, name)
                obuf.read(port, select(_any(ex[o] for o in ops) & more, ptr + 1, first))
        la_param = _decode_field(cand, cand_op, [Opcode.REQUANT], "param")
        for j in range(_PARAM_WORDS):  # held while requant runs
            port = f"param{j}"
            pbuf.read(port, select(ex[Opcode.REQUANT] & more, pbuf.addr[port], la_param + j))

        # requant: row eff_row of ACC[bank] with PBUF[param .. param+2] -> OBUF[dst + row]
        def acc_row(k: int) -> WireVector:
            rows = [concat_list(self.acc[k][r]) for r in range(R)]
            return rows[0] if R == 1 else mux(eff_row, *rows, default=rows[0])

        row = select(eff_bank, acc_row(1), acc_row(0))
        bias, mult, shift = (_lanes(pbuf.data[f"param{j}"], C, AB) for j in range(_PARAM_WORDS))
        rq = []
        for c in range(C):
            x = (row[c * AB:(c + 1) * AB] + bias[c])[:AB]
            y = _saturate(_round_shift(_smul(x, mult[c]), shift[c]), DB)
            rq.append(select(eff_relu & y[-1], Const(0, DB), y))
        rq_word = concat_list(rq)

        if not vec:  # no vector ALU: requant rows are all the unit writes
            obuf.write("vector", wptr, rq_word, row_advance)
            return idle, last, sig
        va = _lanes(obuf.data["vec_a"], C, DB)
        vb = _lanes(obuf.data["vec_b"], C, DB)
        eff_shift = held("shift", f(Opcode.VMUL, "shift"))
        add_word = concat_list([_saturate((x.sign_extended(DB + 1) + y.sign_extended(DB + 1))[:DB + 1], DB)
                                for x, y in zip(va, vb)])
        mul_word = concat_list([_saturate(_round_shift((x.sign_extended(2 * DB) * y.sign_extended(2 * DB))
                                                       [:2 * DB], eff_shift), DB) for x, y in zip(va, vb)])
        relu_word = concat_list([select(x[-1], Const(0, DB), x) for x in va])
        v_max, v_sum = Register(DB, "ve_max"), Register(AB, "ve_sum")
        word_max = _tree(_smax, va)
        eff_max = select(iss, word_max, _smax(v_max, word_max))
        v_max.next <<= eff_max
        word_sum = _tree(lambda x, y: (x + y)[:AB], [x.sign_extended(AB) for x in va])
        eff_sum = select(iss, word_sum, (v_sum + word_sum)[:AB])
        v_sum.next <<= eff_sum

        out_word = _sel([(ex[Opcode.REQUANT], rq_word), (ex[Opcode.VADD], add_word), (ex[Opcode.VMUL], mul_word),
                         (ex[Opcode.VRELU], relu_word)], concat_list([eff_max] * C))
        obuf.write("vector", wptr, out_word, feeding & (row_advance | (ex[Opcode.VMAX] & last)))
        pbuf.write("vector", wptr, eff_sum, feeding & ex[Opcode.VSUM] & last)  # broadcast to every lane
        return idle, last, sig

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
        a_in[r][0] = _delay(a_word[r * DB:(r + 1) * DB], r)
        ctl_in[r][0] = _delay(ctl0, r)
    for c in range(C):
        b_in[0][c] = _delay(b_word[c * DB:(c + 1) * DB], c)
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
