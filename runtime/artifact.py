"""The artifact: one directory written atomically by `tcc compile`, read by `tcc run`.

    manifest.json        versions, target, passes run, input/output signature, file hashes
    graph.tcc            the IR text
    weights.safetensors  the constants in their storage encodings: per constant and buffer a
                         byte tensor `NAME/BUFFER` (the buffer's storage form, see
                         `tcc.ir.encoding`), and in the metadata per constant its buffers'
                         element counts as JSON; the encoding, shape and dtype are the type
                         in graph.tcc. Every buffer is checked on load (no pickles anywhere).
    example_inputs.npz   example inputs by input name, when the model came with them
    report.html          what was compiled and what it costs, with its figures in report/ (PNG);
                         rendered by the compiler (saving only writes it)
    measured/            NOT hashed: what depends on the compiling machine (the cost model's
                         measured figures and its predictions, host.json); listed in the
                         manifest's `measured`, read leniently on load, never used to run
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import io
import json
import os
import shutil
import math
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
import safetensors
import torch

from tcc.ir.errors import ParseError, TccError, VerifyError
from tcc.ir.graph import Graph, freeze_weights
from tcc.ir.parser import parse_graph
from tcc.ir.printer import print_graph
from tcc.ir.types import TensorType
from tcc.ir.verifier import verify

from tcc.backends.accel.layout import AccelProgram

from .accel_executor import AccelExecutor
from .numpy_executor import NumpyExecutor
from .outputs import output_error, probe, publish, staging_dir
from .torch_dtypes import TORCH_DTYPES
from .torch_executor import TorchExecutor, resolve_device

FORMAT = "tcc-artifact"
FORMAT_VERSION = 3  # 3: no plan.json (the executors schedule the graph themselves)
WEIGHTS = "weights.safetensors"
BACKEND_DIR = "accel"  # the accelerator backend's files
REPORT, REPORT_DIR = "report.html", "report"  # the report and the folder of its figures
MEASURED_DIR = "measured"  # unhashed files that depend on the compiling machine
MEASURED_ABOUT = "measured on the compiling machine; not hashed, never used to run the artifact"
MAX_MEASURED_BYTES = 16 << 20  # a measured file larger than this is not read
EXECUTORS = ("cpu", "gpu", "numpy", "sim", "rtl")
ACCEL_EXECUTORS = ("sim", "rtl")  # the accelerator's tiers: ISA simulator, Verilator on the Verilog
MAX_MANIFEST_BYTES = 16 << 20
MAX_PARSED_BYTES = 256 << 20  # graph.tcc: parsed into objects many times its size


@dataclass
class Artifact:
    """A compiled model: the IR graph, how its inputs/outputs map to Python values, the manifest,
    the backend's files and the report. `run(inputs, on=...)` executes it; `save(path)` writes
    it atomically."""

    graph: Graph
    signature: dict  # {"input_names": [...], "output_form": "tensor|tuple|dict", "output_keys": [...]}
    manifest: dict
    example_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    backend_files: dict[str, bytes] = field(default_factory=dict)  # relative path -> contents (accel/...)
    path: Path | None = None
    _executors: dict[str, Any] = field(default_factory=dict, repr=False)
    report_files: dict[str, bytes] = field(default_factory=dict, repr=False)  # report.html, report/*.png
    measured_files: dict[str, bytes] = field(default_factory=dict, repr=False)  # measured/*: unhashed
    # what the compile found on this machine, for the user (a selection's reason, select-device's latencies)
    notes: tuple[str, ...] = field(default=(), repr=False, compare=False)
    weights_file: WeightsFile | None = field(default=None, repr=False, compare=False)  # of `graph`, being hashed

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
        except (ValueError, RecursionError) as e:
            raise TccError(f"{self.path or 'artifact'}: {e}") from None

    def _accel_executor(self, on: str) -> AccelExecutor:
        program = self.accel_program()
        if on == "sim":
            return AccelExecutor(self.graph, program)
        if shutil.which("verilator") is None:
            raise TccError("--on rtl runs Verilator, which is not installed (Debian package 'verilator'; "
                           "`make install` installs it)")
        from tcc.runtime.rtl import run_verilator
        return AccelExecutor(self.graph, program, run_verilator)

    def flatten_inputs(self, inputs: Any) -> list[np.ndarray | torch.Tensor]:
        """Positional list of graph inputs from a tensor, sequence or dict, checked against the
        graph's input types. State not given (a decoder's KV cache) starts empty: zeros."""
        graph_inputs, user = self.graph.inputs, self.graph.user_inputs
        initial = self.graph.initial_state()
        if isinstance(inputs, Mapping):
            missing = [n for n, _ in graph_inputs if n not in inputs and n not in initial]
            extra = [k for k in inputs if k not in dict(graph_inputs)]
            if missing or extra:
                problem = f"missing input '{missing[0]}'" if missing else f"unknown input '{extra[0]}'"
                raise TccError(f"{problem} (the model takes {', '.join(user)})")
            values = [inputs[n] if n in inputs else initial[n] for n, _ in graph_inputs]
        else:
            values = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else list(inputs)
            if len(values) == len(user) < len(graph_inputs):
                values += [initial[n] for n in self.graph.input_names[len(user):]]
            if len(values) != len(graph_inputs):
                raise TccError(f"the model takes {len(user)} inputs ({', '.join(user)}), got {len(values)}")
        for (name, expected), value in zip(graph_inputs, values):
            _check_input(name, expected, value)
        return values

    def run(self, inputs: Any = None, on: str = "cpu") -> Any:
        """Run on `cpu` or `gpu` (torch executor), `numpy` (the reference spec), or, for an FPGA
        target, `sim` (ISA simulator) or `rtl` (Verilator on the generated Verilog); after
        those, `executor(on).stats` holds cycles, MACs and instruction counts. Without inputs,
        the example inputs stored in the artifact are used. Returns a tensor, tuple or dict of
        torch tensors, shaped like the original model's outputs (a decode step's state, its
        cache after the step, is left out: `tcc.runtime.generate` carries it)."""
        if inputs is None:
            if not self.example_inputs:
                raise TccError("no inputs given and the artifact stores no example inputs")
            inputs = self.example_inputs
        outputs = self.run_flat(self.flatten_inputs(inputs), on)
        return self.structure_outputs(outputs[:len(self.graph.user_outputs)])

    def run_flat(self, values: Sequence[np.ndarray | torch.Tensor], on: str = "cpu") -> list[torch.Tensor]:
        """Every graph output (state too) for the graph's inputs in order, already checked."""
        executor = self.executor(on)
        if on == "numpy" or on in ACCEL_EXECUTORS:
            return [torch.from_numpy(np.array(o)) for o in executor(*[_to_numpy(v) for v in values])]
        return [o.cpu() for o in executor.run([_to_torch(v) for v in values])]

    def structure_outputs(self, outputs: Sequence[torch.Tensor]) -> Any:
        form = self.signature["output_form"]
        if form == "tensor" and len(outputs) == 1:
            return outputs[0]
        if form == "dict":
            return dict(zip(self.signature["output_keys"], outputs))
        return tuple(outputs)

    # -- persistence ----------------------------------------------------------------------------
    def _weights_file(self) -> WeightsFile:
        """The weights file of `graph`: the one the compiler started hashing, if still `graph`'s."""
        if self.weights_file is None or self.weights_file.graph is not self.graph:
            self.weights_file = WeightsFile(self.graph)
        return self.weights_file

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: build it beside `path`, then move it into
        place in one step (see `tcc.runtime.outputs`). An existing tcc artifact at `path` is
        replaced; any other existing path is an error (`check_destination`). Only writes:
        `measured_files` unhashed, listed in the manifest's `measured`, the rest hashed."""
        path = check_destination(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with staging_dir(path.parent) as staging:
                hashes = {
                    "graph.tcc": _write(staging / "graph.tcc", print_graph(self.graph).encode()),
                    WEIGHTS: self._weights_file().write(staging / WEIGHTS),
                }
                if self.example_inputs:
                    hashes["example_inputs.npz"] = _write_npz(staging / "example_inputs.npz", self.example_inputs)
                for name, data in {**self.backend_files, **self.report_files}.items():
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    hashes[name] = _write(staging / name, data)
                for name, data in self.measured_files.items():
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(data)
                manifest = dict(self.manifest, format=FORMAT, version=FORMAT_VERSION, signature=self.signature,
                                files=hashes)
                manifest.pop("measured", None)
                if self.measured_files:
                    manifest["measured"] = {"files": sorted(self.measured_files), "about": MEASURED_ABOUT}
                (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
                publish(staging, path)
        except OSError as e:
            raise output_error(path, e) from None
        self.manifest, self.path = manifest, path
        return path


def check_destination(path: str | os.PathLike) -> Path:
    """`path` as a place `Artifact.save` may write, checked before the work that makes the
    artifact: a new path whose nearest existing folder takes new entries, or a tcc artifact
    directory (its manifest of this format and version), which is replaced. Anything else is
    refused, and so are the current directory and those above it, whatever they hold."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        probe(next(p for p in path.parents if os.path.lexists(p)), path)
        return path
    except OSError as e:
        raise output_error(path, e) from None
    why = _not_replaceable(path, mode)
    if why:
        raise TccError(f"{path}: {why}; refusing to overwrite it (tcc replaces only tcc artifacts)")
    probe(path.parent, path)
    return path


def _not_replaceable(path: Path, mode: int) -> str | None:
    """Why the existing `path` (of file mode `mode`) is not an artifact to replace; None if it is."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if not stat.S_ISDIR(mode):
        return "not a directory"
    if Path.cwd().is_relative_to(path.resolve()):
        return "the current directory or one above it"
    if not os.path.lexists(path / "manifest.json"):
        return "a directory without manifest.json"
    try:
        _read_manifest(_member(path, "manifest.json"))
    except TccError as e:
        return f"not a tcc artifact ({e})"
    return None


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


def _write(file: Path, *chunks: bytes | memoryview) -> str:
    """Write `chunks` to a new `file`; their sha256."""
    digest = hashlib.sha256()
    with open(file, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _write_npz(file: Path, arrays: Mapping[str, np.ndarray]) -> str:
    with open(file, "xb") as raw:
        writer = _HashingWriter(raw)
        np.savez(writer, **dict(arrays))
        return writer.digest.hexdigest()


# numpy dtypes by their safetensors names (the buffers of every encoding use these)
_SAFETENSORS_DTYPES = {np.dtype(k): v for k, v in (("float64", "F64"), ("float32", "F32"), ("float16", "F16"),
                                                   ("int64", "I64"), ("int32", "I32"), ("int16", "I16"),
                                                   ("int8", "I8"), ("uint64", "U64"), ("uint32", "U32"),
                                                   ("uint16", "U16"), ("uint8", "U8"), ("bool", "BOOL"))}


class WeightsFile:
    """The safetensors file of `graph`'s constants in their encodings, as the chunks to write:
    the header (keys sorted, padded with spaces to 8 bytes, as the format allows), then each
    buffer's bytes straight from its array, little-endian. Its sha256 is computed in a thread
    from construction on (hashlib releases the GIL), so the compiler, which builds it as soon as
    the graph is final, has it hashed by the time the artifact is saved. (The safetensors
    package serializes the whole file in memory first, copying every weight twice; its reader
    checks what is written here.)"""

    def __init__(self, graph: Graph):
        self.graph = graph
        arrays, header, offset, metadata = [], {}, 0, {}
        for name, _ in graph.constants:
            enc = graph.encoded(name)
            for buffer, data in enc.buffer_arrays().items():
                data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
                header[f"{name}/{buffer}"] = {"dtype": _SAFETENSORS_DTYPES[data.dtype], "shape": list(data.shape),
                                              "data_offsets": [offset, offset + data.nbytes]}
                arrays.append(data)
                offset += data.nbytes
            metadata[name] = json.dumps(enc.lengths())
        header["__metadata__"] = metadata
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text = text.ljust(-(-len(text) // 8) * 8)
        self.chunks = (len(text).to_bytes(8, "little"), text,
                       *(memoryview(a).cast("B") for a in arrays if a.nbytes))
        hashing = concurrent.futures.ThreadPoolExecutor(1)
        self._digest = hashing.submit(self._sha256)
        hashing.shutdown(wait=False)

    def _sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks:
            digest.update(chunk)
        return digest.hexdigest()

    def write(self, file: Path) -> str:
        """Write the file to a new `file`, its blocks allocated first (a third faster for large
        files where the file system can); its sha256. Write errors, a full disk, are OSErrors."""
        with open(file, "xb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, sum(len(chunk) for chunk in self.chunks))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a full disk says so now
                    raise
            for chunk in self.chunks:
                f.write(chunk)
        return self._digest.result()


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
            if not isinstance(lengths, dict):
                raise TypeError
        except KeyError:
            raise TccError(f"{where}: missing from the weights") from None
        except (ValueError, TypeError, RecursionError):
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
    """The arrays of `file`, checked before any is read to allocate no more than the file's
    size: the archive's members, inflated, sum to at most the file's size (np.savez stores
    them uncompressed), each as large as its .npy header's shape and dtype say."""
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > os.path.getsize(file):
                raise ValueError("its members claim more bytes than it holds")
            for member in members:
                _check_npy(archive, member)
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # numpy and zipfile raise many types for a damaged archive
        raise TccError(f"{file}: cannot be read ({type(e).__name__}: {e})") from None


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy stream's header declares, `f` left at the array's first byte
    (nothing of the array read); ValueError for a damaged header or an unknown version."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format version {version}")
    shape, _, dtype = readers[version](f)
    return shape, dtype


def _check_npy(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Raise ValueError unless `member` holds exactly the bytes of the array its .npy header
    describes."""
    with archive.open(member) as f:
        try:
            shape, dtype = read_npy_header(f)
        except ValueError as e:
            raise ValueError(f"member '{member.filename}': {e}") from None
        claimed = math.prod(shape) * dtype.itemsize
        if member.file_size - f.tell() != claimed:
            raise ValueError(f"member '{member.filename}' holds {member.file_size - f.tell():,} bytes of array "
                             f"data, its header describes {dtype}{list(shape)}")


REQUIRED_FILES = ("graph.tcc", WEIGHTS)  # every artifact's manifest lists these


def load(path: str | os.PathLike) -> Artifact:
    """Load an artifact directory, checking the manifest, file hashes, graph and signature. Every
    problem is a one-line TccError naming the file (and the field, constant or line)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise TccError(f"{path}: " + ("a file, not an artifact directory (tcc compile writes one)" if path.exists()
                                      else "no such artifact directory"))
    if not manifest_path.is_file():
        raise TccError(f"{path}: not a tcc artifact (no manifest.json)")
    manifest = _read_manifest(_member(path, "manifest.json"))
    files = {name: _member(path, name) for name in manifest["files"]}
    for name, digest in manifest["files"].items():
        if _sha256(files[name]) != digest:
            raise TccError(f"{files[name]}: contents do not match the manifest's hash (corrupted or edited)")
    try:
        graph = parse_graph(_read_text(files["graph.tcc"], MAX_PARSED_BYTES), source=str(files["graph.tcc"]))
        graph = verify(_read_weights(files[WEIGHTS], graph))
    except (ParseError, VerifyError) as e:
        raise TccError(str(e)) from None
    _check_signature(manifest_path, manifest.get("signature"), graph)
    examples = _read_npz(files["example_inputs.npz"]) if "example_inputs.npz" in files else {}
    backend_files = {name: _read_bytes(file) for name, file in files.items() if name.startswith(BACKEND_DIR + "/")}
    report_files = {name: _read_bytes(file) for name, file in files.items()
                    if name == REPORT or name.startswith(REPORT_DIR + "/")}
    return Artifact(graph, manifest["signature"], manifest, examples, backend_files, path,
                    report_files=report_files, measured_files=_read_measured(path, manifest))


def _read_measured(path: Path, manifest: dict) -> dict[str, bytes]:
    """The unhashed files the manifest's `measured` lists, as far as they are there: regular
    files directly in measured/ (no links), each at most `MAX_MEASURED_BYTES`. Anything else is
    left out, never an error: they are carried along to a re-save, never trusted."""
    listed = manifest.get("measured")
    names = listed.get("files") if isinstance(listed, dict) else None
    out = {}
    for name in names if isinstance(names, list) else ():
        if not isinstance(name, str) or Path(name).parent != Path(MEASURED_DIR) or Path(name).name in ("", ".", ".."):
            continue
        try:
            out[name] = _read_bytes(_member(path, name), MAX_MEASURED_BYTES)
        except TccError:  # missing, a link, not a regular file, too large: left out
            continue
    return out


def _member(path: Path, name: str) -> Path:
    """File `name` of the artifact directory `path`: a regular file reached through the
    artifact's own folders, never through a symbolic link, which could lead outside it."""
    file = path
    for part in Path(name).parts:
        file = file / part
        try:
            mode = os.lstat(file).st_mode
        except FileNotFoundError:
            raise TccError(f"{path / name}: missing from the artifact") from None
        except OSError as e:
            raise TccError(f"{path / name}: cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(mode):
            raise TccError(f"{file}: a symbolic link; an artifact holds its own files (refusing to follow it)")
    if not stat.S_ISREG(mode):
        raise TccError(f"{file}: not a regular file")
    return file


def _read_bytes(file: Path, limit: int | None = None) -> bytes:
    """The contents of `file` (a link is not followed), its size checked against `limit`
    before the read allocates."""
    try:
        with open(os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise TccError(f"{file}: {size:,} bytes; tcc reads at most {limit:,} from it")
            return f.read(size)
    except OSError as e:
        raise TccError(f"{file}: cannot be read ({e.strerror})") from None


def _read_text(file: Path, limit: int) -> str:
    try:
        return _read_bytes(file, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TccError(f"{file}: not UTF-8 text (byte {e.start})") from None


def _read_manifest(file: Path) -> dict:
    """The manifest, its fields checked as far as loading and `tcc inspect` read them."""
    try:
        manifest = json.loads(_read_text(file, MAX_MANIFEST_BYTES))
    except json.JSONDecodeError as e:
        raise TccError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise TccError(f"{file}: JSON nested too deep") from None
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
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts:
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
    if signature["input_names"] != list(graph.user_inputs):
        raise TccError(f"{file}: 'signature' names inputs {signature['input_names']}, the graph takes "
                       f"{list(graph.user_inputs)}")
    if signature["output_form"] == "dict" and len(signature["output_keys"]) != len(graph.user_outputs):
        raise TccError(f"{file}: 'signature' has {len(signature['output_keys'])} output keys for the graph's "
                       f"{len(graph.user_outputs)} outputs")
