"""Accuracy of an artifact on labelled data, and its output error against a baseline (the
uncompressed model, as an artifact)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tcc.ir.errors import TccError
from tcc.passes.data import Dataset, graph_outputs
from tcc.runtime.artifact import Artifact


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

