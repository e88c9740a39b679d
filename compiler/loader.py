"""Loading model files. The kind is decided by the archive's contents, not its extension:

- torch.export archives (`torch.export.save`, .pt2): the safe, documented format; they carry
  their example inputs. Read by `tcc.export_archive` (nothing unpickled, nothing imported);
  with `trust_pickle=True` by `torch.export.load`;
- TorchScript (`torch.jit.save`): code, so only with `trust_pickle=True`; converted to an
  ExportedProgram;
- state_dicts (`torch.save(model.state_dict())`): need `--arch module:Class`;
- full pickles (`torch.save(model)`): only with `trust_pickle=True`, since unpickling runs code
  from the file.
"""

from __future__ import annotations

import importlib
import logging
import math
import pickle
import re
import sys
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError
from tcc.runtime.torch_dtypes import TORCH_DTYPES

from .export_archive import read_export_archive

# dtypes a model input can have: those a torch tensor holds as such (no i4 or b1)
INPUT_DTYPES = (DType.F64, DType.F32, DType.F16, DType.BF16, DType.I64, DType.I32, DType.I16, DType.I8, DType.BOOL)
MAX_INPUT_ELEMENTS = 2**31 - 1  # an example input larger than this is a typo, not a model


@dataclass(frozen=True)
class InputShape:
    """`[name=]1x128[:dtype]` from `--input-shape`."""

    shape: tuple[int, ...]
    dtype: DType
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> "InputShape":
        m = re.fullmatch(r"(?:([A-Za-z_][A-Za-z0-9_]*)=)?(-?\d+(?:x-?\d+)*|scalar)(?::([a-z0-9]+))?", text.strip())
        if not m:
            raise TccError(f"--input-shape '{text}': expected [name=]DIMxDIM...[:dtype], e.g. 1x128:i64")
        name, dims, dtype = m.groups()
        try:
            parsed = DType.parse(dtype or "f32")
        except ValueError as e:
            raise TccError(f"--input-shape '{text}': {e}") from None
        if parsed not in INPUT_DTYPES:
            raise TccError(f"--input-shape '{text}': a model input cannot be {parsed} (no torch dtype holds it; "
                           f"inputs are {', '.join(d.value for d in INPUT_DTYPES)})")
        shape = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
        for i, d in enumerate(shape):
            if d < 1:
                raise TccError(f"--input-shape '{text}': dimension {i} is {d}; shapes are static and every "
                               "dimension at least 1")
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise TccError(f"--input-shape '{text}': {elements:,} elements; an example input holds at most "
                           f"{MAX_INPUT_ELEMENTS:,}")
        return cls(shape, parsed, name)

    def example(self) -> torch.Tensor:
        """An example tensor of this shape and dtype: seeded normal floats, or ones."""
        torch_dtype = TORCH_DTYPES[self.dtype]
        try:
            if self.dtype.is_float:
                return torch.randn(self.shape, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
            return torch.ones(self.shape, dtype=torch_dtype)
        except (RuntimeError, MemoryError):  # the allocator's refusal
            shape = "x".join(map(str, self.shape)) or "scalar"
            raise TccError(f"--input-shape {shape}:{self.dtype}: no memory for an example input of "
                           f"{math.prod(self.shape) * torch_dtype.itemsize:,} bytes") from None


def example_inputs_from_shapes(shapes: list[InputShape]) -> Any:
    """A tuple of example tensors, or a dict when every shape is named."""
    if shapes and all(s.name for s in shapes):
        return {s.name: s.example() for s in shapes}
    if any(s.name for s in shapes):
        raise TccError("--input-shape: name all inputs or none")
    return tuple(s.example() for s in shapes)


@dataclass(frozen=True)
class LoadedModel:
    """What a model file held: an ExportedProgram or an nn.Module, and example inputs if known."""

    kind: str  # "export" | "torchscript" | "state_dict" | "pickle"
    program: torch.export.ExportedProgram | None
    module: torch.nn.Module | None
    example_inputs: Any


def archive_kind(path: Path) -> str:
    """What kind of PyTorch archive `path` is: export, torchscript or torch.save; a TccError
    naming the file when it is missing, empty, a directory, not a zip or a damaged one."""
    if not path.exists():
        raise TccError(f"{path}: no such file")
    if path.is_dir():
        raise TccError(f"{path}: is a directory, not a model file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise TccError(f"{path}: not a regular file (a FIFO, socket or device), not a model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise TccError(f"{path}: an empty file, not a model")
    if magic != b"PK\x03\x04":
        raise TccError(f"{path}: not a PyTorch model file (expected a torch.export, TorchScript or torch.save "
                       "archive)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as e:
        # zipfile's errors on damaged bytes: names that are not UTF-8 (ValueError), unknown
        # versions or methods (NotImplementedError), bad deflate streams (zlib.error)
        raise TccError(f"{path}: truncated or corrupt archive ({e})") from None
    if bad is not None:
        raise TccError(f"{path}: truncated or corrupt archive (bad member {bad})")
    if any(n.endswith("archive_format") or "/models/" in n for n in names):
        return "export"
    if any("/code/__torch__" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch.save"
    raise TccError(f"{path}: a zip archive, but not one PyTorch writes")


def _shapes(examples: Any) -> list[tuple]:
    values = examples.values() if isinstance(examples, dict) else examples
    return [(tuple(t.shape), t.dtype) for t in values]


def _check_same_shapes(path: Path, stored: Any, given: Any) -> None:
    """A torch.export archive is specialized to its example shapes: --input-shape may only repeat them."""
    if _shapes(stored) != _shapes(given):
        have = ", ".join("x".join(map(str, s)) + f":{str(d).replace('torch.', '')}" for s, d in _shapes(stored))
        raise TccError(f"{path}: exported for input shapes {have}; re-export the model for other shapes")


def tensor_kind_problem(t: torch.Tensor) -> str | None:
    """Why `t` is no plain dense tensor holding values on the CPU (a subclass, a sparse, nested
    or quantized tensor, one on another device or the meta device); None when it is one."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a {type(t).__name__}, a tensor subclass; tcc reads plain tensors only"
    if t.layout != torch.strided or t.is_nested:
        layout = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        return f"is a {layout} tensor; tcc reads dense ones only"
    if t.is_quantized:
        return f"is a quantized tensor ({str(t.dtype).replace('torch.', '')}); tcc reads plain ones only"
    if t.device.type != "cpu":
        return f"is on device '{t.device.type}', which holds no values to read"
    return None


def _check_stored_examples(path: Path, stored: Any) -> None:
    """Example inputs an archive carries obey --input-shape's rules: plain dense tensors (a
    stride-0 view of a few stored bytes may claim 10^10 elements) of at most MAX_INPUT_ELEMENTS."""
    items = stored.items() if isinstance(stored, dict) else enumerate(stored)
    for key, value in items:
        where = f"{path}: stored example input {key!r}" if isinstance(key, str) else f"{path}: stored example input {key}"
        if not isinstance(value, torch.Tensor):
            raise TccError(f"{where} is a {type(value).__name__}; tcc takes tensors")
        if problem := tensor_kind_problem(value):
            raise TccError(f"{where} {problem}")
        if value.numel() > MAX_INPUT_ELEMENTS:
            raise TccError(f"{where} has shape {list(value.shape)} ({value.numel():,} elements); an example input "
                           f"holds at most {MAX_INPUT_ELEMENTS:,}")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + ("\n" + logging.Formatter().formatException(record.exc_info)
                                      if record.exc_info else "")
        self.lines += [line.strip() for line in text.splitlines() if line.strip()]


def _load_exported(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram:
    """The archive's program. Untrusted, tcc's own reader: nothing unpickled, nothing imported.
    Trusted (--trust-pickle), torch.export.load, which unpickles what the archive marks so; and
    output types of installed libraries (e.g. Hugging Face ModelOutputs), which register
    themselves for deserialization when their module is imported: a first failure naming such
    a type imports its module and loads again."""
    if not trust_pickle:
        with _captured_logs(*TORCH_EXPORT_LOGGERS):
            return read_export_archive(path, MAX_INPUT_ELEMENTS)
    try:
        return _load_exported_once(path)
    except TccError as e:
        m = re.search(r"Deserializing ([A-Za-z_][\w.]*)\.\w+ in pytree is not registered", str(e))
        if not m:
            raise
        try:
            importlib.import_module(m.group(1))
        except ImportError:
            raise e from None
        return _load_exported_once(path)


TORCH_EXPORT_LOGGERS = ("torch.export", "torch._export")


@contextmanager
def _captured_logs(*names: str) -> Iterator[_Capture]:
    """The loggers `names` and their descendants (torch gives some their own stderr handler)
    write into the yielded capture instead of stderr."""
    tree = [n for n, logger in logging.root.manager.loggerDict.items() if isinstance(logger, logging.Logger)
            and any(n.startswith(name + ".") for name in names)]
    capture, loggers = _Capture(), [logging.getLogger(name) for name in (*names, *tree)]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [capture], False
    try:
        yield capture
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate


def _load_exported_once(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, with the cause torch logs (as a traceback) turned into one line."""
    with _captured_logs(*TORCH_EXPORT_LOGGERS) as capture:
        try:
            return torch.export.load(str(path))
        except Exception as e:
            cause = capture.lines[-1] if capture.lines else str(e).splitlines()[0]
            if "is not registered" in cause:
                cause += " (re-export a wrapper whose outputs are tensors, tuples or dicts)"
            raise TccError(f"{path}: cannot load the torch.export archive: {cause}") from None


def _import_arch(spec: str) -> type:
    if ":" not in spec:
        raise TccError(f"--arch '{spec}': expected module:Class (e.g. mypkg.models:Encoder)")
    module_name, _, class_name = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TccError(f"--arch '{spec}': cannot import module '{module_name}' ({e})") from None
    finally:
        sys.path.pop(0)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise TccError(f"--arch '{spec}': '{class_name}' is not an nn.Module class in {module_name}")
    return cls


def load_model_file(path: str | Path, *, input_shapes: list[InputShape] | None = None, arch: str | None = None,
                    trust_pickle: bool = False) -> LoadedModel:
    """Load `path` as whichever supported kind its contents say it is."""
    path = Path(path)
    kind = archive_kind(path)
    examples = example_inputs_from_shapes(input_shapes) if input_shapes else None
    if kind == "export":
        program = _load_exported(path, trust_pickle)
        stored = None
        if program.example_inputs is not None:
            args, kwargs = program.example_inputs
            stored = kwargs if kwargs and not args else args
        if stored is not None:
            _check_stored_examples(path, stored)
        if examples is not None and stored is not None:
            _check_same_shapes(path, stored, examples)
        examples = stored if stored is not None else examples
        if examples is None:
            raise TccError(f"{path}: the archive carries no example inputs: pass --input-shape")
        return LoadedModel(kind, program, None, examples)
    if examples is None:
        raise TccError(f"{path}: a {kind} file carries no example inputs: pass --input-shape (e.g. 1x128:i64)")
    if kind == "torchscript":
        if not trust_pickle:
            raise TccError(f"{path}: a TorchScript model is code, and loading it runs that code. Pass --trust-pickle if "
                           "you trust it, or save with torch.export.save")
        try:
            scripted = torch.jit.load(str(path))
            from torch._export.converter import TS2EPConverter
            args = tuple(examples.values()) if isinstance(examples, dict) else examples
            with _captured_logs(*TORCH_EXPORT_LOGGERS):  # its notes on specialized shapes
                converted = TS2EPConverter(scripted, args).convert()
                program = torch.export.export(converted.module(), args)  # specialize to static shapes
        except Exception as e:
            raise TccError(f"{path}: cannot convert the TorchScript model ({str(e).splitlines()[0]})") from None
        return LoadedModel(kind, program, None, examples)
    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise TccError(f"{path}: a full pickle (torch.save(model)); loading it runs code from the file. "
                           "Pass --trust-pickle if you trust it, or save with torch.export.save") from None
        try:
            obj = torch.load(str(path), weights_only=False, map_location="cpu")
        except Exception as e:
            raise TccError(f"{path}: cannot unpickle ({str(e).splitlines()[0]})") from None
        if not isinstance(obj, torch.nn.Module):
            raise TccError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module")
        return LoadedModel("pickle", None, obj, examples)
    except Exception as e:
        raise TccError(f"{path}: truncated or corrupt archive ({str(e).splitlines()[0]})") from None
    if isinstance(obj, torch.nn.Module):
        return LoadedModel("pickle", None, obj, examples)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TccError(f"{path}: holds a {type(obj).__name__}, neither a model nor a state_dict")
    if arch is None:
        raise TccError(f"{path}: a state_dict has no architecture: pass --arch module:Class")
    model = _import_arch(arch)()
    try:
        model.load_state_dict(obj)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]  # past "Error(s) in loading..."
        raise TccError(f"{path}: does not fit --arch {arch}: {detail}") from None
    return LoadedModel("state_dict", None, model, examples)
