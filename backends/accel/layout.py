"""DRAM layouts shared by the codegen and the runtime: how a tensor lies in DRAM so that one
`load` moves a run of its buffer words, and how `store`d OBUF words read back as a tensor.

Every layout cuts a 2-D tensor into blocks of `lanes` along one axis (the buffer's lanes,
zero-padded at the end) and lays each block out as consecutive buffer words along the other
(the "inner") axis; each buffer word starts a DRAM word and takes `config.beats(buffer)` of them
(`isa.pack_words` lane order):

    activations  X [M, K] -> ABUF words: per row block of `rows` rows, K words (word k = X[rows, k])
    binary activations X [M, K] of +-1 -> the same, `data_bits` values per lane (`pack_binary`)
    weights      W [N, K] -> BBUF words: per block of `cols` output channels, K words (word k = W[cols, k])
    weights, transposed  V [K, N] -> the weights layout of V^T (a matmul's right operand)
    weight stream S [words, cols] -> BBUF words as they are (sparse and packed weights, built by
                 the codegen in the order the array reads them)
    param words  P [words, cols] -> PBUF words as they are (constants of the vector unit's
                 instructions, per-channel vectors of layer norms)
    rows         X [M, N] <-> OBUF words row by row: row m is words m*J ... m*J + J - 1,
                 J = ceil(N / cols) (what the vector unit's row instructions read and write)
    PBUF rows    X [M, N] -> PBUF words the same way (vsoftmax's masks, lanes 0 or 1; vlayernorm's rows)

A tensor with more than two dims is a batch of 2-D tensors over its leading dims, laid out
one after the other (`batch_words` DRAM words each).
    params       P [3, N] -> PBUF words: per block of `cols` channels, 3 words (bias, multiplier, shift)
    outputs      Y [M, N] <- OBUF words: per block of `cols` channels, M words (word m = Y[m, cols])

Word `i` of block `b` is buffer word `b * inner + i` (`word_offset` gives its DRAM word).

The module also holds `AccelProgram`, the codegen's output and the runtime's input (the runtime
imports the ISA definition and this module, never the codegen), and its artifact files:

    program.bin     `isa.to_binary` of every section's instructions, concatenated
    program.s       the same as assembly, each section introduced by `# section i: ...`
    dram.bin        the DRAM image: weights and params in their layouts, zeroed activations
    sections.json   the config, per section its instruction range, the IR ops it implements,
                    its DRAM tensors (values, layout, shape, region: inputs the host writes,
                    resident inputs an earlier section left, constants, outputs), MACs,
                    predicted cycles and whether it joins the call before it; the ops left
                    to the host, each with the reason; the outputs that stay on chip"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import energy
from .config import AccelConfig
from .energy import Activity
from .isa import (Buffer, Instruction, Unit, check_program, from_binary, pack_words, parse_assembly, to_assembly,
                  to_binary, unpack_words, wrap)


class Layout(Enum):
    """A tensor's DRAM layout, named for what it holds; `buffer` is where its words go."""

    ACTIVATIONS = "activations"
    BINARY_ACTIVATIONS = "binary activations"
    WEIGHTS = "weights"
    WEIGHTS_T = "weights, transposed"
    WEIGHT_STREAM = "weight stream"
    PARAMS = "params"
    PARAM_WORDS = "param words"
    OUTPUTS = "outputs"
    ROWS = "rows"
    PBUF_ROWS = "PBUF rows"

    @property
    def buffer(self) -> Buffer:
        return _BUFFER[self]

    @property
    def lane_axis(self) -> int:
        """The tensor axis cut into blocks of lanes (the other one runs along the words)."""
        return 0 if self in (Layout.ACTIVATIONS, Layout.BINARY_ACTIVATIONS, Layout.WEIGHTS, Layout.WEIGHTS_T) else 1


_BUFFER = {Layout.ACTIVATIONS: Buffer.ABUF, Layout.BINARY_ACTIVATIONS: Buffer.ABUF, Layout.WEIGHTS: Buffer.BBUF,
           Layout.WEIGHTS_T: Buffer.BBUF, Layout.WEIGHT_STREAM: Buffer.BBUF, Layout.PARAMS: Buffer.PBUF,
           Layout.PARAM_WORDS: Buffer.PBUF,
           Layout.OUTPUTS: Buffer.OBUF, Layout.ROWS: Buffer.OBUF, Layout.PBUF_ROWS: Buffer.PBUF}
