"""Generation: an artifact of a decoder's decode step run token by token with its KV cache.

A decode step (as transformers' `TorchExportableModuleForDecoderOnlyLM` exports it) takes one
token per sequence (`input_ids` [B, 1]) and its position (`cache_position` [1]), returns the
next token's logits [B, 1, V], and carries its KV cache as state (`tcc.ir.state`). The prompt
goes through the step a token at a time (or through a wider prefill step sharing its cache, a
chunk at a time), then each chosen token is fed back (decode):

    result = generate(tcc.load("out"), prompt_ids, max_new_tokens=20)   # greedy
    result = generate(step, prompt_ids, 20, prefill=tcc.load("prefill8"))  # the prompt 8 tokens a run
    result.tokens, result.time_to_first_token_s, result.decode_tokens_per_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tcc.ir.errors import TccError
from tcc.ir.state import DecodeStep, check_prefill

from .torch_dtypes import TORCH_DTYPES

if TYPE_CHECKING:
    from .artifact import Artifact


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
    if (bad := step.outside_vocabulary(tensor)) is not None:
        row, col = bad
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
             top_k: int | None = None, seed: int = 0, eos_token_id: int | None = None,
             prefill: Artifact | None = None) -> Generation:
    """Greedy (temperature 0) or seeded sampled generation with a decode-step artifact on
    executor `on`. The prompt goes through `prefill` (a step of several tokens sharing the
    decode step's cache) a chunk at a time as far as whole chunks fit, the rest through the
    decode step. Rows that have produced `eos_token_id` go on producing it; generation stops
    when every row has."""
    step = DecodeStep.of(artifact.graph)
    chunk = check_prefill(artifact.graph, prefill.graph) if prefill is not None else None
    tokens = prompt_tokens(prompt, step, max_new_tokens)
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise TccError(f"sampling: temperature must be >= 0 and top-k >= 1, got {temperature} and {top_k}")
    length = tokens.shape[1]
    cache = {name: torch.from_numpy(zeros) for name, zeros in artifact.graph.initial_state().items()}
    dtypes = {id(runner): [TORCH_DTYPES[t.dtype] for _, t in runner.graph.inputs]
              for runner in (artifact, prefill) if runner is not None}

    def run(runner: Artifact, at: DecodeStep, ids: torch.Tensor, position: int) -> torch.Tensor:
        """One step on `ids` [batch, width] from `position`: its last logits; the cache moves on."""
        graph, types = runner.graph, dtypes[id(runner)]
        positions = torch.arange(position, position + at.width, dtype=types[at.position])
        outputs = runner.run_flat(at.feed(graph, ids.to(types[at.tokens]), positions, cache), on)
        cache.update(at.carry(graph, outputs))
        return outputs[at.logits][:, -1]

    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    done = torch.zeros(step.batch, dtype=torch.bool)
    new: list[torch.Tensor] = []
    start = time.perf_counter()
    position = 0
    while chunk is not None and length - position >= chunk.width:
        logits = run(prefill, chunk, tokens[:, position:position + chunk.width], position)
        position += chunk.width
    while position < length:
        logits = run(artifact, step, tokens[:, position:position + 1], position)
        position += 1
    first_token_at = None
    while True:
        chosen = next_tokens(logits, temperature, top_k, generator)
        if eos_token_id is not None:
            chosen = torch.where(done, torch.tensor(eos_token_id), chosen)
            done |= chosen == eos_token_id
        new.append(chosen)
        first_token_at = first_token_at or time.perf_counter()
        if len(new) == max_new_tokens or bool(done.all()):
            break
        logits = run(artifact, step, chosen.reshape(step.batch, 1), position)
        position += 1
    end = time.perf_counter()
    rate = (len(new) - 1) / (end - first_token_at) if len(new) > 1 and end > first_token_at else None
    return Generation(torch.cat([tokens, torch.stack(new, 1)], 1), length, first_token_at - start, rate, on)
