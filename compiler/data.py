"""Data files for training, calibration and evaluation: `torch.save({"inputs": ..., "labels":
..., "task": ..., "vocab": ...})` where inputs is a tensor, a tuple/list of tensors (one per
model input) or a dict by input name, and labels (optional) in the form of the task
(`tcc.passes.tasks`: classification, the default, a 1-D integer tensor; ctc a list of
transcripts over `vocab`; tokens an [examples, positions] integer tensor). Loaded with
`weights_only=True`: a data file never runs code.

Every tensor read from a file (data, `tcc run --input`) is checked before anything uses it:
plain dense tensors on the CPU of at most `MAX_INPUT_ELEMENTS` elements (a broadcast view
saved by torch.save is tiny on disk and huge once materialised), `.npy` headers against the
bytes the file holds."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes.data import Dataset, data_inputs
from tcc.passes.tasks import TASKS, make_task
from tcc.runtime.artifact import read_npy_header

from .loader import MAX_INPUT_ELEMENTS, archive_kind, tensor_kind_problem

MODEL_ARCHIVES = {"export": "torch.export", "torchscript": "TorchScript"}  # archive_kind's names


def read_saved(file: Path, what: str) -> Any:
    """What `torch.save` wrote into `file`, loaded with `weights_only` (code in the file never
    runs), its tensors checked (`check_tensors`); a TccError naming the file and why it is not
    such a file."""
    _check_regular(file, what)
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
        else:
            with zipfile.ZipFile(file) as z:
                unpacked = sum(info.file_size for info in z.infolist())
            if unpacked > file.stat().st_size:  # torch.save stores records uncompressed
                problem = (f"its records unpack to {unpacked:,} bytes from a file of {file.stat().st_size:,}: "
                           "compressed, not as torch.save writes")
    elif not head.startswith(b"\x80"):  # neither torch.save's zip nor its legacy pickle
        problem = "not a file torch.save writes"
    if problem is None:
        try:
            value = torch.load(file, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            problem = "it holds objects other than tensors; loading them would run code from the file"
        except Exception as e:  # torch.load raises many types for a damaged file
            problem = f"truncated or corrupt: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        else:
            check_tensors(value, f"{file} ({what})")
            return value
    raise TccError(f"{file}: cannot read {what} ({problem})")


def _check_regular(file: Path, what: str) -> None:
    if not file.exists():
        raise TccError(f"{file}: no such {what} file")
    if not file.is_file():  # a directory, a FIFO or a device (which never ends)
        raise TccError(f"{file}: not a regular file; expected a {what} file")


def check_tensors(value: Any, where: str) -> None:
    """A TccError (`where`: the file and what it holds) naming the first tensor in `value` (a
    tensor, or lists, tuples and dicts of them) that is no plain dense CPU tensor of at most
    `MAX_INPUT_ELEMENTS` elements; checked on metadata alone, before anything materialises it."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack += [(f"{path}[{k!r}]" if path else str(k), v) for k, v in reversed(item.items())]
        elif isinstance(item, (list, tuple)):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item)))]
        elif isinstance(item, torch.Tensor) and (problem := _tensor_problem(item)):
            raise TccError(f"{where}: {'tensor ' + path if path else 'the tensor'} {problem}")


def _tensor_problem(t: torch.Tensor) -> str | None:
    if problem := tensor_kind_problem(t):
        return problem
    if t.numel() > MAX_INPUT_ELEMENTS:
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        view = f" (a view of {stored:,} stored: materialising it would allocate the rest)" if stored < t.numel() else ""
        return f"holds {t.numel():,} elements{view}; a tensor tcc reads holds at most {MAX_INPUT_ELEMENTS:,}"
    return None


def read_numpy(file: Path, what: str) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a `.npy` file, or the arrays of any other (a `.npz`) by name; every header checked
    against the bytes the file holds and `MAX_INPUT_ELEMENTS` before an array is allocated."""
    _check_regular(file, what)
    try:
        if file.suffix == ".npy":
            with open(file, "rb") as f:
                _check_npy_header(f, file.stat().st_size, f"{file}")
            return np.load(file, allow_pickle=False)
        with zipfile.ZipFile(file) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise TccError(f"{file}: holds '{info.filename}', not an array (.npy)")
                with z.open(info) as f:
                    _check_npy_header(f, info.file_size, f"{file}: {info.filename}")
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TccError(f"{file}: cannot read {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def _check_npy_header(f: BinaryIO, size: int, where: str) -> None:
    """Refuse a `.npy` stream of `size` bytes whose header claims more than it holds."""
    shape, dtype = read_npy_header(f)
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        raise TccError(f"{where}: the header claims {elements:,} elements; an array tcc reads holds at most "
                       f"{MAX_INPUT_ELEMENTS:,}")
    if elements * dtype.itemsize > size - f.tell():
        raise TccError(f"{where}: the header claims {elements * dtype.itemsize:,} bytes of data, the file holds "
                       f"{size - f.tell():,} (truncated or edited)")


def load_dataset(path: str | Path, graph: Graph | None = None, *, what: str = "data", task: str | None = None,
                 vocab: Sequence[str] | None = None) -> Dataset:
    """Read a data file; with `graph`, also check that it fits the model (shapes, labels). Its
    task (`tasks.py`) is the file's `"task"` (and `"vocab"`), unless `task` / `vocab` say."""
    where = f"{path}"
    value = read_saved(Path(path), what)
    if isinstance(value, torch.Tensor):
        value = {"inputs": value}
    if not isinstance(value, dict):
        raise TccError(f"{where}: {what} must be a dict with 'inputs' (and 'labels'), saved with torch.save; "
                       f"found a {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - {"inputs", "labels", "task", "vocab"})
    if unknown:
        raise TccError(f"{where}: unknown key '{unknown[0]}' in {what} (expected 'inputs', 'labels', 'task', "
                       f"'vocab')")
    named = value.get("task")
    if named is not None and not isinstance(named, str):
        raise TccError(f"{where}: 'task' must be a string ({', '.join(TASKS)}), got {type(named).__name__}")
    chosen = make_task(task or named, vocab if vocab is not None else value.get("vocab"), where)
    if "inputs" not in value:
        raise TccError(f"{where}: {what} has no 'inputs'")
    inputs = value["inputs"]
    if isinstance(inputs, dict):
        if graph is None:
            raise TccError(f"{where}: inputs given by name need the model to order them")
        missing = [n for n in data_inputs(graph) if n not in inputs]
        if missing:
            raise TccError(f"{where}: no inputs for model input '{missing[0]}' (has {', '.join(inputs)})")
        inputs = [inputs[n] for n in data_inputs(graph)]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TccError(f"{where}: 'inputs' must be a tensor or a tuple/list/dict of tensors")
    labels = value.get("labels")
    if labels is not None:
        labels = chosen.labels(labels, f"{where} ({what})")
    if any(x.dim() == 0 for x in inputs):
        raise TccError(f"{where}: inputs must have a leading examples dimension")
    dataset = Dataset(inputs, labels, source=str(path), task=chosen)
    return dataset if graph is None else dataset.fit(graph, what)
