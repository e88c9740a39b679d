"""Datasets that passes train, calibrate and evaluate on.

A `Dataset` holds one tensor per graph input (first dimension: examples) and optionally
labels in the form of its `Task` (`tasks.py`: class indices, transcripts, per-token labels).
Graphs have static shapes, so batches always have the graph's own batch size (the first
dimension of its inputs): the last batch is padded by repeating examples, and `valid` says
how many of its rows are real.

A step of a decoder (a graph with a KV cache, `tcc.ir.state`) is fed sequences: its dataset
holds token ids [examples, length] alone, and `first_output` runs the step along them from an
empty cache, `width` positions a run, joining its logits into [batch, length, vocab]: so the
language-modelling task (per-token labels: the next token) measures, calibrates and trains a
decode or prefill step as it would the whole forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from tcc.ir.analysis import non_finite
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.state import DecodeStep
from tcc.ir.types import TensorType

from .tasks import Classification, Task


@dataclass(frozen=True)
class Batch:
    inputs: tuple[torch.Tensor, ...]
    labels: Any  # the task's labels of the batch's examples, or None
    valid: int


def _take(labels: Any, index: torch.Tensor) -> Any:
    """The labels of the examples at `index` (a tensor's rows, or a sequence's items)."""
    if labels is None or isinstance(labels, torch.Tensor):
        return None if labels is None else labels[index]
    return tuple(labels[int(i)] for i in index)


@dataclass(frozen=True)
class Dataset:
    inputs: tuple[torch.Tensor, ...]
    labels: Any = None  # in `task`'s form
    source: str = "data"
    task: Task = Classification()

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def fit(self, graph: Graph, what: str = "") -> "Dataset":
        """This dataset with inputs in the graph's element types; a TccError naming the
        dataset and the mismatch if it cannot feed `graph`, or the input holding NaN or Inf
        (training on it gives NaN weights, calibrating on it NaN scales)."""
        where = f"{self.source}{' (' + what + ')' if what else ''}"
        step = DecodeStep.of(graph, "step") if graph.state else None
        names = data_inputs(graph)
        if len(self.inputs) != len(names):
            raise TccError(f"{where}: holds {len(self.inputs)} input tensor(s) but the model takes "
                           f"{len(names)} ({', '.join(names)})" + (" (a step of a decoder is fed token ids "
                                                                  "[examples, length] alone)" if graph.state else ""))
        n = len(self)
        if n == 0:
            raise TccError(f"{where}: holds no examples")
        types = dict(graph.inputs)
        for tensor, name in zip(self.inputs, names):
            t = types[name]
            if tensor.shape[0] != n:
                raise TccError(f"{where}: inputs differ in the number of examples ({tensor.shape[0]} vs {n})")
            if step is not None:
                _check_sequences(tensor, step, where)
            elif tuple(tensor.shape[1:]) != t.shape[1:]:
                raise TccError(f"{where}: input '{name}' examples have shape {list(tensor.shape[1:])}, "
                               f"the model expects {list(t.shape[1:])}")
            if tensor.dtype.is_floating_point != t.dtype.is_float:
                raise TccError(f"{where}: input '{name}' is {str(tensor.dtype).replace('torch.', '')}, "
                               f"the model expects {t.dtype}")
        inputs = tuple(x.to(torch.from_numpy(np.zeros(0, types[name].dtype.numpy)).dtype) for x, name in
                       zip(self.inputs, names))
        for x, name in zip(inputs, names):
            if problem := non_finite(x.detach().cpu().numpy()):
                raise TccError(f"{where}: input '{name}' holds {problem}; tcc reads finite data only")
        if self.labels is None:
            return Dataset(inputs, None, self.source, self.task)
        labels = self.task.labels(self.labels, where)
        output = first_output_type(graph, inputs[0].shape[1] if graph.state else None)
        if not output.shape or output.shape[0] != batch_size_of(graph):
            raise TccError(f"{where}: labels need a model whose first output has the batch first, this one gives "
                           f"{list(output.shape)}")
        self.task.check(labels, output, n, where)
        return Dataset(inputs, labels, self.source, self.task)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                ) -> Iterator[Batch]:
        """Batches of exactly `batch_size` examples; the last one padded by wrapping around."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            valid = len(index)
            if valid < batch_size:
                index = torch.cat([index, order[torch.arange(batch_size - valid) % n]])
            yield Batch(tuple(x[index] for x in self.inputs), _take(self.labels, index), valid)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def data_inputs(graph: Graph) -> tuple[str, ...]:
    """The graph inputs a dataset holds, in order: all of them, or a step's token ids alone
    (its positions and cache follow from where it is along the sequence)."""
    if graph.state:
        return (graph.input_names[DecodeStep.of(graph, "step").tokens],)
    return graph.input_names


