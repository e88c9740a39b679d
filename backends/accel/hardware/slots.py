"""The vector unit's lanes share their multipliers (one instruction runs at a time): each lane
has `Slot`s, a multiplier with an adder and the rounding shift after it (`round((a * b + add)
>> s)`, the sum in int64), whose operands are those of the running instruction: slot a
((acc_bits + 1) x 33 bits: requant, vmul, and the nonlinearities' first product), b ((acc_bits
+ 1)^2) and d (64 x 32 bits, plus layernorm's bias); vgelu has one more multiplier of its own
(data_bits x 2 acc_bits)."""

from __future__ import annotations

from pyrtl import Const, WireVector

from ..config import AccelConfig
from .circuits import fit, round_shift, sadd, select_first, sfit, smul


class Slot:
    """A multiplier of one vector lane with an adder and the rounding shift after it,
    `round((a * b + add) >> shift)`: `a * b + add` wraps to 64 bits as in the IR's int64
    reference ops, then the exact `round_shift` (shift 0: the plain sum). The vector unit's
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
            return select_first([(use[0], v) for use, v in zip(self.uses[:-1], values[:-1])], values[-1])

        shift_bits = max(len(use[3]) for use in self.uses)
        total = sfit(smul(pick(1, lambda w: sfit(w, self.a_bits)), pick(2, lambda w: sfit(w, self.b_bits))),
                     self.width)
        if self.add_bits:
            total = sadd(total, pick(4, lambda w: sfit(w, self.add_bits)), self.width)
        self.out <<= round_shift(total, pick(3, lambda w: fit(w, shift_bits)))


class LaneSlots:
    """The shared `Slot`s of one vector lane: `a` (requant's and vmul's product and a
    nonlinearity's first one) and, with the nonlinearities, `b` and `d` (their later products;
    `d` also adds layernorm's bias)."""

    def __init__(self, cfg: AccelConfig, lane: int):
        AB, W1 = cfg.acc_bits, cfg.acc_bits + 1
        if cfg.vector_unit and cfg.nonlinear_unit:  # layernorm's c = x - mean takes AB + 1 bits, its 2^31 // r 33
            self.a = Slot(f"ve_mul_a{lane}", W1, max(W1, 33))
            self.b, self.d = Slot(f"ve_mul_b{lane}", W1, W1), Slot(f"ve_mul_d{lane}", 64, 32, 2 * AB)
        else:
            self.a = Slot(f"ve_mul_a{lane}", AB, AB)

    def build(self) -> None:
        for slot in vars(self).values():
            slot.build()
