"""What a model's first output is judged by: a `Task` gives the labels' form, the training loss,
the metrics and the one score (higher is better) that accuracy constraints bound.

- `Classification`: one integer class per example; logits `[batch, classes]`; top-1 accuracy.
- `CTC`: one transcript per example; per-frame logits `[batch, frames, symbols]` over `vocab`
  (the CTC blank first, `" "` the word separator); greedy decoding (best symbol per frame,
  repeats merged, blanks dropped); word and character error rates (jiwer); score 1 - WER.
- `Tokens`: one integer label per position (`IGNORE` skips one); logits `[batch, positions,
  symbols]`; token accuracy and perplexity; score the token accuracy.

A dataset file names its task (`"task"`, and a CTC task's `"vocab"`), or the command line does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tcc.ir.errors import TccError
from tcc.ir.types import TensorType

IGNORE = -100  # a `Tokens` label that counts for nothing (padding), as torch's cross-entropy


class Task:
    """How labels are read, checked, learned and measured; subclasses are frozen dataclasses."""

    name: ClassVar[str]
    score_name: ClassVar[str]  # the score accuracy constraints bound, in words

    def labels(self, value: Any, where: str) -> Any:
        """The labels of a data file in this task's form (a TccError naming `where` otherwise)."""
        raise NotImplementedError

    def check(self, labels: Any, output: TensorType, examples: int, where: str) -> None:
        """A TccError naming `where` and the example when `labels` cannot judge a first output of
        type `output` (its batch dimension aside) for `examples` examples."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: Any) -> torch.Tensor:
        """The training loss of a batch's logits against its labels."""
        raise NotImplementedError

    def metrics(self, outputs: np.ndarray, labels: Any) -> dict[str, float]:
        """Every metric of the outputs (first outputs of all examples) against the labels."""
        raise NotImplementedError

    def score(self, metrics: dict[str, float]) -> float:
        raise NotImplementedError

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        """The share of predictions (the argmax at each position) that match the reference's."""
        return float((outputs.argmax(-1) == reference.argmax(-1)).mean())

    def to_json(self) -> dict:
        return {"task": self.name}


