"""The accelerator's top level: `build(config)` generates a `Design` (`design(config)`: built once
per process). The builder makes the buffers and the program memory, fetch (the instruction
that may issue and, a cycle ahead, the one after it), each unit of `isa.UNITS` (`dma`, `array`,
`vector`), then the in-order dispatcher and the token counters."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pyrtl
from pyrtl import Const, Input, MemBlock, Output, Register, WireVector, select

from .. import isa
from ..config import AccelConfig
from ..isa import INSTRUCTION_BITS, NEEDS, TOKEN_BITS, UNITS, Buffer, Opcode, Token, Unit
from .array import array_unit
from .circuits import all_of, any_of, fit, nonzero, tree
from .decode import PARAM_WORDS, field_bits, format_field
from .dma import load_engine, store_engine
from .memory import Memory
from .vector import vector_unit

# The instruction header (wait/signal masks): the fields `isa.FORMATS` leaves out; the opcode
# holds the bits below it.
_HEADER = {f.name: f for f in isa.HEADER}


@dataclass
class Design:
    """A built accelerator: its PyRTL block and the handles the runners need."""
    config: AccelConfig
    block: pyrtl.Block
    imem: MemBlock  # the program memory's bank
    memories: list[tuple[str, int, int]] = field(default_factory=list)  # (Verilog name, words, bits) of every memory
    imem_addr_bits: int = 1


def build(config: AccelConfig) -> Design:
    """Generate the accelerator for `config` in a fresh PyRTL block (the working block is left
    as it was)."""
    if isa.FETCH_CYCLES != 1:
        raise NotImplementedError(f"the RTL fetches in one cycle, the ISA says FETCH_CYCLES = {isa.FETCH_CYCLES}")
    block = pyrtl.Block()
    with pyrtl.set_working_block(block, no_sanity_check=True):
        design = Builder(config, block).design
    return design


def _present_ops(config: AccelConfig) -> tuple[Opcode, ...]:
    """The opcodes `config`'s machine runs: all but those of the units it leaves out."""
    return tuple(o for o in Opcode if all(getattr(config, flag) for flag in NEEDS.get(o, ())))


