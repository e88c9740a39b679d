"""Sequential units of the vector unit: a restoring divider and `_isqrt`'s square root (ir/reference.py),
`AccelConfig.divider_steps` iterations a cycle (their cycles: `isa.divider_cycles`, `isa.sqrt_cycles`)."""

from __future__ import annotations

import pyrtl
from pyrtl import Const, Register, WireVector, concat, select

from .circuits import address_bits, fit, nonzero


def iterate(name: str, start: WireVector, initial: list[WireVector], step, cycles: int, steps: int):
    """A sequential unit: takes the state `initial` in the cycle `start` is set and applies
    `step` (state -> state) `steps` times a cycle for `cycles` cycles. Returns its state
    registers (the result from the cycle after the last step on, kept until the next start)
    and `done`, set in that cycle."""
    count = Register(address_bits(cycles + 1), f"{name}_left")
    left = select(start, Const(cycles, len(count)), count)
    active = nonzero(left)
    regs = [Register(len(w), f"{name}_{i}") for i, w in enumerate(initial)]
    state = after = [select(start, w, r) for w, r in zip(initial, regs)]
    for _ in range(steps):
        after = step(after)
    for r, now, nxt in zip(regs, state, after):
        r.next <<= select(active, nxt, now)
    count.next <<= fit(select(active, left - 1, left), len(count))
    done = Register(1, f"{name}_done")
    done.next <<= active & (left == 1)
    return regs, done


def divide_step(divisor: WireVector):
    """One restoring-division step on (remainder, dividend / quotient): the dividend's top bit
    joins the remainder, the quotient bit enters at the bottom (unsigned; remainder < divisor)."""
    def step(state):
        rest, quotient = state
        shifted = concat(rest[:-1], quotient[-1])
        fits = shifted >= divisor
        return [fit(select(fits, shifted - divisor, shifted), len(rest)), concat(quotient[:-1], fits)]
    return step


def isqrt_step(state):
    """One step of `_isqrt` (ir/reference.py) on (rest, root, bit = 1 << 2k), int64; a no-op
    once bit is 0."""
    rest, root, bit = state
    trial = (root + bit)[:64]
    live = nonzero(bit)
    fits = live & ~pyrtl.signed_lt(rest, trial)
    half = concat(Const(0, 1), root[1:])
    return [select(fits, (rest - trial)[:64], rest), select(live, select(fits, (half + bit)[:64], half), root),
            concat(Const(0, 2), bit[2:])]