def _integers(value: Any, where: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TccError(f"{where}: 'labels' must be a tensor of {what}, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.dtype.is_complex:
        raise TccError(f"{where}: labels must be {what}, got {str(value.dtype).replace('torch.', '')}")
    return value.long()


@dataclass(frozen=True)
class Classification(Task):
    name: ClassVar[str] = "classification"
    score_name: ClassVar[str] = "accuracy"

    def labels(self, value: Any, where: str) -> torch.Tensor:
        return _integers(value, where, "integer class indices")

    def check(self, labels: torch.Tensor, output: TensorType, examples: int, where: str) -> None:
        if labels.dim() != 1 or labels.shape[0] != examples:
            raise TccError(f"{where}: labels must be one integer per example ({examples}), got shape "
                           f"{list(labels.shape)}")
        if output.rank != 2:
            raise TccError(f"{where}: class labels need a model whose first output is [batch, classes], this one "
                           f"gives {list(output.shape)}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= output.shape[1]:
            bad = int(torch.nonzero((labels < 0) | (labels >= output.shape[1]))[0])
            raise TccError(f"{where}: example {bad}: label {int(labels[bad])} outside the model's "
                           f"{output.shape[1]} classes")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def metrics(self, outputs: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": float((outputs.argmax(-1) == labels.numpy()).mean())}

    def score(self, metrics: dict[str, float]) -> float:
        return metrics["accuracy"]


@dataclass(frozen=True)
class Tokens(Task):
    name: ClassVar[str] = "tokens"
    score_name: ClassVar[str] = "token accuracy"

    def labels(self, value: Any, where: str) -> torch.Tensor:
        return _integers(value, where, "integer symbol indices")

    def check(self, labels: torch.Tensor, output: TensorType, examples: int, where: str) -> None:
        if output.rank != 3:
            raise TccError(f"{where}: per-token labels need a model whose first output is [batch, positions, "
                           f"symbols], this one gives {list(output.shape)}")
        if tuple(labels.shape) != (examples, output.shape[1]):
            raise TccError(f"{where}: labels must be [examples, positions] = [{examples}, {output.shape[1]}], got "
                           f"{list(labels.shape)}")
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= output.shape[2]))
        if bad.any():
            example, position = (int(i) for i in torch.nonzero(bad)[0])
            raise TccError(f"{where}: example {example}, position {position}: label {int(labels[example, position])} "
                           f"outside the model's {output.shape[2]} symbols")
        counted = (labels != IGNORE).sum(dim=1)
        if not counted.all():
            raise TccError(f"{where}: example {int(torch.nonzero(counted == 0)[0])}: every label is {IGNORE} "
                           f"(ignored): nothing to measure")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    def metrics(self, outputs: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
        target = labels.numpy()
        counted = target != IGNORE
        logits = torch.from_numpy(np.asarray(outputs, np.float64))
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        return {"token_accuracy": float((outputs.argmax(-1) == target)[counted].mean()),
                "perplexity": float(math.exp(min(float(nll), 700.0)))}

    def score(self, metrics: dict[str, float]) -> float:
        return metrics["token_accuracy"]


@dataclass(frozen=True)
class CTC(Task):
    """Connectionist temporal classification over `vocab` (blank first, `" "` between words)."""

    vocab: tuple[str, ...]
    name: ClassVar[str] = "ctc"
    score_name: ClassVar[str] = "1 - WER"

    def __post_init__(self):
        vocab = self.vocab
        if len(vocab) < 2 or not all(isinstance(s, str) and s for s in vocab):
            raise TccError("ctc: the vocabulary must list the blank and at least one symbol, each a non-empty "
                           f"string, got {list(vocab)[:5]}")
        duplicated = sorted({s for s in vocab if vocab.count(s) > 1})
        if duplicated:
            raise TccError(f"ctc: the vocabulary lists '{duplicated[0]}' twice")
        if " " not in vocab[1:]:
            raise TccError("ctc: the vocabulary needs ' ' (the word separator) among its symbols")

    def labels(self, value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            raise TccError(f"{where}: CTC labels must be a list of transcripts (strings), got "
                           f"{type(value).__name__}")
        return tuple(value)

    def check(self, labels: tuple[str, ...], output: TensorType, examples: int, where: str) -> None:
        if output.rank != 3 or output.shape[2] != len(self.vocab):
            raise TccError(f"{where}: CTC needs a model whose first output is [batch, frames, {len(self.vocab)}] "
                           f"(one logit per vocabulary symbol), this one gives {list(output.shape)}")
        if len(labels) != examples:
            raise TccError(f"{where}: {len(labels)} transcripts for {examples} examples")
        symbols = set(self.vocab[1:])
        frames = output.shape[1]
        for i, text in enumerate(labels):
            if not text.strip():
                raise TccError(f"{where}: example {i}: empty transcript")
            unknown = sorted(set(text) - symbols)
            if unknown:
                raise TccError(f"{where}: example {i}: '{unknown[0]}' in {text!r} is not in the vocabulary")
            needed = len(text) + sum(a == b for a, b in zip(text, text[1:]))  # a blank between repeats
            if needed > frames:
                raise TccError(f"{where}: example {i}: {text!r} needs {needed} frames, the model gives {frames}")

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in text]

    def decode(self, outputs: np.ndarray) -> list[str]:
        """Greedy CTC decoding of `[examples, frames, symbols]` logits."""
        best = np.asarray(outputs).argmax(-1)
        texts = []
        for row in best:
            kept = [s for i, s in enumerate(row) if s != 0 and (i == 0 or s != row[i - 1])]
            texts.append(" ".join("".join(self.vocab[s] for s in kept).split()))
        return texts

    def loss(self, logits: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)  # [frames, batch, symbols]
        targets = [torch.tensor(self.encode(t), dtype=torch.long) for t in labels]
        frames = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        return F.ctc_loss(log_probs, torch.cat(targets).to(logits.device), frames,
                          torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)

    def metrics(self, outputs: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
        import jiwer
        hypotheses = self.decode(outputs)
        references = [" ".join(t.split()) for t in labels]
        return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}

    def score(self, metrics: dict[str, float]) -> float:
        return 1.0 - metrics["wer"]

    def to_json(self) -> dict:
        return {"task": self.name, "vocab": list(self.vocab)}


TASKS = ("classification", "ctc", "tokens")
METRIC_NAMES = {"accuracy": "accuracy", "wer": "WER", "cer": "CER", "token_accuracy": "token accuracy",
                "perplexity": "perplexity"}  # the tasks' metrics in words


def make_task(name: str | None, vocab: Sequence[str] | None, where: str) -> Task:
    """The task called `name` (default classification); a CTC task needs `vocab`."""
    name = name or "classification"
    if name not in TASKS:
        raise TccError(f"{where}: unknown task '{name}' (tcc knows {', '.join(TASKS)})")
    if name == "ctc":
        if vocab is None:
            raise TccError(f"{where}: a ctc task needs its vocabulary ('vocab' in the file, or --vocab)")
        if isinstance(vocab, str) or not isinstance(vocab, (list, tuple)):
            raise TccError(f"{where}: 'vocab' must be a list of symbols, got {type(vocab).__name__}")
        try:
            return CTC(tuple(vocab))
        except TccError as e:
            raise TccError(f"{where}: {e}") from None
    if vocab is not None:
        raise TccError(f"{where}: a vocabulary is for a ctc task, not {name}")
    return Classification() if name == "classification" else Tokens()