class Builder:
    """Generates one config's accelerator into the working block: the memories, fetch, each
    unit, then the dispatcher and the token counters."""

    def __init__(self, cfg: AccelConfig, block: pyrtl.Block):
        self.cfg = cfg
        ntok = len(Token)
        assert max(Opcode) < 1 << isa.OPCODE.width
        assert _HEADER["wait"].width == _HEADER["signal"].width == ntok
        self.ops = _present_ops(cfg)
        # a DMA instruction's cycles: at most 65535 tiles of `rows` words (tload), and the tile's columns
        self.dma_width = (65535 * max(cfg.beats(b) for b in Buffer) * cfg.rows + cfg.dram_latency
                          + cfg.rows).bit_length()
        self._memories()
        self._fetch()
        # an opcode of a unit the config leaves out never issues (nor does an unknown one): the
        # machine stalls; `isa.check_program` refuses such programs before they run
        unit_of = {u: any_of(self.is_op[o] for o in self.ops if UNITS[o] is u and o is not Opcode.HALT) for u in Unit}
        self.issue_u = {u: self.issue & unit_of[u] for u in Unit}

        # each unit: (idle at the start of this cycle, an instruction ends this cycle, its mask)
        units = {Unit.LOAD: load_engine(self), Unit.STORE: store_engine(self), Unit.ARRAY: array_unit(self),
                 Unit.VECTOR: vector_unit(self)}

        # ---- dispatcher: in order, one instruction a cycle
        idle = {u: units[u][0] for u in Unit}
        tokens = [Register(TOKEN_BITS, f"token_{t.name.lower()}") for t in Token]
        tokens_ok = all_of(~self.waitm[t] | nonzero(tokens[t]) for t in range(ntok))
        all_ended = all_of(idle.values()) & ~self.draining
        unit_ok = any_of([unit_of[u] & idle[u] for u in Unit] + [self.is_op[Opcode.HALT] & all_ended])
        self.issue <<= self.ir_valid & ~self.done & tokens_ok & unit_ok
        self.done.next <<= self.done | (self.issue & self.is_op[Opcode.HALT])

        # ---- tokens: +1 per unit signalling, -1 per issue waiting
        for t in range(ntok):
            inc = tree(lambda x, y: x + y, [fit(fire & sig[t], 3) for _idle, fire, sig in units.values()])
            tokens[t].next <<= fit(tokens[t] + inc - (self.issue & self.waitm[t]), TOKEN_BITS)

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
            Buffer.ABUF: Memory("abuf", cfg.abuf_depth, cfg.word_bits(Buffer.ABUF), ["load"], ["array", "store"],
                                interleave=cfg.abuf_banks),
            # spgemm reads a weight word (even) and an index word (odd) each cycle
            Buffer.BBUF: Memory("bbuf", cfg.bbuf_depth, cfg.word_bits(Buffer.BBUF), ["load"], ["array", "store"],
                                interleave=2 if cfg.sparse_unit else 1),
            Buffer.OBUF: Memory("obuf", cfg.obuf_depth, cfg.word_bits(Buffer.OBUF), ["load", "vector"],
                                ["vec_a", "vec_b", "store"] if vec else ["store"]),
            # the vector unit writes PBUF with vsum (one value in every lane) and, with the
            # nonlinearities, vacc and vresadd; it reads requant's three parameter words, and the
            # nonlinearities' rows and constants, through the param ports
            Buffer.PBUF: Memory("pbuf", cfg.pbuf_depth, cfg.word_bits(Buffer.PBUF), ["load", "vector"] if vec
                                else ["load"], [f"param{j}" for j in range(PARAM_WORDS)] + ["store"],
                                broadcast={"vector": cfg.acc_bits} if vec and not cfg.nonlinear_unit else None),
        }
        self.imem = Memory("imem", cfg.imem_depth, INSTRUCTION_BITS, ["load"], ["fetch"])

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
        pc_next = fit(select(self.ir_valid, pc + issue, Const(0, pcw)), pcw)
        pc.next <<= pc_next
        imem.read("fetch", pc_next + 1)
        ir.next <<= cand
        self.ir_valid.next <<= 1
        o_done = Output(1, "done")
        o_done <<= self.done

        op = field_bits(ir, isa.OPCODE)
        self.ir, self.op, self.cand, self.cand_op = ir, op, cand, field_bits(cand, isa.OPCODE)
        # every opcode decodes (an absent unit's never issues), but wgemm only with the W1A8 unit:
        # the shipped designs predate it, and their netlists stay as synthesized
        self.is_op = {o: op == int(o) for o in Opcode if o is not Opcode.WGEMM or o in self.ops}
        self.waitm, self.sigm = field_bits(ir, _HEADER["wait"]), field_bits(ir, _HEADER["signal"])

    def f(self, o: Opcode, name: str) -> WireVector:
        """Field `name` of the instruction in `ir`, read as an `o`."""
        return field_bits(self.ir, format_field(o, name))

    def held(self, u: Unit, name: str, at_issue: WireVector) -> WireVector:
        """A value unit `u` takes when it issues and keeps until its next issue (in a register
        named `name`): this cycle's."""
        reg = Register(len(at_issue), name)
        eff = select(self.issue_u[u], at_issue, reg)
        reg.next <<= eff
        return eff

    def busy(self, u: Unit, occupancy: WireVector, width: int) -> tuple[WireVector, WireVector]:
        """Unit `u`'s occupancy counter, `occupancy` at issue: (the cycles it stays occupied,
        this one included: 0 when free; idle: it was free when this cycle began)."""
        rem = Register(width, f"{u.value}_rem")
        eff = fit(select(self.issue_u[u], fit(occupancy, width), rem), width)
        rem.next <<= fit(select(nonzero(eff), eff - 1, Const(0, width)), width)
        return eff, rem == 0


@functools.lru_cache(maxsize=8)
def design(config: AccelConfig) -> Design:
    """The design of `config`, built once per process."""
    return build(config)
