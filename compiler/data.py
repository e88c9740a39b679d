"""Data files for training, calibration and evaluation: `torch.save({"inputs": ..., "labels":
...})` where inputs is a tensor, a tuple/list of tensors (one per model input) or a dict by
input name, and labels (optional) a 1-D integer tensor. Loaded with `weights_only=True`:
a data file never runs code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes.data import Dataset

from .loader import archive_kind

MODEL_ARCHIVES = {"export": "torch.export", "torchscript": "TorchScript"}  # archive_kind's names


def read_saved(file: Path, what: str) -> Any:
    """What `torch.save` wrote into `file`, loaded with `weights_only` (code in the file never
    runs); a TccError naming the file and why it is not such a file."""
    if not file.is_file():
        raise TccError(f"{file}: no such {what} file")
    with open(file, "rb") as f:
        head = f.read(8)
    problem: str | None = None
    if not head:
        problem = "an empty file"
    elif head.startswith(b"\x93NUMPY"):
        problem = "a .npy array, not a torch.save file"
    elif head.startswith(b"PK\x03\x04"):
        kind = archive_kind(file)  # a TccError for a truncated or corrupt zip
        if kind != "torch.save":
            problem = f"a {MODEL_ARCHIVES[kind]} archive (a model), not a torch.save file"
    elif not head.startswith(b"\x80"):  # neither torch.save's zip nor its legacy pickle
        problem = "not a file torch.save writes"
    if problem is None:
        try:
            return torch.load(file, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            problem = "it holds objects other than tensors; loading them would run code from the file"
        except Exception as e:  # torch.load raises many types for a damaged file
            problem = f"truncated or corrupt: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    raise TccError(f"{file}: cannot read {what} ({problem})")


def load_dataset(path: str | Path, graph: Graph | None = None, *, what: str = "data") -> Dataset:
    """Read a data file; with `graph`, also check that it fits the model (shapes, labels)."""
    where = f"{path}"
    value = read_saved(Path(path), what)
    if isinstance(value, torch.Tensor):
        value = {"inputs": value}
    if not isinstance(value, dict):
        raise TccError(f"{where}: {what} must be a dict with 'inputs' (and 'labels'), saved with torch.save; "
                       f"found a {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - {"inputs", "labels"})
    if unknown:
        raise TccError(f"{where}: unknown key '{unknown[0]}' in {what} (expected 'inputs', 'labels')")
    if "inputs" not in value:
        raise TccError(f"{where}: {what} has no 'inputs'")
    inputs = value["inputs"]
    if isinstance(inputs, dict):
        if graph is None:
            raise TccError(f"{where}: inputs given by name need the model to order them")
        missing = [n for n in graph.input_names if n not in inputs]
        if missing:
            raise TccError(f"{where}: no inputs for model input '{missing[0]}' (has {', '.join(inputs)})")
        inputs = [inputs[n] for n in graph.input_names]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TccError(f"{where}: 'inputs' must be a tensor or a tuple/list/dict of tensors")
    labels = value.get("labels")
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TccError(f"{where}: 'labels' must be a tensor, got {type(labels).__name__}")
    if any(x.dim() == 0 for x in inputs):
        raise TccError(f"{where}: inputs must have a leading examples dimension")
    dataset = Dataset(inputs, labels, source=str(path))
    return dataset if graph is None else dataset.fit(graph, what)
