"""The artifact: one directory written atomically by `tcc compile`, read by `tcc run`.

    manifest.json        versions, target, passes run, input/output signature, file hashes
    graph.tcc            the IR text
    weights.safetensors  the constants in their storage encodings: per constant and buffer a
                         byte tensor `NAME/BUFFER` (the buffer's storage form, see
                         `tcc.ir.encoding`), and in the metadata per constant its buffers'
                         element counts as JSON; the encoding, shape and dtype are the type
                         in graph.tcc. Every buffer is checked on load (no pickles anywhere).
    plan.json            the reference backend's plan
    example_inputs.npz   example inputs by input name, when the model came with them
    report.html          what was compiled and what it costs, with its figures in report/ (PNG);
                         rendered by the compiler (`Artifact.render_report`) on the first save
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import safetensors
import safetensors.numpy
import torch

from tcc.backends.reference.plan import ReferencePlan
from tcc.ir.errors import ParseError, TccError, VerifyError
from tcc.ir.graph import Graph, freeze_weights
from tcc.ir.parser import parse_graph
from tcc.ir.printer import print_graph
from tcc.ir.types import TensorType
from tcc.ir.verifier import verify

from tcc.backends.accel.layout import AccelProgram

from .accel_executor import AccelExecutor
from .numpy_executor import NumpyExecutor
from .torch_executor import TORCH_DTYPES, TorchExecutor, resolve_device

FORMAT = "tcc-artifact"
FORMAT_VERSION = 2
WEIGHTS = "weights.safetensors"
BACKEND_DIR = "accel"  # the accelerator backend's files
REPORT, REPORT_DIR = "report.html", "report"  # the report and the folder of its figures
EXECUTORS = ("cpu", "gpu", "numpy", "sim", "rtl")
ACCEL_EXECUTORS = ("sim", "rtl")  # the accelerator's tiers: ISA simulator, Verilator on the Verilog


@dataclass
class Artifact:
    """A compiled model: the IR graph, how its inputs/outputs map to Python values, the plan
    and the manifest. `run(inputs, on=...)` executes it; `save(path)` writes it atomically."""

    graph: Graph
    signature: dict  # {"input_names": [...], "output_form": "tensor|tuple|dict", "output_keys": [...]}
    plan: ReferencePlan
    manifest: dict
    example_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    backend_files: dict[str, bytes] = field(default_factory=dict)  # relative path -> contents (accel/...)
    path: Path | None = None
    _executors: dict[str, Any] = field(default_factory=dict, repr=False)
    report_files: dict[str, bytes] = field(default_factory=dict, repr=False)  # report.html, report/*.png
    # renders `report_files` on the first save (the compiler's report; None once rendered)
    render_report: Callable[["Artifact"], dict[str, bytes]] | None = field(default=None, repr=False, compare=False)

    # -- running ------------------------------------------------------------------------------
    def executor(self, on: str):
        """The executor for `on` (cpu, gpu, numpy; sim and rtl for accelerator targets), built once."""
        if on not in EXECUTORS:
            raise TccError(f"unknown executor '{on}' (choose {', '.join(EXECUTORS)})")
        if on not in self._executors:
            if on in ACCEL_EXECUTORS:
                self._executors[on] = self._accel_executor(on)
            else:
                self._executors[on] = NumpyExecutor(self.graph) if on == "numpy" else TorchExecutor(
                    self.graph, resolve_device(on))
        return self._executors[on]

    def accel_program(self) -> AccelProgram:
        """The accelerator program of an FPGA target's artifact."""
        files = {name[len(BACKEND_DIR) + 1:]: data for name, data in self.backend_files.items()}
        if not files:
            raise TccError(f"target '{self.manifest['target']['name']}' has no accelerator: --on sim and --on rtl "
                           "need an artifact compiled for an fpga-* target")
        try:
            return AccelProgram.from_files(files)
        except ValueError as e:
            raise TccError(f"{self.path or 'artifact'}: {e}") from None

    def _accel_executor(self, on: str) -> AccelExecutor:
        program = self.accel_program()
        if on == "sim":
            return AccelExecutor(self.graph, program)
        if shutil.which("verilator") is None:
            raise TccError("--on rtl runs Verilator, which is not installed (Debian package 'verilator'; "
                           "`make install` installs it)")
        from tcc.backends.accel.verilog import run_verilator
        return AccelExecutor(self.graph, program, run_verilator)

    def flatten_inputs(self, inputs: Any) -> list[np.ndarray | torch.Tensor]:
        """Positional list of graph inputs from a tensor, sequence or dict, checked against the
        graph's input types."""
        graph_inputs = self.graph.inputs
        if isinstance(inputs, Mapping):
            missing = [n for n, _ in graph_inputs if n not in inputs]
            extra = [k for k in inputs if k not in dict(graph_inputs)]
            if missing or extra:
                problem = f"missing input '{missing[0]}'" if missing else f"unknown input '{extra[0]}'"
                raise TccError(f"{problem} (the model takes {', '.join(n for n, _ in graph_inputs)})")
            values = [inputs[n] for n, _ in graph_inputs]
        else:
            values = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else list(inputs)
            if len(values) != len(graph_inputs):
                raise TccError(f"the model takes {len(graph_inputs)} inputs "
                               f"({', '.join(n for n, _ in graph_inputs)}), got {len(values)}")
        for (name, expected), value in zip(graph_inputs, values):
            _check_input(name, expected, value)
        return values

    def run(self, inputs: Any = None, on: str = "cpu") -> Any:
        """Run on `cpu` or `gpu` (torch executor), `numpy` (the reference spec), or, for an FPGA
        target, `sim` (ISA simulator) or `rtl` (Verilator on the generated Verilog); after
        those, `executor(on).stats` holds cycles, MACs and instruction counts. Without inputs,
        the example inputs stored in the artifact are used. Returns a tensor, tuple or dict of
        torch tensors, shaped like the original model's outputs."""
        if inputs is None:
            if not self.example_inputs:
                raise TccError("no inputs given and the artifact stores no example inputs")
            inputs = self.example_inputs
        values = self.flatten_inputs(inputs)
        executor = self.executor(on)
        if on == "numpy" or on in ACCEL_EXECUTORS:
            outputs = [torch.from_numpy(np.array(o)) for o in executor(*[_to_numpy(v) for v in values])]
        else:
            outputs = [o.cpu() for o in executor.run([_to_torch(v) for v in values])]
        return self.structure_outputs(outputs)

    def structure_outputs(self, outputs: Sequence[torch.Tensor]) -> Any:
        form = self.signature["output_form"]
        if form == "tensor" and len(outputs) == 1:
            return outputs[0]
        if form == "dict":
            return dict(zip(self.signature["output_keys"], outputs))
        return tuple(outputs)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: build it beside `path`, then rename it into
        place. An existing artifact at `path` is replaced; any other existing path is an error.
        The report (`report_files`) is rendered first if it has not been yet."""
        path = Path(path)
        if path.exists() and not (path / "manifest.json").is_file():
            raise TccError(f"{path}: exists and is not a tcc artifact; refusing to overwrite it")
        if self.render_report is not None:
            self.report_files, self.render_report = self.render_report(self), None
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            hashes = {
                "graph.tcc": _write(staging / "graph.tcc", print_graph(self.graph).encode()),
                WEIGHTS: _write_weights(staging / WEIGHTS, self.graph),
                "plan.json": _write(staging / "plan.json", self.plan.to_json().encode()),
            }
            if self.example_inputs:
                hashes["example_inputs.npz"] = _write_npz(staging / "example_inputs.npz", self.example_inputs)
            for name, data in {**self.backend_files, **self.report_files}.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                hashes[name] = _write(staging / name, data)
            manifest = dict(self.manifest, format=FORMAT, version=FORMAT_VERSION, signature=self.signature,
                            files=hashes)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _publishable(staging)
            if path.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, retired / "artifact")
                os.replace(staging, path)
                shutil.rmtree(retired)
            else:
                os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.manifest, self.path = manifest, path
        return path


def _publishable(directory: Path) -> None:
    """The modes a directory and files created with the process's umask would have: mkdtemp
    makes the staging directory private, and some writers their files."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [directory, *directory.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


