"""Reading a torch.export archive (`torch.export.save`, .pt2) from a stranger.

`torch.export.load` is not safe on such a file: it unpickles weights and constants marked
`use_pickle`, opaque and custom-object constants, and falls back to full unpickling for sample
inputs; its symbolic shapes go through `sympy.sympify` (Python's `eval`), and a node's target may
name any function under `torch`. This reader parses the archive itself and hands torch's
deserializer only what it built: tensors made from raw bytes, sample inputs read by torch's
weights-only loader after their pickle opcodes are checked against a short list of tensor
rebuilders, and a program whose every node calls an operator (checked on the JSON before and
on the objects after deserialization), with static shapes only; input and output container
types no imported module registered become plain dicts and tuples (their modules are never
imported). Every member's declared size
is checked against what its contents need and a memory budget before it is inflated. Anything
else is a one-line TccError naming the member and how to re-export.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from tcc.ir.errors import TccError

LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local header: ..., name length, extra length
JSON_LIMIT = 256 << 20  # a program's JSON: BERT-base's is about 2 MB
INPUTS_LIMIT = 1 << 30  # the sample inputs' torch.save file
# the globals a torch.save of tensors in plain containers needs
TENSOR_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"), ("torch", "Size"),
    *(("torch", f"{kind}Storage") for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                                 "Byte", "Bool", "ComplexFloat", "ComplexDouble")),
})
SAFE_BUILTIN_TARGETS = {f"_operator.{name}" for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "not_")} | {f"math.{name}" for name in ("ceil", "floor", "sqrt", "trunc")}
OPERATOR_TARGET = re.compile(r"torch\.ops\.\w+\.\w+(\.\w+)?")  # torch.ops.NAMESPACE.OP[.OVERLOAD]
RAW_TENSOR_PREFIXES = ("weight_", "tensor_")  # torch's WEIGHT_ and TENSOR_CONSTANT_FILENAME_PREFIX: raw bytes
REEXPORT = "re-export it with torch.export.save from a model whose weights, buffers and example inputs are plain tensors"


def memory_budget() -> int:
    """Bytes a model file may make tcc allocate: half the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class _Archive:
    """The members of one archive under its root folder, read with their declared sizes checked."""

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        formats = [n for n in zf.namelist() if n.endswith("/archive_format") and n.count("/") == 1]
        if not formats:
            legacy = "serialized_exported_program.json" in zf.namelist()
            raise TccError(f"{path}: " + ("an archive of torch < 2.7's export format, which holds pickles; "
                                          "re-export it with a newer torch" if legacy
                                          else "not a torch.export archive (no archive_format)"))
        self.root = formats[0][: -len("archive_format")]
        self.members = {info.filename[len(self.root):]: info for info in zf.infolist()
                        if info.filename.startswith(self.root)}
        total = sum(info.file_size for info in self.members.values())
        if total > memory_budget():
            raise TccError(f"{path}: its members inflate to {total:,} bytes, more than this machine's memory budget "
                           f"({memory_budget():,} bytes)")

    def where(self, name: str) -> str:
        return f"{self.path}: member {self.root}{name}"

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.members if n.startswith(prefix))

    def read(self, name: str, limit: int) -> bytearray:
        """Member `name`, refused before inflating when it declares more than `limit` bytes. A
        stored member (torch stores them all) is read straight into the buffer tensors will
        view: one copy of the weights in memory, not three."""
        info = self.members.get(name)
        if info is None:
            raise TccError(f"{self.where(name)} is missing")
        if info.file_size > limit:
            raise TccError(f"{self.where(name)} declares {info.file_size:,} bytes; its contents need at most "
                           f"{limit:,}")
        try:
            if info.compress_type != zipfile.ZIP_STORED:
                return bytearray(self.zf.read(info))
            buffer = bytearray(info.file_size)
            with open(self.path, "rb") as raw:
                raw.seek(info.header_offset)
                header = raw.read(LOCAL_HEADER.size)
                if len(header) != LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile("bad local file header")
                name_length, extra_length = LOCAL_HEADER.unpack(header)[-2:]
                raw.seek(info.header_offset + LOCAL_HEADER.size + name_length + extra_length)
                if raw.readinto(buffer) != info.file_size:
                    raise EOFError("the member ends early")
            return buffer
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise TccError(f"{self.where(name)}: corrupt ({e})") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name, JSON_LIMIT).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise TccError(f"{self.where(name)}: not valid JSON ({str(e).splitlines()[0][:120]})") from None


