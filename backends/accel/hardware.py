"""The accelerator's RTL, generated with PyRTL from one `AccelConfig`, and its PyRTL simulation.

`build(config)` returns a `Design`: a PyRTL block with
- instruction fetch from a program memory (`imem_depth` x 128 bits, written through the
  `imem_we/imem_waddr/imem_wdata` port while the machine is held in reset) and decode: field
  positions come from `isa.FORMATS`, opcodes from `isa.Opcode`;
- an in-order dispatcher with the four token counters (`isa.Token`, `TOKEN_BITS` each);
- three units: the DMA load engine (DRAM -> buffer), the compute unit (an output-stationary
  `rows x cols` systolic array of `data_bits` multipliers with `acc_bits` accumulators, and a
  `cols`-lane vector unit for requant/vadd/vmul/vrelu/vmax/vsum) and the DMA store engine;
- the buffers ABUF/BBUF/OBUF/PBUF (lane layout as `isa.pack_words`); ABUF as `abuf_banks`
  memories, low-order interleaved (word a in bank a % banks).

`vector_unit=False` leaves out the vector ALU (vadd/vmul/vrelu/vmax/vsum), its two OBUF read
ports and PBUF's compute bank: its opcodes never issue (`isa.check_program` refuses programs
that use them); requant, the array's output path, stays.

DRAM lies outside: each cycle the design drives `dram_raddr` (with `dram_re`) and receives in
`dram_rdata` the word at the address it requested in the previous cycle (a registered read); it
writes with `dram_we/dram_waddr/dram_wdata` (applied at the end of the cycle). `done` rises in
the cycle after `halt` issues: the run's cycle count (`isa_sim.Stats.cycles`) is the number of
clock steps after reset until `done` is seen.

Timing is the ISA's contract (`isa.Instruction.duration`): an instruction issues in cycle t when
its unit is idle and its tokens are there, keeps the unit busy [t, t+d) and signals at the edge
ending t+d-1. To meet it with block-RAM buffers (synchronous reads), every buffer read port has
a registered address (a transparent synchronous read: it sees the writes of the previous edge)
and the compute unit presents the first addresses of the next instruction one cycle ahead
(the fetch stage holds the instruction after the current one). Buffers written by two units
(OBUF, PBUF) keep one bank per writer and a live-value table saying which bank holds the
newest word."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pyrtl
from pyrtl import Const, Input, MemBlock, Output, Register, WireVector, concat, concat_list, mux, select

from . import isa
from .config import AccelConfig
from .isa import FORMATS, INSTRUCTION_BITS, TOKEN_BITS, UNITS, Buffer, Opcode, Token, Unit

# The instruction header (wait/signal masks): the fields `isa.FORMATS` leaves out; the opcode
# holds the bits below it.
_HEADER = {f.name: f for f in isa.HEADER}
_PARAM_WORDS = 3  # requant reads PBUF[param], [param+1], [param+2]: bias, multiplier, shift
_VECTOR_OPS = isa.VECTOR_OPS  # the vector unit's, left out when `AccelConfig.vector_unit` is False
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


class _Memory:
    """A buffer: one bank (a MemBlock with one write port) per writing unit, a live-value table
    when several units write it, and one read port per reader with a registered address: the
    data of the address presented in cycle c is there in cycle c + 1 and includes the writes of
    the edge ending c. Yosys maps each bank to block RAM (replicated per read port).

    `interleave` > 1 (a power of two) splits each writer's bank into that many memories, word
    `a` in memory `a % interleave` at index `a // interleave`: a reader's registered address
    picks the index (its high bits) in every memory and the memory (its low bits) whose word
    comes out, so reads and writes behave, cycle for cycle, as with one memory."""

    def __init__(self, name: str, depth: int, width: int, writers: list[str], readers: list[str],
                 broadcast: dict[str, int] | None = None, interleave: int = 1):
        """`broadcast[w] = bits`: writer `w` only writes words whose lanes all hold one
        `bits`-wide value; its bank stores that value once."""
        assert interleave >= 1 and not interleave & (interleave - 1) and depth % interleave == 0
        self.name, self.depth, self.width = name, depth, width
        self.interleave, self.sel_bits = interleave, (interleave - 1).bit_length()
        self.index_bits = _bits(depth // interleave)
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
        for r in readers:
            reg = Register(self.aw, name=f"{name}_raddr_{r}")
            values = [self._widen(w, self._read_banks(banks, reg)) for w, banks in self.banks.items()]
            self.addr[r] = reg
            self.data[r] = values[0] if self.lvt is None else mux(self.lvt[reg], *values, default=values[0])

    def _read_banks(self, banks: list[MemBlock], reg: Register) -> WireVector:
        if self.interleave == 1:
            return banks[0][reg]
        index, sel = reg[self.sel_bits:], reg[:self.sel_bits]
        return mux(sel, *[b[index] for b in banks])

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


class _Builder:
    def __init__(self, cfg: AccelConfig, block: pyrtl.Block):
        self.cfg = cfg
        R, C, DB, AB = cfg.rows, cfg.cols, cfg.data_bits, cfg.acc_bits
        D, L = cfg.dram_bits, cfg.dram_latency
        ntok = len(Token)
        assert max(Opcode) < 1 << isa.OPCODE.width and _HEADER["wait"].width == ntok
        vec = cfg.vector_unit  # without it: no vector ALU, no OBUF ports for it, PBUF written by loads only
        vector_ops = _VECTOR_OPS if vec else ()

        # ---- memories
        mems = {
            Buffer.ABUF: _Memory("abuf", cfg.abuf_depth, cfg.word_bits(Buffer.ABUF), ["load"], ["gemm", "store"],
                                 interleave=cfg.abuf_banks),
            Buffer.BBUF: _Memory("bbuf", cfg.bbuf_depth, cfg.word_bits(Buffer.BBUF), ["load"], ["gemm", "store"]),
            Buffer.OBUF: _Memory("obuf", cfg.obuf_depth, cfg.word_bits(Buffer.OBUF), ["load", "compute"],
                                 ["vec_a", "vec_b", "store"] if vec else ["store"]),
            # the compute unit writes PBUF only with vsum: one value in every lane
            Buffer.PBUF: _Memory("pbuf", cfg.pbuf_depth, cfg.word_bits(Buffer.PBUF), ["load", "compute"] if vec
                                 else ["load"], [f"param{j}" for j in range(_PARAM_WORDS)] + ["store"],
                                 broadcast={"compute": AB} if vec else None),
        }
        imem = _Memory("imem", cfg.imem_depth, INSTRUCTION_BITS, ["load"], ["fetch"])

        # ---- ports
        dram_rdata = Input(D, "dram_rdata")
        imem_we, imem_waddr = Input(1, "imem_we"), Input(imem.aw, "imem_waddr")
        imem_wdata = Input(INSTRUCTION_BITS, "imem_wdata")
        o_raddr, o_re = Output(DRAM_ADDR_BITS, "dram_raddr"), Output(1, "dram_re")
        o_we, o_waddr, o_wdata = Output(1, "dram_we"), Output(DRAM_ADDR_BITS, "dram_waddr"), Output(D, "dram_wdata")
        o_done = Output(1, "done")
        imem.write("load", imem_waddr, imem_wdata, imem_we)

        # ---- fetch: `ir` holds the instruction that may issue, the program memory's output the
        # one after it (so the next instruction's buffer addresses can be presented a cycle early)
        pcw = imem.aw + 1
        ir, ir_valid = Register(INSTRUCTION_BITS, "ir"), Register(1, "ir_valid")
        pc, done = Register(pcw, "pc"), Register(1, "done_r")
        nxt = imem.data["fetch"]
        issue = WireVector(1, "issue")
        advance = ~ir_valid | issue
        cand = select(advance, nxt, ir)  # the instruction that may issue next cycle
        pc_next = _fit(select(ir_valid, pc + issue, Const(0, pcw)), pcw)
        pc.next <<= pc_next
        imem.read("fetch", pc_next + 1)
        ir.next <<= cand
        ir_valid.next <<= 1

        op = _slice(ir, isa.OPCODE)
        is_op = {o: op == int(o) for o in Opcode}
        waitm, sigm = _slice(ir, _HEADER["wait"]), _slice(ir, _HEADER["signal"])
        cand_op = _slice(cand, isa.OPCODE)

        def f(o: Opcode, name: str) -> WireVector:  # a field of the instruction in `ir`
            return _slice(ir, _field(o, name))

        # ---- dispatcher
        tokens = [Register(TOKEN_BITS, f"token_{t.name.lower()}") for t in Token]
        rem = {u: None for u in Unit}
        dma_width = (65535 * max(cfg.beats(b) for b in Buffer) + L).bit_length()
        widths = {Unit.LOAD: dma_width, Unit.STORE: dma_width,
                  Unit.COMPUTE: max(65535 + R + C, R).bit_length()}
        for u in Unit:
            rem[u] = Register(widths[u], f"{u.value}_rem")
        idle = {u: rem[u] == 0 for u in Unit}
        # an opcode of a unit the config leaves out never issues (nor does an unknown one): the
        # machine stalls; `isa.check_program` refuses such programs before they run
        unit_of = {u: _any(is_op[o] for o in Opcode if UNITS[o] is u and o is not Opcode.HALT
                           and (o not in _VECTOR_OPS or vec)) for u in Unit}
        tokens_ok = _all(~waitm[t] | _nonzero(tokens[t]) for t in range(ntok))
        unit_ok = _any([unit_of[u] & idle[u] for u in Unit] + [is_op[Opcode.HALT] & _all(idle.values())])
        issue <<= ir_valid & ~done & tokens_ok & unit_ok
        issue_u = {u: issue & unit_of[u] for u in Unit}
        done.next <<= done | (issue & is_op[Opcode.HALT])
        o_done <<= done

        def timing(u: Unit, duration: WireVector):
            """Busy counter and signal mask of unit `u`: (fires this cycle, its signal mask)."""
            eff = _fit(select(issue_u[u], _fit(duration, widths[u]), rem[u]), widths[u])
            busy = _nonzero(eff)
            rem[u].next <<= _fit(select(busy, eff - 1, Const(0, widths[u])), widths[u])
            sig = Register(ntok, f"{u.value}_sig")
            eff_sig = select(issue_u[u], sigm, sig)
            sig.next <<= eff_sig
            return eff == 1, eff_sig

        def beats_of(buf: WireVector, minus: int = 0) -> WireVector:
            return mux(buf, *[Const(cfg.beats(b) - minus, 16) for b in Buffer])

        def transfer_beats(o: Opcode) -> WireVector:  # count * beats(buf) of the DMA instruction in `ir`
            count, buf = f(o, "count"), f(o, "buf")
            return mux(buf, *[_const_mul(count, cfg.beats(b), dma_width) for b in Buffer])

        # ---- load engine: requests beat j at k = L-1+j (k: cycles since issue), receives it at
        # k = L+j, writes a buffer word when its last beat arrives
        lw = max(1, (L - 1).bit_length())
        l_wait, l_left = Register(lw, "ld_wait"), Register(dma_width, "ld_left")
        l_addr = Register(DRAM_ADDR_BITS, "ld_dram")
        iss = issue_u[Unit.LOAD]
        eff_wait = select(iss, Const(L - 1, lw), l_wait)
        eff_left = _fit(select(iss, transfer_beats(Opcode.LOAD), l_left), dma_width)
        eff_addr = _fit(select(iss, f(Opcode.LOAD, "dram"), l_addr), DRAM_ADDR_BITS)
        request = (eff_wait == 0) & _nonzero(eff_left)
        l_wait.next <<= _fit(select(eff_wait == 0, Const(0, lw), eff_wait - 1), lw)
        l_left.next <<= _fit(select(request, eff_left - 1, eff_left), dma_width)
        l_addr.next <<= _fit(select(request, eff_addr + 1, eff_addr), DRAM_ADDR_BITS)
        o_raddr <<= eff_addr
        o_re <<= request
        l_fire, l_sig = timing(Unit.LOAD, Const(L, dma_width) + transfer_beats(Opcode.LOAD))

        rvalid = Register(1, "ld_rvalid")
        rvalid.next <<= request
        max_beats = max(cfg.beats(b) for b in Buffer)
        bw = max(1, (max_beats - 1).bit_length())
        l_buf, l_beat = Register(2, "ld_buf"), Register(bw, "ld_beat")
        l_waddr = Register(16, "ld_waddr")
        last_beat = l_beat == _fit(beats_of(l_buf, 1), bw)
        word_done = rvalid & last_beat
        l_buf.next <<= select(iss, f(Opcode.LOAD, "buf"), l_buf)
        l_beat.next <<= _fit(select(iss | word_done, Const(0, bw), select(rvalid, l_beat + 1, l_beat)), bw)
        l_waddr.next <<= _fit(select(iss, f(Opcode.LOAD, "addr"), select(word_done, l_waddr + 1, l_waddr)), 16)
        parts = []
        for p in range(max_beats - 1):
            r = Register(D, f"ld_beat{p}")
            r.next <<= select(rvalid & (l_beat == p), dram_rdata, r)
            parts.append(r)
        for b in Buffer:
            word = concat_list(parts[:cfg.beats(b) - 1] + [dram_rdata])
            mems[b].write("load", l_waddr, _fit(word, cfg.word_bits(b)), word_done & (l_buf == int(b)))

        # ---- store engine: presents buffer word w at k = L-1+w*beats, writes beat j at k = L+j
        sw = L.bit_length()
        s_wait, s_left = Register(sw, "st_wait"), Register(dma_width, "st_left")
        s_beat, s_rptr = Register(bw, "st_beat"), Register(16, "st_rptr")
        s_buf, s_daddr = Register(2, "st_buf"), Register(DRAM_ADDR_BITS, "st_dram")
        iss = issue_u[Unit.STORE]
        eff_wait = select(iss, Const(L, sw), s_wait)
        eff_left = _fit(select(iss, transfer_beats(Opcode.STORE), s_left), dma_width)
        eff_beat = select(iss, Const(0, bw), s_beat)
        eff_rptr = select(iss, f(Opcode.STORE, "addr"), s_rptr)
        eff_buf = select(iss, f(Opcode.STORE, "buf"), s_buf)
        writing = (eff_wait == 0) & _nonzero(eff_left)
        last_in_word = eff_beat == _fit(beats_of(eff_buf, 1), bw)
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
        s_fire, s_sig = timing(Unit.STORE, Const(L, dma_width) + transfer_beats(Opcode.STORE))

        # ---- compute unit
        iss = issue_u[Unit.COMPUTE]
        ops_a = [o for o in vector_ops if "a" in {x.name for x in FORMATS[o]}]
        ops_b = [o for o in vector_ops if "b" in {x.name for x in FORMATS[o]}]
        ops_dst = [Opcode.REQUANT, *vector_ops]
        if vec:
            c_dur = _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "k") + (R + C - 2)),
                          (is_op[Opcode.REQUANT], Const(R))], _decode_field(ir, op, _VECTOR_OPS, "n"))
            c_feed_issue = _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "k")), (is_op[Opcode.REQUANT], Const(R))],
                                _decode_field(ir, op, _VECTOR_OPS, "n"))
        else:  # gemm or requant
            c_dur = _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "k") + (R + C - 2))], Const(R))
            c_feed_issue = _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "k"))], Const(R))
        c_fire, c_sig = timing(Unit.COMPUTE, c_dur)

        c_op = Register(isa.OPCODE.width, "ex_op")
        eff_op = select(iss, op, c_op)
        c_op.next <<= eff_op
        ex = {o: eff_op == int(o) for o in Opcode}
        fw = 17
        c_feed = Register(fw, "ex_feed")
        eff_feed = _fit(select(iss, c_feed_issue, c_feed), fw)
        feeding = _nonzero(eff_feed)
        more = eff_feed > 1  # another word follows: present its address now
        last = eff_feed == 1
        c_feed.next <<= _fit(select(feeding, eff_feed - 1, Const(0, fw)), fw)

        def pointer(name: str, at_issue: WireVector, step) -> WireVector:
            reg = Register(16, name)
            eff = _fit(select(iss, at_issue, reg), 16)
            reg.next <<= _fit(select(step, eff + 1, eff), 16)
            return eff

        if vec:
            p1 = pointer("ex_p1", _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "a"))],
                                       _decode_field(ir, op, ops_a, "a")), Const(1))
            p2 = pointer("ex_p2", _sel([(is_op[Opcode.GEMM], f(Opcode.GEMM, "b"))],
                                       _decode_field(ir, op, ops_b, "b")), Const(1))
        else:
            p1, p2 = pointer("ex_p1", f(Opcode.GEMM, "a"), Const(1)), pointer("ex_p2", f(Opcode.GEMM, "b"), Const(1))
        row_advance = feeding & _any(ex[o] for o in (Opcode.REQUANT, *(_ELEMENTWISE if vec else ())))
        wptr = pointer("ex_w", _decode_field(ir, op, ops_dst, "dst"), row_advance)
        rw = _bits(R)
        c_row = Register(rw, "ex_row")
        eff_row = _fit(select(iss, Const(0, rw), c_row), rw)
        c_row.next <<= _fit(eff_row + 1, rw)
        c_relu = Register(1, "ex_relu")
        eff_relu = select(iss, f(Opcode.REQUANT, "relu"), c_relu)
        c_relu.next <<= eff_relu
        if vec:
            shift_f = _field(Opcode.VMUL, "shift")
            c_shift = Register(shift_f.width, "ex_shift")
            eff_shift = select(iss, f(Opcode.VMUL, "shift"), c_shift)
            c_shift.next <<= eff_shift

        # read ports: the running instruction's next word, else the first word of the instruction
        # that may issue next cycle
        stream_a = ex[Opcode.GEMM] & more
        mems[Buffer.ABUF].read("gemm", select(stream_a, p1 + 1, _decode_field(cand, cand_op, [Opcode.GEMM], "a")))
        mems[Buffer.BBUF].read("gemm", select(stream_a, p2 + 1, _decode_field(cand, cand_op, [Opcode.GEMM], "b")))
        if vec:
            mems[Buffer.OBUF].read("vec_a", select(_any(ex[o] for o in ops_a) & more, p1 + 1,
                                                   _decode_field(cand, cand_op, ops_a, "a")))
            mems[Buffer.OBUF].read("vec_b", select(_any(ex[o] for o in ops_b) & more, p2 + 1,
                                                   _decode_field(cand, cand_op, ops_b, "b")))
        la_param = _decode_field(cand, cand_op, [Opcode.REQUANT], "param")
        pbuf = mems[Buffer.PBUF]
        for j in range(_PARAM_WORDS):  # held while requant runs
            port = f"param{j}"
            pbuf.read(port, select(ex[Opcode.REQUANT] & more, pbuf.addr[port], la_param + j))

        # the systolic array: A lane r enters row r skewed by r cycles, B lane c enters column c
        # skewed by c; (valid, clear) travel with A; PE(i, j) does MAC m in cycle t+m+i+j
        a_word, b_word = mems[Buffer.ABUF].data["gemm"], mems[Buffer.BBUF].data["gemm"]
        valid0 = ex[Opcode.GEMM] & feeding
        clear0 = iss & is_op[Opcode.GEMM] & ~f(Opcode.GEMM, "acc")
        a_in = [[None] * C for _ in range(R)]
        b_in = [[None] * C for _ in range(R)]
        ctl_in = [[None] * C for _ in range(R)]
        for r in range(R):
            a_in[r][0] = _delay(a_word[r * DB:(r + 1) * DB], r)
            ctl_in[r][0] = _delay(concat(valid0, clear0), r)
        for c in range(C):
            b_in[0][c] = _delay(b_word[c * DB:(c + 1) * DB], c)
        acc = [[Register(AB, f"acc_{r}_{c}") for c in range(C)] for r in range(R)]
        for r in range(R):
            for c in range(C):
                a, b, ctl = a_in[r][c], b_in[r][c], ctl_in[r][c]
                if c + 1 < C:
                    a_in[r][c + 1], ctl_in[r][c + 1] = _delay(a, 1), _delay(ctl, 1)
                if r + 1 < R:
                    b_in[r + 1][c] = _delay(b, 1)
                valid, clear = ctl[1], ctl[0]
                product = _sfit((a.sign_extended(2 * DB) * b.sign_extended(2 * DB))[:2 * DB], AB)
                base = select(clear, Const(0, AB), acc[r][c])
                acc[r][c].next <<= select(valid, (base + product)[:AB], acc[r][c])

        # requant: row eff_row of ACC with PBUF[param .. param+2] -> OBUF[dst + row]
        rows = [concat_list(acc[r]) for r in range(R)]
        acc_row = rows[0] if R == 1 else mux(eff_row, *rows, default=rows[0])
        bias, mult, shift = (_lanes(pbuf.data[f"param{j}"], C, AB) for j in range(_PARAM_WORDS))
        rq = []
        for c in range(C):
            x = (acc_row[c * AB:(c + 1) * AB] + bias[c])[:AB]
            y = _saturate(_round_shift(_smul(x, mult[c]), shift[c]), DB)
            rq.append(select(eff_relu & y[-1], Const(0, DB), y))
        rq_word = concat_list(rq)

        if not vec:  # no vector unit: requant rows are all the compute unit writes
            mems[Buffer.OBUF].write("compute", wptr, rq_word, row_advance)
        else:  # the vector unit
            va = _lanes(mems[Buffer.OBUF].data["vec_a"], C, DB)
            vb = _lanes(mems[Buffer.OBUF].data["vec_b"], C, DB)
            add_word = concat_list([_saturate((x.sign_extended(DB + 1) + y.sign_extended(DB + 1))[:DB + 1], DB)
                                    for x, y in zip(va, vb)])
            mul_word = concat_list([_saturate(_round_shift((x.sign_extended(2 * DB) * y.sign_extended(2 * DB))
                                                           [:2 * DB], eff_shift), DB) for x, y in zip(va, vb)])
            relu_word = concat_list([select(x[-1], Const(0, DB), x) for x in va])
            c_max, c_sum = Register(DB, "ex_max"), Register(AB, "ex_sum")
            word_max = _tree(_smax, va)
            eff_max = select(iss, word_max, _smax(c_max, word_max))
            c_max.next <<= eff_max
            word_sum = _tree(lambda x, y: (x + y)[:AB], [x.sign_extended(AB) for x in va])
            eff_sum = select(iss, word_sum, (c_sum + word_sum)[:AB])
            c_sum.next <<= eff_sum

            out_word = _sel([(ex[Opcode.REQUANT], rq_word), (ex[Opcode.VADD], add_word), (ex[Opcode.VMUL], mul_word),
                             (ex[Opcode.VRELU], relu_word)], concat_list([eff_max] * C))
            obuf_we = feeding & (row_advance | (ex[Opcode.VMAX] & last))
            mems[Buffer.OBUF].write("compute", wptr, out_word, obuf_we)
            pbuf.write("compute", wptr, eff_sum, feeding & ex[Opcode.VSUM] & last)  # broadcast to every lane

        # ---- tokens: +1 per unit signalling, -1 per issue waiting
        for t in range(ntok):
            inc = _fit(l_fire & l_sig[t], 2) + (c_fire & c_sig[t]) + (s_fire & s_sig[t])
            tokens[t].next <<= _fit(tokens[t] + inc - (issue & waitm[t]), TOKEN_BITS)

        memories = []
        for m in [*mems.values(), imem]:
            for mb in m.memblocks():
                memories.append((mb.name, 1 << mb.addrwidth, mb.bitwidth))
        self.design = Design(cfg, block, imem.banks["load"][0], memories, imem.aw)


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