class _HashingWriter(io.RawIOBase):
    """A write-only, unseekable file that hashes what passes through it, so that zipfile
    streams the archive in one pass and the hash costs no second read."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)


def _write(file: Path, data: bytes) -> str:
    file.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_npz(file: Path, arrays: Mapping[str, np.ndarray]) -> str:
    with open(file, "wb") as raw:
        writer = _HashingWriter(raw)
        np.savez(writer, **dict(arrays))
        return writer.digest.hexdigest()


def _write_weights(file: Path, graph: Graph) -> str:
    """Write the safetensors file of `graph`'s constants in their encodings; its sha256."""
    tensors, metadata = {}, {}
    for name, _ in graph.constants:
        enc = graph.encoded(name)
        for buffer, data in enc.buffer_arrays().items():
            tensors[f"{name}/{buffer}"] = data
        metadata[name] = json.dumps(enc.lengths())
    safetensors.numpy.save_file(tensors, str(file), metadata=metadata)
    _sort_header(file)
    return _sha256(file)


def _sort_header(file: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place: safetensors writes
    `__metadata__` in hash-map order, which differs between processes (and the artifact must
    not). The sorted header is as long or shorter; it is padded with spaces, as the format allows."""
    with open(file, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        f.seek(8)
        f.write(text.ljust(size))


def _read_weights(file: Path, graph: Graph) -> Graph:
    """`graph` (parsed without weights) with its constants loaded from `file`: each rebuilt in
    the encoding its type names, checked, and decoded; errors name the constant."""
    try:
        with safetensors.safe_open(str(file), framework="numpy") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
            raw = {key: f.get_tensor(key) for key in keys}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise TccError(f"{file}: cannot be read ({e})") from None
    weights, stored, expected = {}, {}, set()
    for name, t in graph.constants:
        where = f"{file}: constant '{name}' ({t})"
        try:
            lengths = json.loads(metadata[name])
        except KeyError:
            raise TccError(f"{where}: missing from the weights") from None
        except (json.JSONDecodeError, TypeError):
            raise TccError(f"{where}: unreadable buffer lengths in the metadata") from None
        missing = [buffer for buffer in lengths if f"{name}/{buffer}" not in raw]
        if missing:
            raise TccError(f"{where}: buffer '{missing[0]}' is missing")
        try:
            buffers = {buffer: (int(count), raw[f"{name}/{buffer}"].tobytes()) for buffer, count in lengths.items()}
            stored[name] = t.encoding.load(t.shape, t.dtype, buffers)
        except (ValueError, TypeError) as e:
            raise TccError(f"{where}: {e}") from None
        weights[name] = t.encoding.decode(stored[name])
        weights[name].flags.writeable = False  # graphs hold read-only weights; no copy needed
        expected |= {f"{name}/{buffer}" for buffer in lengths}
    extra = sorted(keys - expected)
    if extra:
        raise TccError(f"{file}: tensor '{extra[0]}' belongs to no constant of the graph")
    return graph.replace(weights=freeze_weights(weights), stored=stored)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_input(name: str, expected: TensorType, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        shape, ok_dtype, got = tuple(value.shape), value.dtype == TORCH_DTYPES[expected.dtype], str(value.dtype)
    elif isinstance(value, np.ndarray):
        shape, ok_dtype, got = value.shape, value.dtype == expected.dtype.numpy, str(value.dtype)
    else:
        raise TccError(f"input '{name}': expected a tensor {expected}, got {type(value).__name__}")
    if shape != expected.shape or not ok_dtype:
        raise TccError(f"input '{name}': expected {expected}, got {got.replace('torch.', '')}{list(shape)}")


def _to_torch(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def _to_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # numpy and zipfile raise many types for a damaged archive
        raise TccError(f"{file}: cannot be read ({type(e).__name__}: {e})") from None


REQUIRED_FILES = ("graph.tcc", WEIGHTS, "plan.json")  # every artifact's manifest lists these


def load(path: str | os.PathLike) -> Artifact:
    """Load an artifact directory, checking the manifest, file hashes, graph and plan. Every
    problem is a one-line TccError naming the file (and the field, constant or line)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise TccError(f"{path}: " + ("a file, not an artifact directory (tcc compile writes one)" if path.exists()
                                      else "no such artifact directory"))
    if not manifest_path.is_file():
        raise TccError(f"{path}: not a tcc artifact (no manifest.json)")
    manifest = _read_manifest(manifest_path)
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise TccError(f"{file}: missing from the artifact")
        if _sha256(file) != digest:
            raise TccError(f"{file}: contents do not match the manifest's hash (corrupted or edited)")
    try:
        graph = parse_graph(_read_text(path / "graph.tcc"), source=str(path / "graph.tcc"))
        graph = verify(_read_weights(path / WEIGHTS, graph))
    except (ParseError, VerifyError) as e:
        raise TccError(str(e)) from None
    _check_signature(manifest_path, manifest.get("signature"), graph)
    try:
        plan = ReferencePlan.from_json(_read_text(path / "plan.json"))
    except KeyError as e:
        raise TccError(f"{path / 'plan.json'}: not a plan (no field {e})") from None
    except (ValueError, TypeError, AttributeError) as e:  # json's errors are ValueErrors
        raise TccError(f"{path / 'plan.json'}: not a plan ({e})") from None
    plan.check_against(graph)
    examples = _read_npz(path / "example_inputs.npz") if "example_inputs.npz" in manifest["files"] else {}
    backend_files = {name: (path / name).read_bytes() for name in manifest["files"]
                     if name.startswith(BACKEND_DIR + "/")}
    report_files = {name: (path / name).read_bytes() for name in manifest["files"]
                    if name == REPORT or name.startswith(REPORT_DIR + "/")}
    return Artifact(graph, manifest["signature"], plan, manifest, examples, backend_files, path,
                    report_files=report_files)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TccError(f"{file}: not UTF-8 text (byte {e.start})") from None


def _read_manifest(file: Path) -> dict:
    """The manifest, its fields checked as far as loading and `tcc inspect` read them."""
    try:
        manifest = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise TccError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}") from None
    if not isinstance(manifest, dict):
        raise TccError(f"{file}: a JSON {type(manifest).__name__}, not a tcc artifact manifest (an object)")
    if manifest.get("format") != FORMAT:
        raise TccError(f"{file}: 'format' is {manifest.get('format')!r}, not '{FORMAT}'")
    if manifest.get("version") != FORMAT_VERSION:
        raise TccError(f"{file}: artifact format version {manifest.get('version')!r}; this tcc reads version "
                       f"{FORMAT_VERSION} (compile the model again)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise TccError(f"{file}: 'files' must map file names to sha256 digests")
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise TccError(f"{file}: 'files' names '{name}', outside the artifact directory")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise TccError(f"{file}: 'files' does not list {missing[0]}")
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str):
        raise TccError(f"{file}: 'target' must be an object with a 'name'")
    passes = manifest.get("passes")
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise TccError(f"{file}: 'passes' must be a list of pass names")
    return manifest


def _check_signature(file: Path, signature: Any, graph: Graph) -> None:
    """The manifest's signature names the graph's inputs and shapes its outputs."""
    forms = ("tensor", "tuple", "dict")
    if (not isinstance(signature, dict) or signature.get("output_form") not in forms
            or not all(isinstance(signature.get(key), list) and all(isinstance(n, str) for n in signature[key])
                       for key in ("input_names", "output_keys"))):
        raise TccError(f"{file}: 'signature' must hold input_names, output_form ({', '.join(forms)}) and "
                       "output_keys")
    if signature["input_names"] != list(graph.input_names):
        raise TccError(f"{file}: 'signature' names inputs {signature['input_names']}, the graph takes "
                       f"{list(graph.input_names)}")
    if signature["output_form"] == "dict" and len(signature["output_keys"]) != len(graph.outputs):
        raise TccError(f"{file}: 'signature' has {len(signature['output_keys'])} output keys for the graph's "
                       f"{len(graph.outputs)} outputs")