_ROW_LAYOUTS = (Layout.ROWS, Layout.PBUF_ROWS)  # a word run per row


def pack_binary(array: np.ndarray, bits: int) -> np.ndarray:
    """[R, K] of +-1 -> [R, ceil(K / bits)] lanes: bit j of lane i is set where element
    `i * bits + j` is +1 (`bgemm`'s operands); padding bits are set (+1)."""
    rows, k = array.shape
    words = -(-k // bits)
    padded = np.ones((rows, words * bits), np.int64)
    padded[:, :k] = array
    set_bits = (padded.reshape(rows, words, bits) > 0).astype(np.int64) << np.arange(bits)
    return wrap(set_bits.sum(axis=2), bits)


def _matrix(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape the layout cuts (a transposed layout's is the value's transposed)."""
    rows, cols = shape[-2:]
    return (cols, rows) if layout is Layout.WEIGHTS_T else (rows, cols)


def blocks(layout: Layout, shape: tuple[int, ...], config: AccelConfig) -> int:
    """Blocks of lanes one 2-D tensor of the batch is cut into (rows: its rows)."""
    matrix = _matrix(layout, shape)
    if layout in _ROW_LAYOUTS:
        return matrix[0]
    return math.ceil(matrix[layout.lane_axis] / config.lanes(layout.buffer))


def inner(layout: Layout, shape: tuple[int, ...], config: AccelConfig) -> int:
    """Buffer words per block (rows: per row)."""
    matrix = _matrix(layout, shape)
    if layout is Layout.BINARY_ACTIVATIONS:
        return -(-matrix[1] // config.data_bits)
    if layout in _ROW_LAYOUTS:
        return -(-matrix[1] // config.lanes(layout.buffer))
    return matrix[1 - layout.lane_axis]


def batch_words(layout: Layout, shape: tuple[int, ...], config: AccelConfig) -> int:
    """DRAM words of one 2-D tensor of the batch."""
    return blocks(layout, shape, config) * inner(layout, shape, config) * config.beats(layout.buffer)


def word_offset(layout: Layout, shape: tuple[int, ...], block: int, index: int, config: AccelConfig,
                batch: int = 0) -> int:
    """DRAM words from the tensor's start to buffer word `index` of block `block` of 2-D
    tensor `batch`."""
    return batch * batch_words(layout, shape, config) + \
        (block * inner(layout, shape, config) + index) * config.beats(layout.buffer)


def dram_words(layout: Layout, shape: tuple[int, ...], config: AccelConfig) -> int:
    """DRAM words the tensor takes."""
    return math.prod(shape[:-2]) * batch_words(layout, shape, config)


def to_words(layout: Layout, array: np.ndarray, config: AccelConfig) -> np.ndarray:
    """The tensor's buffer words, [batch * blocks * inner, lanes] (int64, padding lanes zero)."""
    array = np.asarray(array, np.int64)
    if array.ndim < 2:
        raise ValueError(f"{layout.value}: expected a tensor of at least 2 dims, got shape {list(array.shape)}")
    if array.ndim > 2:
        return np.concatenate([to_words(layout, a, config) for a in array.reshape(-1, *array.shape[-2:])])
    lanes = config.lanes(layout.buffer)
    if layout is Layout.WEIGHTS_T:
        array = array.T
    if layout is Layout.BINARY_ACTIVATIONS:
        array = pack_binary(array, config.data_bits)
    if layout in _ROW_LAYOUTS:
        words = inner(layout, array.shape, config)
        padded = np.zeros((array.shape[0], words * lanes), np.int64)
        padded[:, :array.shape[1]] = array
        return padded.reshape(-1, lanes)
    cut = array if layout.lane_axis == 0 else array.T  # [lane axis, inner axis]
    n = math.ceil(cut.shape[0] / lanes)
    padded = np.zeros((n * lanes, cut.shape[1]), np.int64)
    padded[:cut.shape[0]] = cut
    return padded.reshape(n, lanes, cut.shape[1]).transpose(0, 2, 1).reshape(n * cut.shape[1], lanes)


def from_words(layout: Layout, words: np.ndarray, shape: tuple[int, ...], config: AccelConfig) -> np.ndarray:
    """The [shape] tensor held by its buffer words (the inverse of `to_words`; binary
    activations come back packed)."""
    words = np.asarray(words)
    if len(shape) > 2:
        per = blocks(layout, shape, config) * inner(layout, shape, config)
        parts = [from_words(layout, words[i * per:(i + 1) * per], shape[-2:], config)
                 for i in range(math.prod(shape[:-2]))]
        return np.stack(parts).reshape(*shape[:-2], *parts[0].shape)
    lanes, n, k = config.lanes(layout.buffer), blocks(layout, shape, config), inner(layout, shape, config)
    if layout in _ROW_LAYOUTS:
        return words.reshape(n, k * lanes)[:, :shape[1]]
    matrix = _matrix(layout, shape)
    cut = words.reshape(n, k, lanes).transpose(0, 2, 1).reshape(n * lanes, k)[:matrix[layout.lane_axis]]
    out = cut if layout.lane_axis == 0 else cut.T
    return out.T if layout is Layout.WEIGHTS_T else out


def encode(layout: Layout, array: np.ndarray, config: AccelConfig) -> bytes:
    """The tensor's DRAM bytes (`dram_words` words); ValueError for values outside the lanes."""
    words = to_words(layout, array, config)
    bits = config.lane_bits(layout.buffer)
    if words.size and (words.min() < -(1 << bits - 1) or words.max() >= 1 << bits - 1):
        raise ValueError(f"{layout.value}: values [{words.min()}, {words.max()}] do not fit {bits}-bit lanes")
    return pack_words(words, bits, config.beats(layout.buffer) * config.dram_bits // 8).tobytes()


def decode(layout: Layout, data: bytes, shape: tuple[int, ...], config: AccelConfig) -> np.ndarray:
    """The [shape] tensor (int64) from its DRAM bytes (the inverse of `encode`)."""
    buffer = layout.buffer
    count = math.prod(shape[:-2]) * blocks(layout, shape, config) * inner(layout, shape, config)
    raw = np.frombuffer(data, np.uint8).reshape(count, config.beats(buffer) * config.dram_bits // 8)
    return from_words(layout, unpack_words(raw, config.lanes(buffer), config.lane_bits(buffer)), shape, config)


@dataclass(frozen=True)
class Region:
    """DRAM words [start, start + words)."""

    start: int
    words: int

    @property
    def end(self) -> int:
        return self.start + self.words

    def byte_slice(self, config: AccelConfig) -> slice:
        """The region's bytes in a DRAM image."""
        size = config.dram_bits // 8
        return slice(self.start * size, self.end * size)


class DramAllocator:
    """Hands out consecutive DRAM regions (addresses in DRAM words, so every region starts a
    DRAM word); ValueError when the DRAM (`config.dram_words`) is full."""

    def __init__(self, config: AccelConfig):
        self.config = config
        self.used = 0  # DRAM words handed out

    def allocate(self, words: int, what: str = "a tensor") -> Region:
        if self.used + words > self.config.dram_words:
            raise ValueError(f"{what} needs {words} DRAM words, {self.config.dram_words - self.used} are left")
        region = Region(self.used, words)
        self.used += words
        return region


# -- the program artifact ------------------------------------------------------------------------

@dataclass(frozen=True)
class DramTensor:
    """A tensor in DRAM: the IR values it holds (params: bias, multiplier, shift, with "" for
    no bias), its layout, its shape in that layout (2-D, or a batch of 2-D) and its region.
    `rows`: where the value's rows (its last dim, over all leading dims in order) lie, when a
    row-wise layer left them in its input's order (a sequence-first value stored batch-first);
    empty: in order."""

    values: tuple[str, ...]
    layout: Layout
    shape: tuple[int, ...]
    region: Region
    rows: tuple[int, ...] = ()

    def stored(self, value: np.ndarray) -> np.ndarray:
        """`value` (its elements in order) as the tensor lies in DRAM, in `shape`."""
        value = np.asarray(value).reshape(-1, self.shape[-1])
        if self.rows:
            out = np.empty_like(value)
            out[list(self.rows)] = value
            value = out
        return value.reshape(self.shape)

    def value(self, stored: np.ndarray) -> np.ndarray:
        """The value's elements in order (rows of the last dim) from the tensor as it lies."""
        stored = np.asarray(stored).reshape(-1, self.shape[-1])
        return stored[list(self.rows)] if self.rows else stored


@dataclass(frozen=True)
class Deferred:
    """A section's program not built yet (`codegen.timing`): its instructions, halt included, and
    how to build it (where the cost model needs it: a call's sections chained)."""

    length: int
    build: Callable[[], tuple[Instruction, ...]]


@dataclass(frozen=True)
class Section:
    """One accelerator run: `program` (ending in halt) implements the IR ops whose results are
    `ops` (a linear, its requantize, maybe a fused relu) for part of their output (`note` says
    which). The host writes `inputs` into DRAM before the run (before its call) and reads
    `outputs` after it (those not `AccelProgram.on_chip`); `resident` inputs are an earlier
    section's outputs, read where that one left them (its layout: tload transposes it);
    `constants` are in the DRAM image. `macs` counts useful multiply-accumulates (no padding),
    `cycles` is the run's length under the ISA's timing (what the ISA simulator counts),
    `activity` what its instructions do, counted (`energy.activity`: the energy model's input).
    `joins`: the section runs in the same call as the one before it. `deferred`: timing's
    sections, without a program, say how to build it."""

    ops: tuple[str, ...]
    inputs: tuple[DramTensor, ...]
    constants: tuple[DramTensor, ...]
    outputs: tuple[DramTensor, ...]
    program: tuple[Instruction, ...]
    macs: int
    cycles: int
    note: str
    resident: tuple[DramTensor, ...] = ()
    joins: bool = False
    activity: Activity = Activity()
    deferred: Deferred | None = field(default=None, compare=False, repr=False)

    def busy(self, config: AccelConfig) -> dict[str, int]:
        """The cycles each unit is busy in the run (the ISA's occupancy of its instructions), by
        unit name: `cycles` over the busiest is the overlap the schedule leaves on the table."""
        out = dict.fromkeys((u.value for u in Unit), 0)
        for instruction in self.program:
            out[instruction.unit.value] += instruction.occupancy(config)
        return out


@dataclass(frozen=True)
class HostOp:
    """An IR op the host runs, and why the accelerator does not. `moved`: a layout op between
    accelerator layers, which the host does as addressing while it moves the tensor from one
    layer's output to the next one's input (a strided copy that is the transfer itself).
    `converted`: an elementwise conversion (quantize, dequantize, cast) of values on their way
    to or from the accelerator, or an op of one value the same loop applies at the model's
    edges (a read-back's pick of rows, mean, tanh; an input's per-channel norm): the host runs
    it in the transfer's copy loop (priced at its arithmetic and memory traffic, with no op
    dispatch of its own)."""

    kind: str
    result: str
    reason: str
    moved: bool = False
    converted: bool = False


FILES = ("program.bin", "program.s", "dram.bin", "sections.json")
_FORMAT, _VERSION = "tcc-accel-sections", 2


@dataclass(frozen=True)
class AccelProgram:
    """What the codegen made of a graph: the config it targets, the accelerator sections in
    execution order, the ops left to the host, the initial DRAM image and the section outputs
    the host never reads (`on_chip`: only later sections read them, in place). `to_files` /
    `from_files` (and `save` / `load` on a directory) give its artifact files (`FILES`)."""

    config: AccelConfig
    sections: tuple[Section, ...]
    host_ops: tuple[HostOp, ...]
    dram: bytes = field(repr=False)
    on_chip: frozenset[str] = frozenset()

    def calls(self) -> tuple[tuple[Section, ...], ...]:
        """The sections grouped into the host's calls, in run order (a section that `joins`
        runs in the call before it). A call writes its sections' inputs into DRAM, runs them and
        reads their outputs back (`transfers`)."""
        groups: list[list[Section]] = []
        for section in self.sections:
            if groups and section.joins:
                groups[-1].append(section)
            else:
                groups.append([section])
        return tuple(tuple(g) for g in groups)

    def transfers(self, call: tuple[Section, ...]) -> tuple[tuple[DramTensor, ...], tuple[DramTensor, ...]]:
        """What `call` moves over the link: the inputs the host writes before it, the outputs
        it reads back after it (each tensor once; outputs only later sections read stay)."""
        inputs = {t.region.start: t for s in call for t in s.inputs}
        outputs = {t.region.start: t for s in call for t in s.outputs if t.values[0] not in self.on_chip}
        return tuple(inputs.values()), tuple(outputs.values())

    def link_bytes(self) -> int:
        """The bytes the calls move between the host and DRAM in one run, both ways."""
        size = self.config.dram_bits // 8
        return sum(t.region.words * size for call in self.calls() for side in self.transfers(call) for t in side)

    def weight_words(self) -> dict[str, int]:
        """The DRAM words of each weight the sections read (in its layout, or as the stream
        the codegen built of it), by its IR name."""
        return {t.values[0]: t.region.words for s in self.sections for t in s.constants
                if t.layout in (Layout.WEIGHTS, Layout.WEIGHT_STREAM)}

    def to_files(self) -> dict[str, bytes]:
        """The artifact files by name."""
        instructions, comments, described = [], {}, []
        for i, section in enumerate(self.sections):
            comments[len(instructions)] = f"section {i}: {section.note}"
            described.append({"ops": list(section.ops), "offset": len(instructions), "length": len(section.program),
                              "macs": section.macs, "cycles": section.cycles, "note": section.note,
                              "joins": section.joins,
                              **{key: [_tensor_json(t) for t in getattr(section, key)] for key in _TENSORS}})
            instructions.extend(section.program)
        meta = {"format": _FORMAT, "version": _VERSION, "config": self.config.to_json(), "dram_bytes": len(self.dram),
                "sections": described, "host_ops": [vars(op) for op in self.host_ops], "on_chip": sorted(self.on_chip)}
        return {"program.bin": to_binary(instructions), "program.s": to_assembly(instructions, comments).encode(),
                "dram.bin": bytes(self.dram), "sections.json": (json.dumps(meta, indent=1) + "\n").encode()}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> "AccelProgram":
        """Parse the artifact files; ValueError naming the file and the problem."""
        for name in FILES:
            if name not in files:
                raise ValueError(f"{name}: missing")
        instructions = from_binary(files["program.bin"], "program.bin")
        try:
            listing = parse_assembly(files["program.s"].decode(), "program.s")
        except UnicodeDecodeError as e:
            raise ValueError(f"program.s: not text ({e})") from None
        if listing != instructions:
            first = next((i for i, (a, b) in enumerate(zip(listing, instructions)) if a != b),
                         min(len(listing), len(instructions)))
            raise ValueError(f"program.s: instruction {first} differs from program.bin")
        try:
            meta = json.loads(files["sections.json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"sections.json: not JSON ({e})") from None
        try:
            return _parse(meta, instructions, bytes(files["dram.bin"]))
        except _Invalid as e:
            raise ValueError(f"sections.json: {e}") from None

    def save(self, directory: str | Path) -> None:
        """Write the artifact files into `directory` (created if missing)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            (path / name).write_bytes(data)

    @classmethod
    def load(cls, directory: str | Path) -> "AccelProgram":
        """Read the artifact files from `directory`; ValueError naming a missing or bad file."""
        path = Path(directory)
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: missing in {path}")
        return cls.from_files({name: (path / name).read_bytes() for name in FILES})


_TENSORS = ("inputs", "resident", "constants", "outputs")  # a section's DRAM tensors in sections.json


def _tensor_json(t: DramTensor) -> dict:
    return {"values": list(t.values), "layout": t.layout.value, "shape": list(t.shape),
            "region": [t.region.start, t.region.words], **({"rows": list(t.rows)} if t.rows else {})}


class _Invalid(Exception):
    """A problem in sections.json, with where it is."""


def _get(obj: Any, key: str | int, kind: type | tuple[type, ...], where: str) -> Any:
    where = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
    if isinstance(obj, dict) and isinstance(key, str):
        if key not in obj:
            raise _Invalid(f"{where}: missing")
        value = obj[key]
    elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
        value = obj[key]
    else:
        raise _Invalid(f"{where}: missing")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _Invalid(f"{where}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    if isinstance(value, int) and value < 0:
        raise _Invalid(f"{where}: must not be negative, got {value}")
    return value


def _ints(obj: Any, key: str, n: int, where: str) -> tuple[int, ...]:
    items = _get(obj, key, list, where)
    if len(items) != n:
        raise _Invalid(f"{where}.{key}: expected {n} integers, got {len(items)}")
    return tuple(_get(items, i, int, f"{where}.{key}") for i in range(n))


def _parse(meta: Any, instructions: tuple[Instruction, ...], dram: bytes) -> AccelProgram:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _Invalid(f"not a tcc accelerator program (format must be '{_FORMAT}')")
    if meta.get("version") != _VERSION:
        raise _Invalid(f"version {meta.get('version')}, this tcc reads {_VERSION}")
    try:
        config = AccelConfig.from_json(_get(meta, "config", dict, ""))
    except (TypeError, ValueError) as e:
        raise _Invalid(f"config: {e}") from None
    word = config.dram_bits // 8
    if _get(meta, "dram_bytes", int, "") != len(dram) or len(dram) % word:
        raise _Invalid(f"dram_bytes is {meta['dram_bytes']}, dram.bin holds {len(dram)} bytes "
                       f"(a multiple of the {word}-byte DRAM word)")
    sections, offset = [], 0
    for i, raw in enumerate(_get(meta, "sections", list, "")):
        where = f"sections[{i}]"
        start, length = _get(raw, "offset", int, where), _get(raw, "length", int, where)
        if start != offset or start + length > len(instructions):
            raise _Invalid(f"{where}: instructions [{start}, {start + length}) do not follow the previous section "
                           f"inside program.bin's {len(instructions)}")
        program = instructions[start:start + length]
        try:
            check_program(program, config)
        except ValueError as e:
            raise _Invalid(f"{where}: {e}") from None
        offset += length
        tensors = {key: tuple(_parse_tensor(t, f"{where}.{key}[{j}]", config, len(dram) // word)
                              for j, t in enumerate(_get(raw, key, list, where)))
                   for key in _TENSORS}
        ops = _get(raw, "ops", list, where)
        joins = _get(raw, "joins", bool, where)
        if joins and not sections:
            raise _Invalid(f"{where}.joins: the first section has no call to join")
        sections.append(Section(tuple(_get(ops, j, str, f"{where}.ops") for j in range(len(ops))), **tensors,
                                program=program, macs=_get(raw, "macs", int, where),
                                cycles=_get(raw, "cycles", int, where), note=_get(raw, "note", str, where),
                                joins=joins, activity=energy.total(program, config)))
    if offset != len(instructions):
        raise _Invalid(f"the sections hold {offset} instructions, program.bin {len(instructions)}")
    host_ops = []
    for i, raw in enumerate(_get(meta, "host_ops", list, "")):
        flags = {key: _get(raw, key, bool, f"host_ops[{i}]") for key in ("moved", "converted")
                 if isinstance(raw, dict) and key in raw}
        host_ops.append(HostOp(*(_get(raw, key, str, f"host_ops[{i}]") for key in ("kind", "result", "reason")),
                               **flags))
    on_chip = _get(meta, "on_chip", list, "")
    return AccelProgram(config, tuple(sections), tuple(host_ops), dram,
                        frozenset(_get(on_chip, i, str, "on_chip") for i in range(len(on_chip))))


def _parse_tensor(raw: Any, where: str, config: AccelConfig, image_words: int) -> DramTensor:
    values = _get(raw, "values", list, where)
    try:
        layout = Layout(_get(raw, "layout", str, where))
    except ValueError:
        raise _Invalid(f"{where}.layout: unknown layout '{raw['layout']}' "
                       f"(known: {', '.join(l.value for l in Layout)})") from None
    dims = _get(raw, "shape", list, where)
    if len(dims) < 2:
        raise _Invalid(f"{where}.shape: expected at least 2 integers, got {len(dims)}")
    shape = _ints(raw, "shape", len(dims), where)
    region = Region(*_ints(raw, "region", 2, where))
    if region.end > image_words:
        raise _Invalid(f"{where}.region: words [{region.start}, {region.end}) outside the {image_words}-word image")
    if region.words != dram_words(layout, shape, config):  # type: ignore[arg-type]
        raise _Invalid(f"{where}.region: {region.words} words, its layout needs "
                       f"{dram_words(layout, shape, config)} for shape {list(shape)}")  # type: ignore[arg-type]
    rows = ()
    if isinstance(raw, dict) and "rows" in raw:
        count = math.prod(shape[:-1])
        rows = _ints(raw, "rows", len(_get(raw, "rows", list, where)), where)
        if sorted(rows) != list(range(count)):
            raise _Invalid(f"{where}.rows: not an order of the tensor's {count} rows")
    return DramTensor(tuple(_get(values, j, str, f"{where}.values") for j in range(len(values))), layout,
                      shape, region, tuple(rows))  # type: ignore[arg-type]