def _check_sequences(tokens: torch.Tensor, step: DecodeStep, where: str) -> None:
    length = tokens.shape[1] if tokens.dim() == 2 else 0
    if length == 0 or tokens.dtype.is_floating_point or length % step.width or length > step.max_cache:
        raise TccError(f"{where}: a step of a decoder is fed token ids [examples, length] with the length a multiple "
                       f"of its width {step.width} and at most its cache's {step.max_cache} positions, got "
                       f"{str(tokens.dtype).replace('torch.', '')} {list(tokens.shape)}")
    if (bad := step.outside_vocabulary(tokens)) is not None:
        example, position = bad
        raise TccError(f"{where}: example {example}, position {position}: token id {int(tokens[example, position])} "
                       f"outside the model's vocabulary [0, {step.vocab})")


def first_output_type(graph: Graph, length: int | None = None) -> TensorType:
    """The type of what `first_output` gives: the graph's first output, or a step's logits
    along sequences of `length` tokens."""
    if not graph.state:
        return graph.output_types[0]
    step = DecodeStep.of(graph, "step")
    logits = graph.types[graph.user_outputs[step.logits]]
    return dataclasses.replace(logits, shape=(step.batch, length or step.width, logits.shape[2]))


def first_output(graph: Graph, inputs: Sequence[torch.Tensor], run: Callable[[list[torch.Tensor]], Sequence[Any]]
                 ) -> Any:
    """The first output for one batch of a dataset fitted to `graph`, `run` giving every graph
    output (state too) for the graph's inputs in order. A step runs along the batch's token
    sequences from an empty cache, `width` positions a run, carrying its cache; its logits
    joined along the positions."""
    if not graph.state:
        return run(list(inputs))[0]
    step = DecodeStep.of(graph, "step")
    tokens, types = inputs[0], dict(graph.inputs)
    cache = {name: torch.from_numpy(zeros) for name, zeros in graph.initial_state().items()}
    where = graph.input_names[step.position]
    logits = []
    for start in range(0, tokens.shape[1], step.width):
        positions = torch.from_numpy(np.arange(start, start + step.width, dtype=types[where].dtype.numpy))
        outputs = run(step.feed(graph, tokens[:, start:start + step.width], positions, cache))
        cache = step.carry(graph, outputs)
        logits.append(outputs[step.logits])
    return torch.cat(logits, 1)


def batch_size_of(graph: Graph) -> int:
    """The static batch size of `graph`: the first dimension of its first input (a step's: of
    its token ids)."""
    if graph.state:
        return DecodeStep.of(graph, "step").batch
    shape = graph.inputs[0][1].shape
    if not shape:
        raise TccError("the model's first input is a scalar: it has no batch dimension to feed data through")
    return shape[0]


def graph_outputs(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Sequence[Any]]) -> np.ndarray:
    """The first output (`first_output`; `run` gives every output, tensors or arrays) on every
    example of `data`, fed in batches of the graph's static size."""
    data = data.fit(graph)
    chunks = []
    for b in data.batches(batch_size_of(graph)):
        out = first_output(graph, b.inputs, run)
        chunks.append(np.asarray(out.cpu().numpy() if isinstance(out, torch.Tensor) else out)[:b.valid])
    return np.concatenate(chunks)


def task_metrics(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Sequence[Any]], what: str
                 ) -> dict[str, float]:
    """The metrics of `data`'s task (`Task.metrics`) on `run`'s first output; a TccError naming
    the data (as `what`) when it has no labels or does not fit `graph`."""
    data = data.fit(graph, what)
    if data.labels is None:
        raise TccError(f"{data.source} ({what}): has no labels to measure {data.task.score_name} with")
    return data.task.metrics(graph_outputs(graph, data, run), data.labels)


def task_score(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Sequence[Any]], what: str
               ) -> float:
    """The task's score (higher is better: top-1 accuracy, 1 - WER, token accuracy) of `run`'s
    first output on `data`."""
    return data.task.score(task_metrics(graph, data, run, what))