def read_export_archive(path: Path, max_elements: int) -> torch.export.ExportedProgram:
    """The ExportedProgram in the archive at `path`, read without unpickling or importing
    anything the archive names; a weight or constant of more than `max_elements` elements is
    refused."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

    with zipfile.ZipFile(path) as zf:
        archive = _Archive(path, zf)
        version = archive.read("archive_version", 64).decode(errors="replace").strip()
        if version != ARCHIVE_VERSION_VALUE:
            raise TccError(f"{archive.where('archive_version')}: version {version!r}; this torch reads "
                           f"{ARCHIVE_VERSION_VALUE} (re-export it with this torch)")
        models = archive.names("models/")
        if models != ["models/model.json"]:
            raise TccError(f"{path}: holds models {[m[7:-5] for m in models]}; tcc compiles an archive of one "
                           "program named 'model' (torch.export.save of one ExportedProgram)")
        for legacy in ("data/weights/model.pt", "data/constants/model.pt"):
            if legacy in archive.members:
                raise TccError(f"{archive.where(legacy)}: legacy pickled {legacy.split('/')[1]}; tcc never unpickles "
                               f"a model file: {REEXPORT}")
        program = archive.json("models/model.json")
        try:
            _check_program(archive, program)
            _plain_containers(program)
            state_dict = _payloads(archive, "data/weights/", "model_weights_config.json", "weight", max_elements)
            constants = _payloads(archive, "data/constants/", "model_constants_config.json", "constant",
                                  max_elements)
        except (TypeError, AttributeError, KeyError) as e:  # JSON of unexpected shapes
            raise TccError(f"{path}: malformed torch.export archive ({type(e).__name__}: {e})") from None
        examples = _sample_inputs(archive, "data/sample_inputs/model.pt")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        exported = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, examples)
    except RecursionError:
        raise TccError(f"{archive.where('models/model.json')}: nested too deeply") from None
    except Exception as e:  # torch's deserializer raises many types on malformed programs
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TccError(f"{path}: cannot load the torch.export archive: {cause}") from None
    _check_targets(archive, exported)
    return exported


def _walk(value: Any, trail: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every entry of a JSON value, iteratively (no recursion limit)."""
    stack = [(trail, value)]
    while stack:
        where, item = stack.pop()
        entries = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in entries:
            yield where, str(key), child
            stack.append((f"{where}/{key}", child))


def _check_program(archive: _Archive, program: Any) -> None:
    """The program's JSON, before torch reads it: static shapes, operator targets, no objects."""
    where = archive.where("models/model.json")
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise TccError(f"{where}: not an exported program (no graph_module)")
    if program.get("range_constraints"):
        raise TccError(f"{where}: range constraints of symbolic shapes; tcc compiles static shapes: re-export "
                       "without dynamic_shapes")
    for trail, key, value in _walk(program):
        if key == "as_expr" or (key in ("sym_int_values", "sym_bool_values", "sym_float_values") and value):
            raise TccError(f"{where}: symbolic shapes at {trail or '/'} ({key}); tcc compiles static shapes: re-export "
                           "without dynamic_shapes")
        if key in ("as_custom_obj", "custom_obj_values", "as_opaque_obj") and value:
            raise TccError(f"{where}: a script object at {trail} ({key}); tcc reads tensors only: {REEXPORT}")
        if key == "target" and "/nodes/" in trail:
            if not isinstance(value, str) or not (OPERATOR_TARGET.fullmatch(value) or value in SAFE_BUILTIN_TARGETS):
                raise TccError(f"{where}: node at {trail} calls {value!r}, which is not an operator; tcc runs "
                               "graphs of torch operators only")


