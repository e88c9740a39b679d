"""Generation: an artifact of a decoder's decode step run token by token with its KV cache.

A decode step (as transformers' `TorchExportableModuleForDecoderOnlyLM` exports it) takes one
token per sequence (`input_ids` [B, 1]) and its position (`cache_position` [1]), returns the
next token's logits [B, 1, V], and carries its KV cache as state (`tcc.ir.state`). The prompt
is fed one position at a time (prefill), then each chosen token is fed back (decode):

    result = generate(tcc.load("out"), prompt_ids, max_new_tokens=20)   # greedy
    result.tokens, result.time_to_first_token_s, result.decode_tokens_per_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph

from .torch_dtypes import TORCH_DTYPES

if TYPE_CHECKING:
    from .artifact import Artifact


@dataclass(frozen=True)
class DecodeStep:
    """Where a graph with a KV cache takes its token and position and returns its logits."""

    tokens: int  # index among the graph's inputs: token ids [batch, 1]
    position: int  # index among the graph's inputs: the position written [1]
    logits: int  # index among the graph's outputs: [batch, 1, vocab]
    batch: int
    vocab: int  # token ids the step takes: [0, vocab)
    max_cache: int  # positions the cache holds

    @classmethod
    def of(cls, graph: Graph) -> "DecodeStep":
        """The decode step `graph` is, or a TccError saying why it is not one."""
        caches = [s for s in graph.state if s.is_cache]
        if not caches:
            raise TccError("not a decode step: the graph carries no KV cache (export the decoder's step with a "
                           "static cache, e.g. transformers' TorchExportableModuleForDecoderOnlyLM)")
        types = dict(graph.inputs)
        user = [(i, n, types[n]) for i, n in enumerate(graph.user_inputs)]
        tokens = [(i, n) for i, n, t in user if t.dtype.is_int and t.rank == 2 and t.shape[1] == 1]
        positions = [(i, n) for i, n, t in user if t.dtype.is_int and t.shape == (1,)]
        if len(user) != 2 or len(tokens) != 1 or len(positions) != 1:
            raise TccError(f"not a decode step: it takes {', '.join(f'{n}: {t}' for _, n, t in user)}; a decode step "
                           "takes token ids [batch, 1] and their position [1] (integers)")
        batch = types[tokens[0][1]].shape[0]
        outputs = graph.types
        logits = [i for i, n in enumerate(graph.user_outputs)
                  if outputs[n].dtype.is_float and outputs[n].rank == 3 and outputs[n].shape[:2] == (batch, 1)]
        if len(logits) != 1:
            raise TccError(f"not a decode step: no single output of logits [{batch}, 1, vocab] among "
                           f"{', '.join(str(outputs[n]) for n in graph.user_outputs)}")
        lengths = set()
        for s in caches:
            t = types[s.input]
            if s.seq_dim is None or t.shape[0] != batch:
                raise TccError(f"decode step: cache '{s.input}' ({t}) does not match the model: "
                               + ("no sequence dim is written" if s.seq_dim is None else
                                  f"its batch is {t.shape[0]}, the tokens' {batch}"))
            lengths.add(t.shape[s.seq_dim])
        if len(lengths) != 1:
            raise TccError(f"decode step: the caches hold different numbers of positions ({sorted(lengths)})")
        rows = [graph.types[op.operands[0]].shape[0] for op in graph.ops
                if op.kind == "embedding" and op.operands[1] == tokens[0][1]]
        vocab = min(rows + [outputs[graph.user_outputs[logits[0]]].shape[-1]])
        return cls(tokens[0][0], positions[0][0], logits[0], batch, vocab, lengths.pop())


@dataclass(frozen=True)
class Generation:
    """What `generate` made: the prompt followed by the new tokens, with its timings."""

    tokens: torch.Tensor  # i64 [batch, prompt + new]
    prompt_length: int
    time_to_first_token_s: float  # prefill of the prompt and the first new token
    decode_tokens_per_s: float | None  # new tokens after the first, a second (None: only one)
    on: str

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens.tolist(), "prompt_length": self.prompt_length,
                "new_tokens": self.new_tokens.shape[1], "time_to_first_token_s": self.time_to_first_token_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "on": self.on}


def prompt_tokens(prompt: Any, step: DecodeStep, max_new_tokens: int) -> torch.Tensor:
    """`prompt` as i64 [batch, length], checked against the step: one-line TccErrors."""
    tensor = torch.as_tensor(np.asarray(prompt)) if not isinstance(prompt, torch.Tensor) else prompt
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TccError(f"prompt: token ids are integers, got {str(tensor.dtype).replace('torch.', '')}")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise TccError(f"prompt: expected token ids [length] or [batch, length], got shape {list(tensor.shape)}")
    if tensor.shape[0] != step.batch:
        raise TccError(f"prompt: {tensor.shape[0]} sequences; the decode step was exported for batch {step.batch}")
    bad = ((tensor < 0) | (tensor >= step.vocab)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise TccError(f"prompt: token id {int(tensor[row, col])} at position {col} (sequence {row}) is outside the "
                       f"vocabulary [0, {step.vocab})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TccError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if tensor.shape[1] + max_new_tokens > step.max_cache:
        raise TccError(f"a prompt of {tensor.shape[1]} tokens and {max_new_tokens} new ones need "
                       f"{tensor.shape[1] + max_new_tokens} positions; the cache holds {step.max_cache}"
                       + ("" if tensor.shape[1] < step.max_cache else " (the prompt alone is too long)"))
    return tensor.to(torch.int64)


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of `logits` [batch, vocab]: argmax at temperature 0, else a
    draw from softmax(logits / temperature) over the `top_k` likeliest (transformers' order)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def generate(artifact: Artifact, prompt: Any, max_new_tokens: int, *, on: str = "cpu", temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_token_id: int | None = None) -> Generation:
    """Greedy (temperature 0) or seeded sampled generation with a decode-step artifact on
    executor `on`. Rows that have produced `eos_token_id` go on producing it; generation stops
    when every row has."""
    step = DecodeStep.of(artifact.graph)
    tokens = prompt_tokens(prompt, step, max_new_tokens)
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise TccError(f"sampling: temperature must be >= 0 and top-k >= 1, got {temperature} and {top_k}")
    graph, length = artifact.graph, tokens.shape[1]
    types = dict(graph.inputs)
    values: list[Any] = [torch.zeros(types[n].shape, dtype=TORCH_DTYPES[types[n].dtype]) for n in graph.input_names]
    first_state, first_state_output = len(graph.user_inputs), len(graph.user_outputs)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    done = torch.zeros(step.batch, dtype=torch.bool)
    new: list[torch.Tensor] = []
    start = time.perf_counter()
    first_token_at = None
    for position in range(length + max_new_tokens - 1):
        values[step.tokens] = (tokens[:, position] if position < length else new[-1]).reshape(step.batch, 1).to(
            TORCH_DTYPES[types[graph.input_names[step.tokens]].dtype])
        values[step.position] = torch.tensor([position], dtype=TORCH_DTYPES[types[graph.input_names[step.position]].dtype])
        outputs = artifact.run_flat(values, on)
        values[first_state:] = outputs[first_state_output:]
        if position < length - 1:
            continue
        chosen = next_tokens(outputs[step.logits][:, -1], temperature, top_k, generator)
        if eos_token_id is not None:
            chosen = torch.where(done, torch.tensor(eos_token_id), chosen)
            done |= chosen == eos_token_id
        new.append(chosen)
        first_token_at = first_token_at or time.perf_counter()
        if len(new) == max_new_tokens or bool(done.all()):
            break
    end = time.perf_counter()
    rate = (len(new) - 1) / (end - first_token_at) if len(new) > 1 and end > first_token_at else None
    return Generation(torch.cat([tokens, torch.stack(new, 1)], 1), length, first_token_at - start, rate, on)
