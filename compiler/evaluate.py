"""An artifact's metrics on labelled data (its task's: top-1 accuracy; WER and CER; token
accuracy and perplexity), and its output error against a baseline (the uncompressed model, as
an artifact)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tcc.ir.errors import TccError
from tcc.passes.data import Dataset, graph_outputs
from tcc.runtime.artifact import Artifact


def first_outputs(artifact: Artifact, data: Dataset, on: str) -> np.ndarray:
    """The artifact's first output on every example of `data`, in batches of its static size."""
    return graph_outputs(artifact.graph, data, lambda inputs: artifact.run_flat(inputs, on))


def evaluate(artifact: Artifact, data: Dataset, *, on: str = "cpu", baseline: Artifact | None = None
             ) -> dict[str, Any]:
    """`{"examples", "executor", "task", <the task's metrics>}` (with labels); with a baseline
    also its metrics (`baseline_<metric>`), the agreement of the predictions (the argmax at
    each position), and the max absolute and relative output error against it."""
    outputs = first_outputs(artifact, data, on)
    report: dict[str, Any] = {"examples": len(data), "executor": on, "task": data.task.name}
    if data.labels is not None:
        report.update(data.task.metrics(outputs, data.labels))
    if baseline is not None:
        if baseline.graph.inputs != artifact.graph.inputs or baseline.graph.output_types[0].shape != \
                artifact.graph.output_types[0].shape:
            raise TccError("the baseline artifact's inputs or first output differ from the evaluated artifact's")
        reference = first_outputs(baseline, data, on)
        error = np.abs(outputs.astype(np.float64) - reference)
        if data.labels is not None:
            report.update({f"baseline_{k}": v for k, v in data.task.metrics(reference, data.labels).items()})
        report["agreement"] = data.task.agreement(outputs, reference)
        report["max_abs_error"] = float(error.max())
        report["relative_error"] = float(error.max() / max(np.abs(reference).max(), 1e-30))
    return report

