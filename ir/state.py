"""State carried from one run of a graph to the next: a decoder's KV cache.

A graph with state is one step of a recurrence. Each `State` pairs a graph input (the value
before the step) with a graph output (the value after it); the caller feeds every step the
outputs of the one before, starting from zeros. The IR stays functional: a step never writes
its inputs, it returns their next values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import TccError

if TYPE_CHECKING:
    from .graph import Graph


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


@dataclass(frozen=True)
class DecodeStep:
    """Where a graph with a KV cache takes its tokens and positions and returns its logits. A
    step of `width` 1 decodes; a wider one (exported with `width` token ids and positions)
    prefills a chunk of the prompt in one run."""

    tokens: int  # index among the graph's inputs: token ids [batch, width]
    position: int  # index among the graph's inputs: the positions written [width]
    logits: int  # index among the graph's outputs: [batch, width, vocab]
    batch: int
    width: int
    vocab: int  # token ids the step takes: [0, vocab)
    max_cache: int  # positions the cache holds

    @classmethod
    def of(cls, graph: Graph, what: str = "decode step") -> "DecodeStep":
        """The step `graph` is, or a TccError saying why it is not one."""
        caches = [s for s in graph.state if s.is_cache]
        if not caches:
            raise TccError(f"not a {what}: the graph carries no KV cache (export the decoder's step with a "
                           "static cache, e.g. transformers' TorchExportableModuleForDecoderOnlyLM)")
        types = dict(graph.inputs)
        user = [(i, n, types[n]) for i, n in enumerate(graph.user_inputs)]
        tokens = [(i, n) for i, n, t in user if t.dtype.is_int and t.rank == 2]
        width = types[tokens[0][1]].shape[1] if len(tokens) == 1 else 0
        positions = [(i, n) for i, n, t in user if t.dtype.is_int and t.shape == (width,)]
        if len(user) != 2 or len(tokens) != 1 or len(positions) != 1 or width < 1:
            raise TccError(f"not a {what}: it takes {', '.join(f'{n}: {t}' for _, n, t in user)}; a step takes "
                           "token ids [batch, width] and their positions [width] (integers)")
        batch = types[tokens[0][1]].shape[0]
        outputs = graph.types
        logits = [i for i, n in enumerate(graph.user_outputs)
                  if outputs[n].dtype.is_float and outputs[n].rank == 3 and outputs[n].shape[:2] == (batch, width)]
        if len(logits) != 1:
            raise TccError(f"not a {what}: no single output of logits [{batch}, {width}, vocab] among "
                           f"{', '.join(str(outputs[n]) for n in graph.user_outputs)}")
        lengths = set()
        for s in caches:
            t = types[s.input]
            if s.seq_dim is None or t.shape[0] != batch:
                raise TccError(f"{what}: cache '{s.input}' ({t}) does not match the model: "
                               + ("no sequence dim is written" if s.seq_dim is None else
                                  f"its batch is {t.shape[0]}, the tokens' {batch}"))
            lengths.add(t.shape[s.seq_dim])
        if len(lengths) != 1:
            raise TccError(f"{what}: the caches hold different numbers of positions ({sorted(lengths)})")
        rows = [graph.types[op.operands[0]].shape[0] for op in graph.ops
                if op.kind == "embedding" and op.operands[1] == tokens[0][1]]
        vocab = min(rows + [outputs[graph.user_outputs[logits[0]]].shape[-1]])
        return cls(tokens[0][0], positions[0][0], logits[0], batch, width, vocab, lengths.pop())

    def feed(self, graph: Graph, ids: Any, positions: Any, cache: Mapping[str, Any]) -> list[Any]:
        """The graph's inputs in order for one run: token `ids` [batch, width] at `positions`
        [width], and the cache by state input."""
        values: list[Any] = [None] * len(graph.user_inputs)
        values[self.tokens], values[self.position] = ids, positions
        return values + [cache[n] for n in graph.input_names[len(values):]]

    def outside_vocabulary(self, ids: Any) -> tuple[int, int] | None:
        """(sequence, position) of the first of the token `ids` [batch, length] (an array or a
        CPU tensor) the step cannot take (outside [0, vocab)); None when it takes them all."""
        ids = np.asarray(ids)
        bad = np.argwhere((ids < 0) | (ids >= self.vocab))
        return (int(bad[0][0]), int(bad[0][1])) if len(bad) else None

    @staticmethod
    def carry(graph: Graph, outputs: Sequence[Any]) -> dict[str, Any]:
        """The cache after a run: each state input's next value among the run's `outputs`."""
        return {s.input: outputs[s.output] for s in graph.state}


def check_prefill(decode: Graph, prefill: Graph) -> DecodeStep:
    """The prefill step of `prefill`, checked to share `decode`'s cache, batch and vocabulary."""
    step = DecodeStep.of(prefill, "prefill step")
    theirs = [(s.input, dict(prefill.inputs)[s.input], s.role, s.layer) for s in prefill.state]
    ours = [(s.input, dict(decode.inputs)[s.input], s.role, s.layer) for s in decode.state]
    if theirs != ours:
        differ = next(((a, b) for a, b in zip(theirs, ours) if a != b), None)
        detail = (f"'{differ[0][0]}' is {differ[0][1]} there, '{differ[1][0]}' {differ[1][1]} here" if differ
                  else f"{len(theirs)} states there, {len(ours)} here")
        raise TccError(f"the prefill step's cache does not match the decode step's: {detail}")
    return step