def _plain_containers(program: dict) -> None:
    """Container types of the inputs' and outputs' pytrees that no imported module registered
    (e.g. a Hugging Face ModelOutput, whose module tcc will not import) become plain dicts when
    their context is their keys, tuples otherwise: the same leaves in the same order."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    def plain(spec: Any) -> None:
        if not isinstance(spec, dict) or not isinstance(spec.get("children_spec"), list):
            return
        kind = spec.get("type")
        if kind is not None and kind not in SERIALIZED_TYPE_TO_PYTHON_TYPE:
            try:
                keys = json.loads(spec.get("context") or "null")
            except (TypeError, json.JSONDecodeError):
                keys = None
            named = (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                     and len(keys) == len(spec["children_spec"]))
            spec["type"], spec["context"] = ("builtins.dict", json.dumps(keys)) if named else ("builtins.tuple", "null")
        for child in spec["children_spec"]:
            plain(child)

    for entry in program["graph_module"].get("module_call_graph") or ():
        signature = entry.get("signature") if isinstance(entry, dict) else None
        for key in ("in_spec", "out_spec") if isinstance(signature, dict) else ():
            try:
                version, spec = json.loads(signature[key])
            except (TypeError, ValueError, KeyError):
                continue  # torch's deserializer names what is wrong with it
            plain(spec)
            signature[key] = json.dumps([version, spec])


def _check_targets(archive: _Archive, exported: torch.export.ExportedProgram) -> None:
    """Every node of the deserialized graphs calls an operator (not a function torch exposes)."""
    safe = {getattr(operator, name.split(".")[1]) for name in SAFE_BUILTIN_TARGETS if name.startswith("_operator")}
    safe |= {getattr(math, name.split(".")[1]) for name in SAFE_BUILTIN_TARGETS if name.startswith("math")}
    ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    for module in exported.graph_module.modules():
        for node in getattr(module, "graph", torch.fx.Graph()).nodes:
            if node.op == "call_function" and not (isinstance(node.target, ops) or node.target in safe):
                raise TccError(f"{archive.where('models/model.json')}: node '{node.name}' calls {node.target!r}, "
                               "which is not an operator; tcc runs graphs of torch operators only")
            if node.op in ("call_module", "call_method"):
                raise TccError(f"{archive.where('models/model.json')}: node '{node.name}' is a {node.op}; an exported "
                               "program calls operators only")


def _ints(values: Any, what: str, where: str) -> tuple[int, ...]:
    """Static sizes or strides ([{"as_int": n}, ...]), non-negative."""
    if not isinstance(values, list) or not all(isinstance(v, dict) and set(v) == {"as_int"}
                                               and type(v["as_int"]) is int and v["as_int"] >= 0 for v in values):
        raise TccError(f"{where}: {what} must be non-negative integers (static shapes)")
    return tuple(v["as_int"] for v in values)


class _Payload(NamedTuple):
    """One weight or constant as its config declares it: raw bytes of `member` viewed with
    `dtype`, `sizes`, `strides` and `offset` (in elements)."""

    member: str
    is_param: bool
    requires_grad: bool
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def span(self) -> int:
        """The bytes of the member this view reaches."""
        if math.prod(self.sizes) == 0:
            return 0
        return (self.offset + sum((s - 1) * st for s, st in zip(self.sizes, self.strides)) + 1) * self.dtype.itemsize

    def tensor(self, storage: torch.Tensor) -> torch.Tensor:
        """The view of the member's bytes `storage` (uint8), a Parameter if declared one."""
        usable = storage[: storage.numel() // self.dtype.itemsize * self.dtype.itemsize].view(self.dtype)
        tensor = (torch.zeros(self.sizes, dtype=self.dtype) if math.prod(self.sizes) == 0
                  else torch.as_strided(usable, self.sizes, self.strides, self.offset))
        return torch.nn.Parameter(tensor, requires_grad=self.requires_grad) if self.is_param else tensor


def _payloads(archive: _Archive, folder: str, config_name: str, what: str, max_elements: int
              ) -> dict[str, torch.Tensor]:
    """Weights or constants by name: raw bytes viewed with their declared dtype, sizes and
    strides; tensors sharing a member share its storage (as torch saved them)."""
    config = archive.json(folder + config_name)
    where = archive.where(folder + config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise TccError(f"{where}: no 'config' object")
    payloads = {name: _payload(archive, folder, where, f"{what} '{name}'", meta, max_elements)
                for name, meta in entries.items()}
    spans: dict[str, int] = {}  # bytes of each member that its tensors reach
    for payload in payloads.values():
        spans[payload.member] = max(spans.get(payload.member, 0), payload.span)
    storages: dict[str, torch.Tensor] = {}
    for member, span in spans.items():
        # torch writes the whole storage of the tensor covering a member's views: allow slack for
        # a view of a larger tensor, never a member that inflates far beyond its tensors
        data = archive.read(folder + member, 2 * span + (1 << 16))
        if len(data) < span:
            raise TccError(f"{archive.where(folder + member)}: {len(data):,} bytes, but its tensors reach {span:,}")
        storages[member] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return {name: payload.tensor(storages[payload.member]) for name, payload in payloads.items()}


def _payload(archive: _Archive, folder: str, where: str, label: str, meta: Any, max_elements: int) -> _Payload:
    """The entry `meta` (`label`, e.g. "weight 'fc.weight'") of the payload config `where`,
    checked: raw bytes (no pickle, no object), a dense strided tensor of static shape within
    `max_elements` and the memory budget."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
    item = f"{where}: {label}"
    if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
        raise TccError(f"{item}: no path_name")
    member = meta["path_name"]
    if meta.get("use_pickle") or not member.startswith(RAW_TENSOR_PREFIXES):
        kind = "a pickle" if meta.get("use_pickle") else f"an object ({member})"
        raise TccError(f"{archive.where(folder + member)}: {label} is stored as {kind}; tcc never unpickles a "
                       f"model file: {REEXPORT}")
    tensor = meta.get("tensor_meta")
    if not isinstance(tensor, dict):
        raise TccError(f"{item}: no tensor_meta")
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(tensor.get("dtype"))
    if dtype is None or dtype.is_complex or dtype.itemsize == 0:
        raise TccError(f"{item}: unsupported dtype code {tensor.get('dtype')!r}")
    if tensor.get("layout") not in (None, 7) or (tensor.get("device") or {}).get("type", "cpu") not in (
            "cpu", "cuda", "meta"):
        raise TccError(f"{item}: not a dense strided tensor")
    sizes, strides = _ints(tensor.get("sizes"), "sizes", item), _ints(tensor.get("strides"), "strides", item)
    offset = _ints([tensor.get("storage_offset")], "storage_offset", item)[0]
    if len(sizes) != len(strides):
        raise TccError(f"{item}: {len(sizes)} sizes but {len(strides)} strides")
    elements = math.prod(sizes)
    if elements > max_elements or elements * dtype.itemsize > memory_budget():
        raise TccError(f"{item} of shape {list(sizes)} holds {elements:,} elements; a tensor holds at most "
                       f"{max_elements:,} and fits in half this machine's memory")
    requires_grad = bool(tensor.get("requires_grad")) and dtype.is_floating_point
    return _Payload(member, bool(meta.get("is_param")), requires_grad, dtype, sizes, strides, offset)


def _check_pickle_globals(data: bytes, where: str) -> None:
    """Every global the pickle `data` names rebuilds a tensor or a container; a pickle that
    names anything else (a function to call, a class to build) is refused unrun."""
    strings: list[Any] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                               "BINSTRING", "STRING"):
                strings.append(arg)
                continue
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            elif opcode.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    raise TccError(f"{where}: names a global built at run time; tcc reads tensors only: {REEXPORT}")
                module, name = strings[-2], strings[-1]
            elif opcode.name == "MEMOIZE":
                continue
            elif opcode.name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
                raise TccError(f"{where}: builds objects ({opcode.name}); tcc reads tensors only: {REEXPORT}")
            else:
                strings.clear()
                continue
            strings.clear()
            if (module, name) not in TENSOR_GLOBALS:
                raise TccError(f"{where}: holds a {module}.{name} object, not tensors; tcc never runs code from a "
                               f"model file: {REEXPORT}")
    except (ValueError, EOFError) as e:  # pickletools on damaged bytes
        raise TccError(f"{where}: corrupt pickle ({e})") from None


def _sample_inputs(archive: _Archive, name: str) -> tuple[tuple, dict]:
    """The sample inputs ((args, kwargs)): a torch.save zip whose pickle names only tensor
    rebuilders, loaded weights-only (the loader checks the tensors as it checks any example)."""
    where = archive.where(name)
    data = archive.read(name, INPUTS_LIMIT)
    if not data:
        return (), {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            infos = inner.infolist()
            if sum(i.file_size for i in infos) > INPUTS_LIMIT:
                raise TccError(f"{where}: inflates to more than {INPUTS_LIMIT:,} bytes")
            pickles = [i for i in infos if i.filename.endswith("data.pkl")]
            if len(pickles) != 1:
                raise TccError(f"{where}: not a torch.save file of tensors")
            _check_pickle_globals(inner.read(pickles[0]), where)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise TccError(f"{where}: not a torch.save file of tensors ({e})") from None
    try:
        value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # the weights-only loader's refusal, or damaged bytes
        raise TccError(f"{where}: cannot be read as tensors ({str(e).splitlines()[0][:160]})") from None
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)
            and isinstance(value[1], dict)):
        raise TccError(f"{where}: not (args, kwargs) of example inputs")
    return value
