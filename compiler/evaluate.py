"""Accuracy of an artifact on labelled data, and its output error against a baseline (the
uncompressed model, as an artifact)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes.data import Dataset, batch_size_of
from tcc.runtime.artifact import Artifact


def graph_outputs(graph: Graph, data: Dataset, run: Callable[[list[torch.Tensor]], Any]) -> np.ndarray:
    """`run`'s first output (a tensor or array) on every example of `data`, fed in batches of
    the graph's static size."""
    data = data.fit(graph)
    chunks = []
    for b in data.batches(batch_size_of(graph)):
        out = run(list(b.inputs))
        chunks.append(np.asarray(out.cpu().numpy() if isinstance(out, torch.Tensor) else out)[:b.valid])
    return np.concatenate(chunks)


def first_outputs(artifact: Artifact, data: Dataset, on: str) -> np.ndarray:
    """The artifact's first output on every example of `data`, in batches of its static size."""
    executor = artifact.executor(on)
    if on == "numpy":
        return graph_outputs(artifact.graph, data, lambda inputs: executor(*[x.numpy() for x in inputs])[0])
    return graph_outputs(artifact.graph, data, lambda inputs: executor.run(inputs)[0])


def evaluate(artifact: Artifact, data: Dataset, *, on: str = "cpu", baseline: Artifact | None = None
             ) -> dict[str, Any]:
    """`{"accuracy", "examples", ...}`; with a baseline also its accuracy, the top-1
    agreement, and the max absolute and relative output error against it."""
    outputs = first_outputs(artifact, data, on)
    report: dict[str, Any] = {"examples": len(data), "executor": on}
    if data.labels is not None:
        report["accuracy"] = float((outputs.argmax(-1) == data.labels.numpy()).mean())
    if baseline is not None:
        if baseline.graph.inputs != artifact.graph.inputs or baseline.graph.output_types[0].shape != \
                artifact.graph.output_types[0].shape:
            raise TccError("the baseline artifact's inputs or first output differ from the evaluated artifact's")
        reference = first_outputs(baseline, data, on)
        error = np.abs(outputs.astype(np.float64) - reference)
        report["baseline_accuracy"] = (float((reference.argmax(-1) == data.labels.numpy()).mean())
                                       if data.labels is not None else None)
        report["agreement"] = float((outputs.argmax(-1) == reference.argmax(-1)).mean())
        report["max_abs_error"] = float(error.max())
        report["relative_error"] = float(error.max() / max(np.abs(reference).max(), 1e-30))
    return report

