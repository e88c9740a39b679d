"""The vector unit's nonlinearities: vgelu, vresadd, vsoftmax and vlayernorm.

They read on a `_Plan`: counting the cycles since issue, the unit reads constants (lane 0 of
PBUF words, three a cycle through the param ports), then row words (a word a cycle: PBUF
through param port 0, OBUF through the ALU's ports); a tag travels with each word through the
lanes' pipelines and becomes the write. vsoftmax and vlayernorm make three passes over their
row (max or sum; sums of e or of c^2; the outputs, vlayernorm's reading a row word, its weight
word and its two bias words through the one port, four cycles a word) with a shared restoring
divider (`divider_steps` quotient bits a cycle, 64 in all) and vlayernorm's square root (that many of
`_isqrt`'s steps a cycle) between them. Each writes its last result before the end of the
ISA's budget (`isa.passes`, checked when the plans are built) and the unit stays occupied for
exactly that. The arithmetic is the IR reference ops' int64 arithmetic, with wires sized from
the bounds their docstrings give (softmax: multiplier >= 0, ln2 > 0, 0 <= (p + b)^2 + c <
2^31; layernorm: 0 <= sum(c^2) + eps < 2^62, |bias| <= 2^60; gelu: |g * out_multiplier| <=
2^62; shifts in [0, 62]): within them the results are the simulator's bit for bit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyrtl import Const, Register, WireVector, concat, concat_list, select

from .. import isa
from ..isa import Buffer, Opcode, Unit
from .circuits import (any_of, const_mul, delay, fit, nonzero, one_hot, sadd, saturate, saturate_to, sclip,
                       select_first, sfit, shr_arith, smax, smin, smul, sneg, split_lanes, ssub, tree)
from .decode import NONLINEAR, ROWWISE, decode_field
from .sequential import divide_step, isqrt_step, iterate
from .slots import LaneSlots

if TYPE_CHECKING:
    from .core import Builder


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
def _plans(cfg) -> dict[Opcode, _Plan]:
    div, sqrt = isa.divider_cycles(cfg), isa.sqrt_cycles(cfg)
    return {
        Opcode.VGELU: _Plan(consts=2, latency=_GELU_STAGES),
        Opcode.VRESADD: _Plan(consts=3, latency=_RESADD_STAGES),
        # the max is there a cycle after pass 1; 2^62 // s a division after s, summed a cycle after e
        Opcode.VSOFTMAX: _Plan(consts=2, passes=3, gap1=_gap(1, 0), gap2=_gap(_E_STAGES + 1 + div, _E_STAGES),
                               latency=_E_STAGES),
        # the sum a cycle after pass 1, then the mean's division; the squares' sum two cycles after
        # pass 2, then the square root and 2^31 // r; pass 3 reads the row word, its weight word
        # and its two bias words, and writes when the last arrives
        Opcode.VLAYERNORM: _Plan(consts=1, passes=3, gap1=_gap(1 + div, 0), gap2=_gap(2 + sqrt + div, 0), group=4),
    }


class Nonlinear:
    """The vector unit's nonlinearities: vgelu and vresadd (a word a cycle through a pipeline)
    and the row ops vsoftmax and vlayernorm (passes over a row of PBUF words; the divider and
    layernorm's square root between them), exactly the IR's int64 reference ops (`_int_gelu`,
    `requantize`, `_int_softmax`, `_int_layer_norm` in ir/reference.py) on values within the
    bounds their docstrings give. Each reads on its `_Plan` (`reads`: the port addresses while
    one runs); a tag travels with each word read (`tag`, as the word arrives) and the lanes'
    pipelines, on the shared `Slot`s, turn it into writes (`obuf_writes`, `pbuf_writes`:
    (enable, word)). The sequencer knows the instruction from its issue on (`ex`); the
    datapaths, whose first word arrives two cycles later, from the cycle after it (`runs`), so
    that the slots' operands do not wait for the dispatcher."""

    def __init__(self, builder: Builder, held, eff_op: WireVector, ex: dict, feeding: WireVector,
                 slots: list[LaneSlots]):
        cfg = builder.cfg
        self.plans, budget = _plans(cfg), isa.passes(cfg)
        for o, plan in self.plans.items():  # the plans meet the ISA's cycle counts
            per_word, fixed = budget[o]
            assert plan.group in (1, 4) and plan.words() <= per_word and plan.last_write(1) < per_word + fixed, o
        self.cfg, self.ex, self.slots = cfg, ex, slots
        running = delay(eff_op, 1)
        self.runs = {o: running == int(o) for o in NONLINEAR}
        self.obuf_writes: list[tuple[WireVector, WireVector]] = []
        self.pbuf_writes: list[tuple[WireVector, WireVector]] = []
        self.divisions: list[tuple[WireVector, WireVector, WireVector]] = []  # (start, dividend, divisor)
        self.quotient = WireVector(64, "nl_quotient")
        self._schedule(builder, held, feeding)
        C, DB, AB = cfg.cols, cfg.data_bits, cfg.acc_bits
        obuf, pbuf = builder.mems[Buffer.OBUF], builder.mems[Buffer.PBUF]
        self.row = split_lanes(pbuf.data["param0"], C, AB)  # the row ops' words
        self.mask = split_lanes(pbuf.data["param1"], C, AB)  # vsoftmax's mask word, beside its row word
        self.va, self.vb = split_lanes(obuf.data["vec_a"], C, DB), split_lanes(obuf.data["vec_b"], C, DB)
        self._gelu()
        self._resadd()
        self._softmax()
        self._layernorm()
        self._divider()

    def _schedule(self, builder: Builder, held, feeding: WireVector) -> None:
        """The read sequencer: k counts the cycles since issue; the plan's windows say what is
        read. Sets `reads`, `tag` (as the words arrive), `consts` (registers), `length`,
        `lane_ok` (lanes of the arriving row word among the first `len`)."""
        cfg, ex, ir, op = self.cfg, self.ex, builder.ir, builder.op
        C, AB = cfg.cols, cfg.acc_bits
        pbuf = builder.mems[Buffer.PBUF]
        n = held("nl_n", decode_field(ir, op, NONLINEAR, "n"))
        self.length = Register(16, "nl_len")  # used from the cycle after issue on: the register will do
        self.length.next <<= select(builder.issue_u[Unit.VECTOR], decode_field(ir, op, ROWWISE, "len"), self.length)
        a = held("nl_a", decode_field(ir, op, NONLINEAR, "a"))
        src_b = held("nl_b", builder.f(Opcode.VRESADD, "b"))
        self.wide = held("nl_wide", builder.f(Opcode.VRESADD, "wide") & (op == int(Opcode.VRESADD)))
        param = held("nl_param", decode_field(ir, op, NONLINEAR, "param"))
        mask = held("nl_mask", builder.f(Opcode.VSOFTMAX, "mask"))
        self.masked = held("nl_masked", builder.f(Opcode.VSOFTMAX, "masked"))
        KW = 21  # k and the windows' arithmetic: occupancies stay below 2^19
        k_reg = Register(KW, "nl_k")
        k = fit(select(builder.issue_u[Unit.VECTOR], Const(0, KW), k_reg), KW)
        k_reg.next <<= fit(k + 1, KW)

        def per_op(value) -> WireVector:
            return select_first([(ex[o], Const(value(plan), KW)) for o, plan in self.plans.items()], Const(0, KW))

        def window(start: WireVector, count: WireVector) -> tuple[WireVector, WireVector]:
            rel = fit(k - start, KW)  # before start it wraps past any count
            return rel, rel < count

        on = feeding & any_of(ex[o] for o in NONLINEAR)
        grouped = any_of(ex[o] for o, plan in self.plans.items() if plan.group > 1)
        n_k = fit(n, KW)
        starts = (per_op(lambda p: p.consts), fit(n_k + per_op(lambda p: p.consts + p.gap1), KW),
                  fit(concat(n_k, Const(0, 1)) + per_op(lambda p: p.consts + p.gap1 + p.gap2), KW))
        windows = [window(starts[0], n_k), window(starts[1], n_k),
                   window(starts[2], select(grouped, fit(concat(n_k, Const(0, 2)), KW), n_k))]
        passes = [on & inside & any_of(ex[o] for o, plan in self.plans.items() if plan.passes > p)
                  for p, (_rel, inside) in enumerate(windows)]
        in_const = on & (k < starts[0])
        rel = select_first([(passes[0], windows[0][0]), (passes[1], windows[1][0])], windows[2][0])
        quad = passes[2] & grouped
        i = fit(select(quad, rel[2:], rel), 16)
        sub = select(quad, rel[:2], Const(0, 2))

        # addresses: constant 3j + p on param port p in cycle j; the row word (layernorm's pass
        # 3: the row word, then its weight word and its two bias words)
        j = fit(k, 2)
        three_j = fit(concat(j, Const(0, 1)) + j, 4)
        consts = [fit(param + three_j + p, 16) for p in range(3)]
        weights = fit(param + isa.CONSTANTS[Opcode.VLAYERNORM], 16)
        row = select_first([(sub == s, weights + const_mul(n, s - 1, 18) + i) for s in (1, 2, 3)],
                           select(self.wide, src_b, a) + i)  # a wide vresadd's b is PBUF's
        # port 1 reads vsoftmax's mask word beside each row word (the constants before the passes)
        self.reads = {"param0": select(in_const, consts[0], row), "param1": select(in_const, consts[1], mask + i),
                      "param2": consts[2], "vec_a": a + i, "vec_b": src_b + i}
        tag = {"const": in_const, "j": j, "p1": passes[0], "p2": passes[1], "p3": passes[2], "i": i, "sub": sub,
               "first": (i == 0) & (sub == 0), "last": (i == fit(n - 1, 16)) & (~quad | (sub == 3))}
        self.tag = t = {name: delay(w, 1) for name, w in tag.items()}

        self.consts = []
        for idx in range(max(isa.CONSTANTS.values())):
            cycle, port = divmod(idx, 3)
            reg = Register(AB, f"nl_const{idx}")
            reg.next <<= select(t["const"] & (t["j"] == cycle), pbuf.data[f"param{port}"][:AB], reg)
            self.consts.append(reg)
        first_lane = const_mul(t["i"], C, 25)
        self.lane_ok = [fit(first_lane + c, 25) < self.length for c in range(C)]

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
            u = delay(sfit(slot.a(on, x, mult, shift), DB + AB), 1)  # |x * multiplier| < 2^(DB+AB-2)
            magnitude = select(u[-1], sneg(u, DB + AB + 1), sfit(u, DB + AB + 1))
            t = delay(ssub(smin(magnitude, clip), clip, AB + 1), 1)  # in [-clip, 0]: |t| < 2^(AB-1)
            positive, negative = delay(~u[-1] & nonzero(u), 1), delay(u[-1], 1)
            square = sfit(slot.b(on, t, t), 2 * AB)
            erf1 = select_first([(positive, ssub(sadd(one, one, 2 * AB), square, 2 * AB)), (negative, square)],
                                sfit(one, 2 * AB))
            g = delay(sfit(smul(delay(x, 3), delay(erf1, 1)), 64), 1)
            out.append(saturate(slot.d(on, g, out_mult, out_shift), DB))
        self.obuf_writes.append((delay(on & self.tag["p1"], _GELU_STAGES), concat_list(out)))

    def _resadd(self) -> None:
        """vresadd: rq(a) + rq(b) in i32 (slots a and b), then rq of the sum (slot d) to i32 and
        to out_bits, written to PBUF (rq: `requantize`, saturating); b from OBUF or, `wide`, from
        PBUF (the row port)."""
        AB = self.cfg.acc_bits
        m_a, s_a, m_b, s_b, m, s, bits = self.consts[:7]
        on = self.runs[Opcode.VRESADD]
        out = []
        for x, narrow, wide, slot in zip(self.va, self.vb, self.row, self.slots):
            y = select(self.wide, wide, sfit(narrow, AB))
            total = sadd(saturate(slot.a(on, x, m_a, s_a), 32), saturate(slot.b(on, y, m_b, s_b), 32), 32)
            result = saturate(slot.d(on, delay(total, _RESADD_STAGES), m, s), 32)
            out.append(saturate_to(result, fit(bits, 6), AB))
        self.pbuf_writes.append((delay(on & self.tag["p1"], _RESADD_STAGES), concat_list(out)))

    def _softmax(self) -> None:
        """vsoftmax (`_int_softmax`): pass 1 the row max m; passes 2 and 3 e of each lane: d = x -
        m, u = max(round(d * multiplier >> shift), -31 ln2) (slot a), z = -u // ln2 and its
        remainder (five restoring steps), p + b = b - remainder, e = ((p + b)^2 + c) >> z (slot
        b); pass 2 sums e, the divider makes r = 2^62 // s, pass 3 writes clip(round(e * r >>
        (62 - out_bits))) (slot d). Lanes past len, and with `masked` those whose mask lane (read
        on port 1 beside the row word) is zero, take no part in the max and get e = 0: they give
        0, and a row with none left gives zeros (s = 0 divides as 1)."""
        DB, AB = self.cfg.data_bits, self.cfg.acc_bits
        mult, shift, ln2, b, c, out_bits = self.consts[:6]
        on, t = self.runs[Opcode.VSOFTMAX], self.tag
        lowest = Const(1 << AB - 1, AB)
        keep = [ok & (~self.masked | nonzero(lane)) for ok, lane in zip(self.lane_ok, self.mask)]  # masked: e = 0
        word_max = tree(smax, [select(k, x, lowest) for x, k in zip(self.row, keep)])
        m = Register(AB, "sm_max")
        m.next <<= select(on & t["p1"], select(t["first"], word_max, smax(m, word_max)), m)

        UW = AB + 6  # u in [-31 ln2, 0]
        floor = sneg(ssub(concat(ln2, Const(0, 5)), ln2, UW), UW)
        es = []
        for x, ok, slot in zip(self.row, keep, self.slots):
            u = delay(sfit(smax(slot.a(on, ssub(x, m, AB + 1), mult, shift), floor), UW), 1)
            rest, z = sneg(u, UW), []
            for bit in range(4, -1, -1):
                part = fit(concat(ln2, Const(0, bit)) if bit else ln2, UW)
                z.append(rest >= part)
                rest = select(z[-1], fit(rest - part, UW), rest)
            q, z = delay(ssub(b, rest, AB + 1), 1), delay(concat(*z), 1)
            e = shr_arith(sadd(slot.b(on, q, q), c, 64), z)  # in [0, 2^31)
            es.append(delay(select(delay(ok, 2), e[:32], Const(0, 32)), 1))
        # the tags gated by this op before they wait: the previous row op's last pass-3 tags are
        # still on their way when this one starts
        late = {name: delay(on & t[name], _E_STAGES) for name in ("p2", "p3", "first", "last")}
        word_sum = tree(lambda x, y: sadd(x, y, 48), es)  # s < len * 2^31 < 2^47
        s = Register(48, "sm_sum")
        s.next <<= select(late["p2"], select(late["first"], word_sum, sadd(s, word_sum, 48)), s)
        self.divisions.append((delay(late["p2"] & late["last"], 1), Const(1 << 62, 64),
                               select(s == 0, Const(1, 48), s)))
        high = (one_hot(fit(out_bits, 5), 17) - 1)[:17]  # 2^out_bits - 1 (out_bits < data_bits)
        down = fit(Const(62, 7) - fit(out_bits, 7), 7)
        out = [sfit(sclip(slot.d(on, self.quotient, e, down), Const(0, 1), high), DB)
               for e, slot in zip(es, self.slots)]
        self.obuf_writes.append((late["p3"], concat_list(out)))

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
        word = tree(lambda x, y: sadd(x, y, SW), [select(ok, sfit(x, SW), Const(0, SW))
                                                     for x, ok in zip(self.row, self.lane_ok)])
        s = Register(SW, "ln_sum")
        s.next <<= select(on & t["p1"], select(t["first"], word, sadd(s, word, SW)), s)
        count = self.length.zero_extended(17)
        numerator = sadd(concat(s, Const(0, 1)), count, SW + 2)  # 2s + N
        negative = numerator[-1]
        den = concat(self.length, Const(0, 1))  # 2N
        magnitude = select(negative, sneg(numerator, SW + 2), numerator)
        self.divisions.append((on & delay(t["p1"] & t["last"], 1),
                               fit(magnitude + select(negative, den - 1, Const(0, 1)), 64), den))
        quotient = fit(self.quotient, AB + 1)  # |mean| <= 2^(AB-1)
        mean = Register(AB + 1, "ln_mean")
        eff_mean = select(on & t["p2"] & t["first"],
                          select(negative, sneg(quotient, AB + 1), quotient), mean)
        mean.next <<= eff_mean

        fw = max(AB + 1, 33)
        f = sfit(concat(Const(0, 1), fit(self.quotient, 32)), fw)  # 2^31 // r <= 2^31
        row_word, weight_word, low_word = (t["p3"] & (t["sub"] == k) for k in range(3))
        squares, out = [], []
        for x, ok, slot in zip(self.row, self.lane_ok, self.slots):
            cx = ssub(x, eff_mean, AB + 1)
            product = sfit(slot.a(on, cx, select(t["p3"], f, sfit(cx, fw))), 64)  # c^2, or c * f
            squares.append(delay(select(ok, product, Const(0, 64)), 1))
            kept = []
            for when, value in ((row_word, product), (weight_word, x), (low_word, x)):
                reg = Register(len(value))
                reg.next <<= select(when, value, reg)
                kept.append(reg)
            normed, w, low = kept
            y = saturate(slot.d(on, normed, w, shift, add=concat(x, low)), DB)
            out.append(select(ok, y, Const(0, DB)))
        t1 = {name: delay(t[name], 1) for name in ("p2", "first", "last")}
        v_word = tree(lambda x, y: sadd(x, y, 64), squares)
        v = Register(64, "ln_var")
        v.next <<= select(on & t1["p2"], select(t1["first"], v_word, sadd(v, v_word, 64)), v)
        (_rest, root, _bit), done = iterate("ln_sqrt", on & delay(t1["p2"] & t1["last"], 1),
                                            [sadd(v, eps, 64), Const(0, 64), Const(1 << 60, 64)], isqrt_step,
                                            isa.sqrt_cycles(self.cfg), self.cfg.divider_steps)
        self.divisions.append((on & done, Const(1 << 31, 64), select(root == 0, Const(1, 48), fit(root, 48))))
        self.obuf_writes.append((on & t["p3"] & (t["sub"] == 3), concat_list(out)))

    def _divider(self) -> None:
        """The divider the row ops share: a 64-bit dividend by a divisor below 2^48, restoring,
        `divider_steps` quotient bits a cycle (`isa.divider_cycles`); its quotient stays until the
        next division starts."""
        start = any_of(s for s, _dividend, _divisor in self.divisions)
        dividend = select_first([(s, d) for s, d, _ in self.divisions[1:]], self.divisions[0][1])
        divisor = select_first([(s, fit(d, 48)) for s, _, d in self.divisions[1:]], fit(self.divisions[0][2], 48))
        held = Register(48, "div_divisor")
        eff = select(start, divisor, held)
        held.next <<= eff
        (_rest, quotient), _done = iterate("div", start, [Const(0, 49), dividend], divide_step(eff),
                                           isa.divider_cycles(self.cfg), self.cfg.divider_steps)
        self.quotient <<= quotient
