"""Datasets that passes train, calibrate and evaluate on.

A `Dataset` holds one tensor per graph input (first dimension: examples) and optionally
labels in the form of its `Task` (`tasks.py`: class indices, transcripts, per-token labels).
Graphs have static shapes, so batches always have the graph's own batch size (the first
dimension of its inputs): the last batch is padded by repeating examples, and `valid` says
how many of its rows are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tcc.ir.analysis import non_finite
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph

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
        if len(self.inputs) != len(graph.inputs):
            raise TccError(f"{where}: holds {len(self.inputs)} input tensor(s) but the model takes "
                           f"{len(graph.inputs)} ({', '.join(graph.input_names)})")
        n = len(self)
        if n == 0:
            raise TccError(f"{where}: holds no examples")
        for tensor, (name, t) in zip(self.inputs, graph.inputs):
            if tensor.shape[0] != n:
                raise TccError(f"{where}: inputs differ in the number of examples ({tensor.shape[0]} vs {n})")
            if tuple(tensor.shape[1:]) != t.shape[1:]:
                raise TccError(f"{where}: input '{name}' examples have shape {list(tensor.shape[1:])}, "
                               f"the model expects {list(t.shape[1:])}")
            if tensor.dtype.is_floating_point != t.dtype.is_float:
                raise TccError(f"{where}: input '{name}' is {str(tensor.dtype).replace('torch.', '')}, "
                               f"the model expects {t.dtype}")
        inputs = tuple(x.to(torch.from_numpy(np.zeros(0, t.dtype.numpy)).dtype) for x, (_, t) in
                       zip(self.inputs, graph.inputs))
        for x, name in zip(inputs, graph.input_names):
            if problem := non_finite(x.detach().cpu().numpy()):
                raise TccError(f"{where}: input '{name}' holds {problem}; tcc reads finite data only")
        if self.labels is None:
            return Dataset(inputs, None, self.source, self.task)
        labels = self.task.labels(self.labels, where)
        output = graph.output_types[0]
        if not output.shape or output.shape[0] != graph.inputs[0][1].shape[0]:
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


def batch_size_of(graph: Graph) -> int:
    """The static batch size of `graph`: the first dimension of its first input."""
    shape = graph.inputs[0][1].shape
    if not shape:
        raise TccError("the model's first input is a scalar: it has no batch dimension to feed data through")
    return shape[0]


def graph_outputs(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Any]) -> np.ndarray:
    """`run`'s first output (a tensor or array) on every example of `data`, fed in batches of
    the graph's static size."""
    data = data.fit(graph)
    chunks = []
    for b in data.batches(batch_size_of(graph)):
        out = run(list(b.inputs))
        chunks.append(np.asarray(out.cpu().numpy() if isinstance(out, torch.Tensor) else out)[:b.valid])
    return np.concatenate(chunks)


def task_metrics(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Any], what: str
                 ) -> dict[str, float]:
    """The metrics of `data`'s task (`Task.metrics`) on `run`'s first output; a TccError naming
    the data (as `what`) when it has no labels or does not fit `graph`."""
    data = data.fit(graph, what)
    if data.labels is None:
        raise TccError(f"{data.source} ({what}): has no labels to measure {data.task.score_name} with")
    return data.task.metrics(graph_outputs(graph, data, run), data.labels)


def task_score(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Any], what: str) -> float:
    """The task's score (higher is better: top-1 accuracy, 1 - WER, token accuracy) of `run`'s
    first output on `data`."""
    return data.task.score(task_metrics(graph, data, run, what))

