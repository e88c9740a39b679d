"""State carried from one run of a graph to the next: a decoder's KV cache.

A graph with state is one step of a recurrence. Each `State` pairs a graph input (the value
before the step) with a graph output (the value after it); the caller feeds every step the
outputs of the one before, starting from zeros. The IR stays functional: a step never writes
its inputs, it returns their next values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StateRole(enum.Enum):
    """What a state holds: the keys or values of one attention layer's cache, or anything else."""

    KEY = "kv.key"
    VALUE = "kv.value"
    OTHER = "other"


@dataclass(frozen=True)
class State:
    """Graph input `input` becomes graph output number `output` after a step.

    `layer`: the attention layer a cache belongs to (its place among the graph's attention
    ops); `seq_dim`: the dim a step writes positions along (a cache's sequence axis: its
    length is the most positions the cache holds)."""

    input: str
    output: int
    role: StateRole = StateRole.OTHER
    layer: int | None = None
    seq_dim: int | None = None

    @property
    def is_cache(self) -> bool:
        return self.role is not StateRole.OTHER
