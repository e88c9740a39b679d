"""Small circuit helpers the accelerator is built from: widths, signed arithmetic (PyRTL widens
with zeros; every signed step here is explicit), saturation and rounding shifts, reductions and
the delay lines."""

from __future__ import annotations

import pyrtl
from pyrtl import Const, Register, WireVector, concat, select


def address_bits(n: int) -> int:
    """Address bits for `n` entries (at least 1)."""
    return max(1, (n - 1).bit_length())


def fit(w, n: int) -> WireVector:
    """`w` truncated or zero-extended to `n` bits."""
    w = pyrtl.as_wires(w)
    return w[:n] if len(w) > n else w.zero_extended(n)


def sfit(w, n: int) -> WireVector:
    """`w` (two's complement) truncated or sign-extended to `n` bits."""
    return w[:n] if len(w) > n else w.sign_extended(n)


def nonzero(w) -> WireVector:
    return pyrtl.or_all_bits(w) if len(w) > 1 else w


def any_of(ws) -> WireVector:
    ws = list(ws)
    return pyrtl.rtl_any(*ws) if len(ws) > 1 else ws[0] if ws else Const(0, 1)


def all_of(ws) -> WireVector:
    ws = list(ws)
    return pyrtl.rtl_all(*ws) if len(ws) > 1 else ws[0] if ws else Const(1, 1)


def select_first(cases, default) -> WireVector:
    """The first value whose condition holds: `cases` = [(cond, value), ...]."""
    out = pyrtl.as_wires(default)
    for cond, value in reversed(cases):
        out = select(cond, value, out)
    return out


def smul(a: WireVector, b: WireVector) -> WireVector:
    """Exact signed product, len(a) + len(b) bits: an unsigned multiplier (what DSP blocks map
    well) and the two's complement corrections."""
    na, nb = len(a), len(b)
    n = na + nb
    p = (a * b)[:n]
    corr = select(a[-1], concat(b, Const(0, na)), Const(0, n)) + select(b[-1], concat(a, Const(0, nb)), Const(0, n))
    return (p - corr)[:n]


def shr_arith(x: WireVector, s: WireVector) -> WireVector:
    """x >> s, arithmetic (s unsigned; shifts past the width give the sign)."""
    width, sign = len(x), x[-1]
    for i in range(len(s)):
        amount = 1 << i
        shifted = sign.sign_extended(width) if amount >= width else concat(sign.sign_extended(amount), x[amount:])
        x = select(s[i], shifted, x)
    return x


def one_hot(s: WireVector, width: int) -> WireVector:
    """1 << s in `width` bits (0 when s >= width), as a barrel shifter of 1."""
    x = Const(1, width)
    for i in range(len(s)):
        amount = 1 << i
        shifted = Const(0, width) if amount >= width else concat(x[:width - amount], Const(0, amount))
        x = select(s[i], shifted, x)
    return x


def round_shift(p: WireVector, s: WireVector) -> WireVector:
    """(p + 2^(s-1)) >> s exactly (round half up, arithmetic shift; s = 0: p) for signed p
    (`len(p) + 2` bits). Shifts of at least len(p) give 0 like any larger one, so s is clamped
    there."""
    n = len(p)
    sbits = n.bit_length()
    s_eff = select(s > n, Const(n, sbits), fit(s, sbits)) if len(s) > sbits or (1 << len(s)) - 1 > n else s
    width = n + 2
    half = one_hot(s_eff, width + 1)[1:]  # 2^(s-1), 0 for s = 0
    return shr_arith((p.sign_extended(width) + half)[:width], s_eff)


def saturate(x: WireVector, bits: int) -> WireVector:
    """Signed x clipped to [-2^(bits-1), 2^(bits-1) - 1], `bits` wide."""
    if len(x) <= bits:
        return x.sign_extended(bits)
    top = x[bits - 1:]
    fits = (top == 0) | (top == (1 << len(top)) - 1)
    low, high = Const(1 << (bits - 1), bits), Const((1 << (bits - 1)) - 1, bits)
    return select(fits, x[:bits], select(x[-1], low, high))


def sclip(x: WireVector, low: WireVector, high: WireVector) -> WireVector:
    """Signed x clipped to [low, high] (signed wires), as wide as the widest."""
    width = max(len(x), len(low), len(high))
    x, low, high = (w.sign_extended(width) for w in (x, low, high))
    return select(pyrtl.signed_lt(high, x), high, select(pyrtl.signed_lt(x, low), low, x))


def saturate_to(x: WireVector, bits: WireVector, width: int) -> WireVector:
    """Signed x clipped to the range of `bits` (a wire, 1 <= bits <= width) signed bits."""
    top = one_hot(fit(bits - 1, len(bits)), width + 1)  # 2^(bits-1)
    return sclip(x, ~(top - 1)[:width + 1], (top - 1)[:width + 1])[:width]


def smax(a: WireVector, b: WireVector) -> WireVector:
    width = max(len(a), len(b))
    a, b = a.sign_extended(width), b.sign_extended(width)
    return select(pyrtl.signed_lt(a, b), b, a)


def smin(a: WireVector, b: WireVector) -> WireVector:
    width = max(len(a), len(b))
    a, b = a.sign_extended(width), b.sign_extended(width)
    return select(pyrtl.signed_lt(a, b), a, b)


def sadd(a: WireVector, b: WireVector, width: int) -> WireVector:
    """a + b of signed wires, in (wrapping to) `width` bits."""
    return (sfit(a, width) + sfit(b, width))[:width]


def ssub(a: WireVector, b: WireVector, width: int) -> WireVector:
    """a - b of signed wires, in (wrapping to) `width` bits."""
    return (sfit(a, width) - sfit(b, width))[:width]


def sneg(a: WireVector, width: int) -> WireVector:
    """-a of a signed wire, in (wrapping to) `width` bits."""
    return ssub(Const(0, 1), a, width)


def tree(op, items):
    items = list(items)
    while len(items) > 1:
        items = [op(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def split_lanes(word: WireVector, lanes: int, bits: int) -> list[WireVector]:
    return [word[j * bits:(j + 1) * bits] for j in range(lanes)]


def const_mul(w: WireVector, k: int, width: int) -> WireVector:
    """w * k (k a constant) by shifts and adds, `width` bits."""
    out = Const(0, width)
    for i in range(k.bit_length()):
        if k >> i & 1:
            out = fit(out + fit(concat(w, Const(0, i)) if i else w, width), width)
    return out


DELAY_LINE = "dl_"  # name prefix of data delay-line registers (see `delay`)


def delay(w: WireVector, cycles: int, line: str = "") -> WireVector:
    """`w` `cycles` cycles late. A named `line` carries data that only a tag travelling beside
    it makes count: its registers are named `DELAY_LINE + line + stage` and the Verilog export
    gives them no reset, so synthesis can pack the line into shift registers."""
    for i in range(cycles):
        r = Register(len(w), name=f"{DELAY_LINE}{line}_{i}" if line else "")
        r.next <<= w
        w = r
    return w


def popcount(w: WireVector) -> WireVector:
    """The number of set bits of `w` (an adder tree)."""
    return tree(lambda x, y: x + y, [w[i] for i in range(len(w))])
