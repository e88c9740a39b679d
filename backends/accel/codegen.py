"""The accelerator codegen: `generate(graph, config) -> AccelProgram`.

It compiles to accelerator sections every chain ("layer") it can run exactly:

    %y.acc = linear(%x, @w, @b?)                     x: integer of <= data_bits, w: constant in data_bits
    %y.q   = requantize(%y.acc, @mult, @shift)       to data_bits with zero point 0; constant per-channel
    %y.r   = relu(%y.q) | int_gelu(%y.q)             or per-tensor mult/shift; the epilogue is optional

the same after an integer `matmul(%x, %y)` of two values (attention's products; a batch over
the leading dims, the right operand laid out as weights), or a matmul whose raw accumulators
feed `int_softmax` (scores: the vector unit reads them from the accumulators, row by row),
and the residual add of widened i8 values into `requantize -> int_layer_norm` (row by row
on the vector unit). Leading batch dims of a linear's x flatten into M. Every other op runs
on the host; `AccelProgram.host_ops` says why (layout ops are data movement between
sections: the DMA moves contiguous runs only).

The weights choose the unit (`_plan`): HP-structured weights (`~hp(bh, bw, row_nnz)` in their
type) run on the HP sparse unit (spgemm: pruned blocks are neither stored, loaded nor run;
inside a kept block each channel's non-zeros gather their activations by local index);
other block structures (`~blocks`, or HP without the sparse unit) run dense gemms over the
kept K-blocks only; +-1 activations and weights (W1A1) run on the binary unit (bgemm,
`data_bits` values per lane); everything else runs dense gemms.

Tiling (R x C array). The output [M, N] is cut into R x C tiles; K into chunks of at most
half of BBUF (a quarter for HP streams; split-K: accumulating instructions, then one
requant). Row blocks of activations stay resident in ABUF (a group of as many row blocks as
ABUF holds, less one slot to load the next group's into; when one row block does not fit,
its chunks stream); the weight chunks stream through a BBUF ring (double buffering: the next
chunks load while the array computes), the requantization params through a PBUF ring, and
results leave through an OBUF ring, one store per run of row blocks of one column tile. Tile
order: row group, column group (the column tiles whose chunks fill half the ring), row
block, column tile: a weight chunk is loaded once per row group. A layer whose program
exceeds the program memory is split into several sections (each loads what it needs).

Output tiles alternate between the two accumulator banks, so the vector unit requantizes one
tile while the array computes the next, and the array's gemms follow each other without
waiting for the previous one to drain.

Scheduling. The generator writes four streams (load, array, vector, store) in which every
instruction names the instructions of other units it depends on (the load that filled what a
gemm reads, the last reader of a slot a load overwrites, ...). They are interleaved into one
program greedily, the instruction that can issue first going next, under the ISA's timing;
each dependency becomes a token (the latest producer a unit waits for signals it; earlier
ones are covered since units complete in order). The same model gives each section's cycles."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op
from tcc.ir.sparsity import Blocks, Hierarchical, Sparsity

from .config import AccelConfig
from .isa import FETCH_CYCLES, HANDOFF, UNITS, Buffer, Instruction, Opcode, Token, Unit, drain, occupancy, wrap
from .layout import (AccelProgram, DramAllocator, DramTensor, HostOp, Layout, Region, Section, batch_words, dram_words,
                     encode, pack_binary, word_offset)

__all__ = ["generate", "timing", "AccelProgram"]

_DATA = {4: DType.I4, 8: DType.I8, 16: DType.I16}
_MAX_SLOTS = 64  # ring slots per buffer: keeps the tokens in flight below the 8-bit counters (isa.TOKEN_BITS)
_MAX_COUNT = 0xFFFF  # the widest load/store count and gemm k (16-bit fields)


def generate(graph: Graph, config: AccelConfig | None = None) -> AccelProgram:
    """Compile the quantized linear chains of `graph` to accelerator sections for `config`
    (default `AccelConfig()`); every other op is a host op with its reason."""
    return _generate(graph, config or AccelConfig(), timing=False)


def timing(graph: Graph, config: AccelConfig) -> tuple[int, tuple[HostOp, ...]]:
    """What `generate` would give without building it: the cycles of all its sections (the ISA
    timing, equal to the ISA simulator's and the RTL's) and its host ops. Sections whose layer
    has the shape, weight structure and tiling of one seen before take that one's cycles
    (timing does not depend on addresses or values), and no weight is encoded: the cost
    model's fast path."""
    program = _generate(graph, config, timing=True)
    return sum(s.cycles for s in program.sections), program.host_ops


_TIMINGS: dict[tuple, tuple[int, ...]] = {}  # layer signature -> cycles of its sections (`timing`)


@contextlib.contextmanager
def _without_cycle_collection():
    """The builders allocate hundreds of thousands of small objects, none in a reference cycle
    (refcounting frees them): the cyclic collector's passes over every live object of the
    process would cost as much as building."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _generate(graph: Graph, config: AccelConfig, timing: bool) -> AccelProgram:
    with _without_cycle_collection():
        return _generate_sections(graph, config, timing)


def _generate_sections(graph: Graph, config: AccelConfig, timing: bool) -> AccelProgram:
    allocator = DramAllocator(config)
    sections: list[Section] = []
    images: list[tuple[Region, bytes]] = []
    why: dict[str, str] = {}
    placed: set[str] = set()
    users = graph.users()
    for op in graph.ops:
        if op.kind not in _MATCHERS or op.result in placed:
            continue
        layer = _MATCHERS[op.kind](op, graph, users, config)
        if isinstance(layer, str):
            why[op.result] = layer
            continue
        start = allocator.used
        try:
            if isinstance(layer, _Residual):
                layer_sections, constants = _compile_residual(layer, allocator, config)
            else:
                layer_sections, constants = _compile(layer, allocator, config, timing)
        except _Unsupported as e:
            allocator.used = start
            why[op.result] = str(e)
            continue
        sections.extend(layer_sections)
        images.extend(constants)
        placed.update(o.result for o in layer.ops)
    dram = bytearray(0 if timing else allocator.used * (config.dram_bits // 8))
    for region, data in images:
        dram[region.byte_slice(config)] = data
    host = tuple(HostOp(op.kind, op.result, why.get(op.result) or _host_reason(op, why))
                 for op in graph.ops if op.result not in placed)
    return AccelProgram(config, tuple(sections), host, bytes(dram))


class _Unsupported(Exception):
    """Why a matched layer cannot run on this config."""


# -- matching ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """A chain the array runs: `linear` (constant weight) or `matmul` (both operands values,
    `batch` products over their leading dims), then `requantize` (-> relu | int_gelu) or, for
    a matmul, `int_softmax` of the raw accumulators (`softmax`: its constants)."""

    ops: tuple[Op, ...]
    x: str
    out: str
    weight: np.ndarray  # [N, K] int64 (a matmul's: zeros, the operand comes at run time)
    params: np.ndarray  # [3, N]: bias, multiplier, shift
    param_values: tuple[str, str, str]
    relu: bool
    m: int
    structure: Sparsity | None  # the weight's, from its type
    binary: bool  # +-1 activations and weights: bgemm on packed bits
    y: str = ""  # a matmul's right operand [.., K, N]
    batch: int = 1
    gelu: tuple[int, ...] = ()  # int_gelu's constants (isa.CONSTANTS order) when fused
    softmax: tuple[int, ...] = ()  # int_softmax's constants

    @property
    def kind(self) -> str:
        return "softmax" if self.softmax else "matmul" if self.y else "linear"

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def n(self) -> int:
        return self.weight.shape[0]


def _match(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> _Layer | str:
    """The layer starting at linear `op` (`users`: `graph.users()`), or why the array cannot
    run it exactly."""
    types, weights, outputs = graph.types, graph.weights, set(graph.outputs)
    data = _DATA[config.data_bits]
    x, w, b = op.operands[0], op.operands[1], op.operands[2] if len(op.operands) == 3 else None
    x_type = types[x]
    if not x_type.dtype.is_int or x_type.dtype.bits > config.data_bits:
        return f"its input is {x_type.dtype}: the array multiplies integers of at most {config.data_bits} bits"
    if w not in weights or (b is not None and b not in weights):
        return "its weight or bias is not a constant"
    weight = np.asarray(weights[w], np.int64)
    n, k = weight.shape
    low, high = data.value_range
    if weight.size and (weight.min() < low or weight.max() > high):
        return f"its weight values do not fit {data}"
    m = math.prod(x_type.shape[:-1])
    if m * n * k == 0:
        return "it is empty"
    bias = np.zeros(n, np.int64) if b is None else np.asarray(weights[b], np.int64)
    if not (op.type.dtype is DType.I32 and config.acc_bits == 32):  # else both wrap alike in 32 bits
        bound = int((np.abs(weight).sum(axis=1) * -low + np.abs(bias)).max())
        if bound >= 1 << config.acc_bits - 1:
            return f"its {op.type.dtype} accumulator can exceed the array's {config.acc_bits}-bit accumulators"
    req = users[op.result][0] if len(users[op.result]) == 1 and op.result not in outputs else None
    if req is None or req.kind != "requantize":
        return "its accumulator feeds other ops than one requantize (the array writes requantized results only)"
    if req.attr("dtype") is not data or req.attr("zero_point") != 0:
        return f"its requantize is to {req.attr('dtype')} with zero point {req.attr('zero_point')}, " \
               f"the array's to {data} with zero point 0"
    mult_name, shift_name = req.operands[1:]
    if not all(v in weights and types[v].dtype.is_int for v in (mult_name, shift_name)):
        return "its requantize multiplier or shift is not a constant"
    try:
        mult, shift = (np.broadcast_to(np.asarray(weights[v], np.int64), (n,)) for v in (mult_name, shift_name))
    except ValueError:
        return "its requantize multiplier or shift is neither per tensor nor per output channel"
    lane = 1 << config.acc_bits - 1
    if mult.min() < -lane or mult.max() >= lane or shift.min() < 0 or shift.max() > 62:
        return f"its requantize multiplier does not fit {config.acc_bits} bits or its shift [0, 62]"
    ops, out, relu, gelu = _epilogue(req, graph, users, config)
    binary = x_type.dtype is DType.B1 and types[w].dtype is DType.B1
    return _Layer((op,) + ops, x, out, weight, np.stack([bias, mult, shift]), (b or "", mult_name, shift_name), relu,
                  m, types[w].sparsity, binary, gelu=gelu)


_GELU = ("multiplier", "shift", "clip", "one", "out_multiplier", "out_shift")
_SOFTMAX = ("multiplier", "shift", "ln2", "b", "c", "out_bits")


def _epilogue(req: Op, graph: Graph, users, config: AccelConfig) -> tuple[tuple[Op, ...], str, bool, tuple[int, ...]]:
    """The requantize and what fuses after it: a relu, or an int_gelu to `data_bits` whose
    constants fit the PBUF lanes. (ops, output, relu, gelu constants)."""
    outputs, out = set(graph.outputs), req.result
    after = users[out] if out not in outputs else []
    if len(after) == 1 and after[0].kind == "relu":
        return (req, after[0]), after[0].result, True, ()
    if len(after) == 1 and after[0].kind == "int_gelu" and after[0].attr("dtype") is _DATA[config.data_bits] \
            and config.nonlinear_unit:
        constants = tuple(int(after[0].attr(k)) for k in _GELU)
        if _fits_lanes(constants, config):
            return (req, after[0]), after[0].result, False, constants
    return (req,), out, False, ()


def _fits_lanes(values, config: AccelConfig) -> bool:
    return all(-(1 << config.acc_bits - 1) <= v < 1 << config.acc_bits - 1 for v in values)


def _match_matmul(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> _Layer | str:
    """The layer at integer `matmul` `op` of two values (attention's Q K^T and P V): a batch of
    products over the leading dims, then requantize (-> relu | int_gelu) or int_softmax."""
    types, weights, outputs = graph.types, graph.weights, set(graph.outputs)
    data = _DATA[config.data_bits]
    x, y = op.operands
    tx, ty = types[x], types[y]
    if not all(t.dtype.is_int and t.dtype.bits <= config.data_bits for t in (tx, ty)):
        return f"its operands are {tx.dtype} and {ty.dtype}: the array multiplies integers of at most " \
               f"{config.data_bits} bits"
    if x in weights or y in weights:
        return "an operand is a constant (a linear's weight would be)"
    if tx.rank < 2 or tx.shape[:-2] != ty.shape[:-2]:
        return "its operands' leading dims differ (broadcast products run on the host)"
    (m, k), n = tx.shape[-2:], ty.shape[-1]
    if not (op.type.dtype is DType.I32 and config.acc_bits == 32) and \
            k * (1 << 2 * config.data_bits - 2) >= 1 << config.acc_bits - 1:  # else both wrap alike in 32 bits
        return f"its {op.type.dtype} accumulator can exceed the array's {config.acc_bits}-bit accumulators"
    after = users[op.result] if op.result not in outputs else []
    base = dict(x=x, weight=np.zeros((n, k), np.int64), m=m, structure=None, binary=False, y=y,
                batch=math.prod(tx.shape[:-2]))
    if len(after) == 1 and after[0].kind == "int_softmax" and len(after[0].operands) == 1:
        sm = after[0]
        if not config.nonlinear_unit:
            return "its int_softmax needs the vector unit's nonlinear datapaths, which this config leaves out"
        constants = tuple(int(sm.attr(key)) for key in _SOFTMAX)
        if sm.type.dtype is not data or not 1 <= sm.attr("out_bits") < config.data_bits:
            return f"its int_softmax gives {sm.type.dtype} with {sm.attr('out_bits')} bits, the vector unit " \
                   f"{data} with fewer than {config.data_bits}"
        if not _fits_lanes(constants, config):
            return f"its int_softmax constants do not fit {config.acc_bits}-bit lanes"
        return _Layer(ops=(op, sm), out=sm.result, params=np.zeros((3, n), np.int64), param_values=("", "", ""),
                      relu=False, softmax=constants, **base)
    if len(after) != 1 or after[0].kind != "requantize":
        return "its accumulator feeds other ops than one requantize or int_softmax"
    req = after[0]
    if req.attr("dtype") is not data or req.attr("zero_point") != 0:
        return f"its requantize is to {req.attr('dtype')} with zero point {req.attr('zero_point')}, " \
               f"the array's to {data} with zero point 0"
    mult_name, shift_name = req.operands[1:]
    if not all(v in weights and np.asarray(weights[v]).size == 1 for v in (mult_name, shift_name)):
        return "its requantize multiplier or shift is not a constant scalar"
    mult, shift = (int(np.asarray(weights[v]).reshape(())) for v in (mult_name, shift_name))
    if not (_fits_lanes((mult,), config) and 0 <= shift <= 62):
        return f"its requantize multiplier does not fit {config.acc_bits} bits or its shift [0, 62]"
    ops, out, relu, gelu = _epilogue(req, graph, users, config)
    params = np.stack([np.zeros(n, np.int64), np.full(n, mult), np.full(n, shift)])
    return _Layer(ops=(op,) + ops, out=out, params=params, param_values=("", mult_name, shift_name), relu=relu,
                  gelu=gelu, **base)


@dataclass(frozen=True)
class _Residual:
    """`int_layer_norm(requantize(rq_a(a) + rq_b(b)))`, the encoder's residual add and norm,
    on the vector unit row by row (rq: an optional per-tensor requantize of a widened i8)."""

    ops: tuple[Op, ...]  # in graph order
    a: str
    b: str
    out: str
    m: int
    n: int
    constants: np.ndarray  # [7 + 2 + 3J, cols] PBUF words: vresadd's, then vlayernorm's


def _match_residual(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> _Residual | str:
    types, weights, outputs = graph.types, graph.weights, set(graph.outputs)
    producer, data = graph.producer(), _DATA[config.data_bits]
    index = {o.result: i for i, o in enumerate(graph.ops)}

    def only_user(value: str) -> Op | None:
        after = users[value] if value not in outputs else []
        return after[0] if len(after) == 1 else None

    def scalar(name: str) -> int | None:
        value = weights.get(name)
        return int(np.asarray(value).reshape(())) if value is not None and np.asarray(value).size == 1 else None

    def operand(value: str) -> tuple[tuple[Op, ...], str, int, int] | None:
        """(ops, the widened i8, multiplier, shift) of `cast` or `requantize(cast)`."""
        op_ = producer.get(value)
        chain: tuple[Op, ...] = ()
        mult, shift = 1, 0
        if op_ is not None and op_.kind == "requantize" and op_.attr("dtype") is DType.I32 and \
                op_.attr("zero_point") == 0 and only_user(value) is not None:
            mult, shift = scalar(op_.operands[1]), scalar(op_.operands[2])
            if mult is None or shift is None:
                return None
            chain, value = (op_,), op_.operands[0]
            op_ = producer.get(value)
        if op_ is None or op_.kind != "cast" or op_.type.dtype is not DType.I32 or only_user(value) is None:
            return None
        source = op_.operands[0]
        if types[source].dtype is not data:
            return None
        return (op_,) + chain, source, mult, shift

    if op.type.dtype is not DType.I32:
        return "the vector unit adds widened i8 residuals in i32"
    if not config.nonlinear_unit:
        return "the residual add and layer norm need the vector unit's nonlinear datapaths, which this config " \
               "leaves out"
    sides = [operand(v) for v in op.operands]
    norm_q = only_user(op.result)
    norm = only_user(norm_q.result) if norm_q is not None else None
    if None in sides or norm_q is None or norm_q.kind != "requantize" or norm is None or \
            norm.kind != "int_layer_norm":
        return "only the residual add of widened i8 values into requantize -> int_layer_norm runs on the accelerator"
    (ops_a, a, m_a, s_a), (ops_b, b, m_b, s_b) = sides
    m, s = scalar(norm_q.operands[1]), scalar(norm_q.operands[2])
    bits = norm_q.attr("dtype").bits
    x, w, bias = norm.operands
    if m is None or s is None or norm_q.attr("zero_point") != 0 or bits > config.acc_bits or \
            norm.attr("dtype") is not data or w not in weights or bias not in weights:
        return "its requantize or layer norm is not per-tensor constants into the vector unit's lanes"
    n = types[x].shape[-1]
    words = math.ceil(n / config.cols)
    lanes = np.zeros((2, words * config.cols), np.int64)
    lanes[0, :n], lanes[1, :n] = np.asarray(weights[w], np.int64), np.asarray(weights[bias], np.int64)
    low, high = wrap(lanes[1] & ((1 << config.acc_bits) - 1), config.acc_bits), lanes[1] >> config.acc_bits
    scalars = (m_a, s_a, m_b, s_b, m, s, bits, int(norm.attr("eps")), int(norm.attr("shift")))
    if not _fits_lanes(scalars, config) or not _fits_lanes(lanes[0], config) or not _fits_lanes(high, config):
        return f"its constants do not fit {config.acc_bits}-bit lanes"
    ops = tuple(sorted(ops_a + ops_b + (op, norm_q, norm), key=lambda o: index[o.result]))
    if max(index.get(a, -1), index.get(b, -1)) > index[ops[0].result]:
        return "its operands are computed after its first op"
    constants = np.concatenate([np.repeat(np.array(scalars, np.int64)[:, None], config.cols, axis=1),
                                lanes[0].reshape(words, -1), low.reshape(words, -1), high.reshape(words, -1)])
    return _Residual(ops, a, b, norm.result, math.prod(types[x].shape[:-1]), n, constants)


_MATCHERS = {"linear": _match, "matmul": _match_matmul, "add": _match_residual}  # the op kinds a layer starts at


_LAYOUT_OPS = frozenset({"reshape", "transpose", "permute", "select", "slice", "squeeze", "unsqueeze", "expand", "cat"})


def _host_reason(op: Op, why: dict[str, str]) -> str:
    if op.kind == "requantize" and op.operands[0] in why:
        return "it requantizes a product the host runs"
    if op.kind in ("quantize", "dequantize"):
        return "conversions between float and integer run on the host"
    if op.kind in _LAYOUT_OPS and op.type.dtype.is_int:
        return "data movement: the host re-lays the tensor out between accelerator sections (the DMA moves " \
               "contiguous runs only)"
    return f"the accelerator runs integer linear and matmul -> requantize (-> relu | int_gelu) or int_softmax, and " \
           f"residual add -> int_layer_norm; not {op.kind} on {op.type.dtype}"


# -- the weight plan: what the array runs per column tile ----------------------------------------

@dataclass(frozen=True)
class _Step:
    """One array instruction: `op` and its fields; `a` counts activation words from the row's
    first, `b` BBUF words from its chunk's first (acc and bank are the builder's)."""

    op: Opcode
    fields: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _Chunk:
    """Weight words of one column tile loaded into one BBUF slot, and the steps reading them.
    `k_low, k` is the activation range the steps read (what a streamed ABUF chunk holds)."""

    start: int  # first word in the layer's weight stream
    words: int
    k_low: int
    k: int
    steps: tuple[_Step, ...]


@dataclass(frozen=True)
class _Plan:
    """How the array runs one layer: `kind` (dense, blocks: dense gemms over the kept K-blocks
    only, hp: spgemm, binary: bgemm on packed bits), activation words per row (`a_words`,
    `a_align`: ABUF slots start at multiples of it), the chunks of every column tile, the
    weight stream (BBUF words in load order) and the array steps per row block."""

    kind: str
    a_words: int
    a_align: int
    tiles: tuple[tuple[_Chunk, ...], ...]
    stream: np.ndarray | None  # None for dense: the weights stay in their own layout
    steps: int

    @property
    def chunk_words(self) -> int:
        return max(c.words for tile in self.tiles for c in tile)

    @property
    def chunks(self) -> int:
        return max(map(len, self.tiles))


def _plan(layer: _Layer, config: AccelConfig) -> _Plan:
    """The layer's plan: hp (spgemm) for HP weights when the sparse unit can gather their
    blocks, binary (bgemm) for +-1 activations and weights with the binary unit, blocks for
    other block-structured weights, else dense."""
    structure, resident = layer.structure, layer.k <= config.abuf_depth
    if isinstance(structure, Hierarchical) and config.sparse_unit and resident \
            and structure.bw <= min(config.abuf_banks, 1 << config.data_bits - 1):
        return _hp_plan(layer, structure.bw, config)
    if layer.binary and config.binary_unit and -(-layer.k // config.data_bits) <= config.abuf_depth:
        packed = pack_binary(layer.weight, config.data_bits)
        return _dense_plan(packed, config, Opcode.BGEMM, "binary")
    if isinstance(structure, (Blocks, Hierarchical)) and resident:
        return _dense_plan(layer.weight, config, granule=structure.bw)
    return _dense_plan(layer.weight, config)


def _dense_plan(weight: np.ndarray, config: AccelConfig, op: Opcode = Opcode.GEMM, kind: str = "dense",
                granule: int | None = None) -> _Plan:
    """Gemms (or bgemms) over K in chunks of at most half of BBUF (split-K); with `granule`,
    only the K-blocks of that width holding a non-zero weight of the column tile are stored
    and run (kind "blocks"; a tile with none keeps its first block, to clear the accumulators)."""
    n, k = weight.shape
    cols = config.cols
    kmax = min(_MAX_COUNT, max(1, config.bbuf_depth // 2), config.abuf_depth)
    if granule is not None:
        kmax = max(granule, kmax // granule * granule)
    chunks = math.ceil(k / kmax)
    size = math.ceil(k / chunks) if granule is None else kmax
    streamed = granule is not None or kind != "dense"  # a dense plan's weights stay in their own layout
    tiles, stream, start, steps = [], [], 0, 0
    for t in range(math.ceil(n / cols)):
        if streamed:
            block = np.zeros((cols, k), np.int64)
            block[:min(cols, n - t * cols)] = weight[t * cols:(t + 1) * cols]
        if granule is None:
            kept = np.ones(1, bool)
            granule_k = k
        else:
            granule_k = granule
            kept = block.reshape(cols, -1, granule).any(axis=(0, 2)) if k % granule == 0 else \
                np.array([block[:, j:j + granule].any() for j in range(0, k, granule)])
            if not kept.any():
                kept[0] = True
        tile = []
        for low in range(0, k, size):
            high = min(k, low + size)
            runs = _runs(kept, low // granule_k if granule is not None else 0,
                         -(-high // granule_k) if granule is not None else 1)
            if granule is None:
                runs = [(low, high)]
            else:
                runs = [(r0 * granule, min(high, r1 * granule)) for r0, r1 in runs]
            if not runs:
                continue
            chunk_steps, offset = [], 0
            for r0, r1 in runs:
                chunk_steps.append(_Step(op, (("a", r0), ("b", offset), ("k", r1 - r0))))
                if streamed:
                    stream.append(block[:, r0:r1].T)
                offset += r1 - r0
            tile.append(_Chunk(start, offset, low, high - low, tuple(chunk_steps)))
            start += offset
            steps += offset
        tiles.append(tuple(tile))
    return _Plan(kind if granule is None else "blocks", k, 1, tuple(tiles), np.concatenate(stream) if streamed else None,
                 steps)


def _runs(kept: np.ndarray, first: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs [r0, r1) of True in kept[first:end]."""
    runs, r0 = [], None
    for j in range(first, end):
        if kept[j] and r0 is None:
            r0 = j
        if not kept[j] and r0 is not None:
            runs.append((r0, j))
            r0 = None
    if r0 is not None:
        runs.append((r0, end))
    return runs


def _hp_plan(layer: _Layer, bw: int, config: AccelConfig) -> _Plan:
    """Spgemms over the kept K-blocks of each column tile: per step a weight word and a
    local-index word (padding entries: weight 0, index 0), the pruned blocks between two kept
    ones skipped through the index word of the earlier one's last step (a new spgemm only
    where more blocks are pruned in a row than its lane 0 can count); `nnz` per tile is the
    most non-zeros a channel has in one of its blocks."""
    weight, cols, bits = layer.weight, config.cols, config.data_bits
    n, k = weight.shape
    nblocks = -(-k // bw)
    max_skip = (1 << bits) // bw - 1
    tiles, stream, start, steps = [], [], 0, 0
    for t in range(math.ceil(n / cols)):
        block = np.zeros((cols, nblocks * bw), np.int64)
        block[:min(cols, n - t * cols), :k] = weight[t * cols:(t + 1) * cols]
        view = block.reshape(cols, nblocks, bw)
        counts = np.count_nonzero(view, axis=2)  # [cols, blocks]
        kept = np.flatnonzero(counts.any(axis=0))
        if not kept.size:
            kept = np.zeros(1, np.int64)
        nnz = max(1, int(counts.max()))
        # kept blocks per BBUF slot: a quarter of BBUF, so a tile's chunks leave slots to load the
        # next tile's into (a sparse chunk takes about as long to load as to run)
        per_chunk = max(1, (config.bbuf_depth // 4) // (2 * nnz))
        tile = []
        for chunk in np.split(kept, range(per_chunk, kept.size, per_chunk)):
            runs = np.split(chunk, np.flatnonzero(np.diff(chunk) > max_skip + 1) + 1)
            chunk_steps, offset = [], 0
            for run in runs:
                chunk_steps.append(_Step(Opcode.SPGEMM, (("a", int(run[0]) * bw), ("b", offset), ("blocks", run.size),
                                                         ("nnz", nnz), ("bw", bw),
                                                         ("span", int(run[-1] + 1 - run[0]) * bw))))
                skips = np.append(np.diff(run) - 1, 0)
                for j, skip in zip(run, skips):
                    order = np.argsort(view[:, j] == 0, axis=1, kind="stable")[:, :nnz]  # non-zeros first
                    values = np.take_along_axis(view[:, j], order, axis=1)
                    index = np.where(values != 0, order, 0)
                    index[0, -1] += bw * skip  # lane 0 of the last step: the blocks to skip after this one
                    index = (index + (1 << bits - 1)) % (1 << bits) - (1 << bits - 1)  # as a signed lane
                    stream.append(np.stack([values.T, index.T], axis=1).reshape(2 * nnz, cols))
                offset += 2 * nnz * run.size
            tile.append(_Chunk(start, offset, int(chunk[0]) * bw, min(k, (int(chunk[-1]) + 1) * bw) - int(chunk[0]) * bw,
                               tuple(chunk_steps)))
            start += offset
            steps += offset // 2
        tiles.append(tuple(tile))
    return _Plan("hp", k, bw, tuple(tiles), np.concatenate(stream), steps)


# -- tiling --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tiling:
    resident: bool  # a row block's activation words stay in one ABUF slot (else chunks stream)
    a_size: int  # ABUF words per slot: all of a row block's when resident, else a chunk's
    a_slots: int
    b_size: int  # BBUF words per slot (even for spgemm: it reads word pairs)
    b_slots: int
    p_slots: int  # PBUF slots of 3 words
    group: int  # row blocks computed against each weight tile in turn
    batch: int  # row blocks per store (OBUF slot: batch * rows words)
    o_slots: int


def _tiling(layer: _Layer, plan: _Plan, config: AccelConfig) -> _Tiling:
    rows = config.rows
    if config.obuf_depth < rows:
        raise _Unsupported(f"OBUF ({config.obuf_depth} words) holds no requantized tile ({rows} words)")
    resident = plan.a_words <= min(config.abuf_depth, _MAX_COUNT)
    a_size = -(-plan.a_words // plan.a_align) * plan.a_align if resident else \
        max(c.k for tile in plan.tiles for c in tile)
    if a_size > config.abuf_depth:
        raise _Unsupported(f"a row block's {a_size} activation words exceed ABUF ({config.abuf_depth} words)")
    a_slots = min(config.abuf_depth // a_size, _MAX_SLOTS)
    b_size = plan.chunk_words + (plan.chunk_words % 2 if plan.kind == "hp" else 0)
    if b_size > config.bbuf_depth:
        raise _Unsupported(f"a weight chunk of {b_size} words exceeds BBUF ({config.bbuf_depth} words)")
    row_blocks = math.ceil(layer.m / rows)
    # with more row blocks than slots, one slot stays free: the next group starts loading early
    group = (row_blocks if row_blocks <= a_slots else a_slots - (a_slots > 2)) if resident else row_blocks
    batch = min(group, max(1, config.obuf_depth // (2 * rows)))
    free = config.pbuf_depth - len(layer.gelu or layer.softmax)  # constants sit at PBUF's top
    if layer.softmax:  # two slots of a row block's scores in PBUF, two of its probabilities in OBUF
        words = rows * math.ceil(layer.n / config.cols)
        if 2 * words > min(free, config.obuf_depth):
            raise _Unsupported(f"two row blocks of scores ({2 * words} words) do not fit PBUF and OBUF")
    elif free < 3:
        raise _Unsupported(f"PBUF ({config.pbuf_depth} words) holds no requantization group besides the constants")
    return _Tiling(resident, a_size, a_slots, b_size, min(config.bbuf_depth // b_size, _MAX_SLOTS),
                   min(free // 3, _MAX_SLOTS), group, batch, min(config.obuf_depth // (batch * rows), _MAX_SLOTS))


def _tile_order(layer: _Layer, plan: _Plan, tiling: _Tiling, config: AccelConfig) -> list[tuple[int, int, int]]:
    """(batch, row block, column tile) in execution order, per product of the batch: per group
    of row blocks (resident in ABUF), per group of column tiles (whose weight chunks fill at
    most half of the BBUF ring, so the next group's load while this one runs), per row block,
    per column tile. Each weight chunk is loaded once per row group, and the first row block
    starts on a whole column group while the next row blocks' activations load. A softmax
    layer goes row block by row block (each row's scores complete before the next block)."""
    row_blocks, col_tiles = math.ceil(layer.m / config.rows), math.ceil(layer.n / config.cols)
    columns = max(1, tiling.b_slots // 2 // plan.chunks) if not layer.softmax else col_tiles
    return [(b, m, n) for b in range(layer.batch) for first in range(0, row_blocks, tiling.group)
            for low in range(0, col_tiles, columns) for m in range(first, min(first + tiling.group, row_blocks))
            for n in range(low, min(low + columns, col_tiles))]


# -- one layer -----------------------------------------------------------------------------------

def _tensors(layer: _Layer, plan: _Plan, config: AccelConfig) -> dict[str, DramTensor]:
    """The layer's DRAM tensors by role (x, w, params, constants, out), regions unset."""
    lead = (layer.batch,) if layer.kind != "linear" else ()
    x = Layout.BINARY_ACTIVATIONS if plan.kind == "binary" else Layout.ACTIVATIONS
    tensors = {"x": DramTensor((layer.x,), x, lead + (layer.m, layer.k), Region(0, 0))}
    if layer.y:
        tensors["w"] = DramTensor((layer.y,), Layout.WEIGHTS_T, lead + (layer.k, layer.n), Region(0, 0))
    elif plan.kind == "dense":
        tensors["w"] = DramTensor((layer.ops[0].operands[1],), Layout.WEIGHTS, (layer.n, layer.k), Region(0, 0))
    else:
        tensors["w"] = DramTensor((layer.ops[0].operands[1],), Layout.WEIGHT_STREAM, plan.stream.shape, Region(0, 0))
    if not layer.softmax:
        tensors["params"] = DramTensor(layer.param_values, Layout.PARAMS, (3, layer.n), Region(0, 0))
    constants = layer.gelu or layer.softmax
    if constants:
        fused = layer.ops[-1].result
        tensors["constants"] = DramTensor((fused,), Layout.PARAM_WORDS, (len(constants), config.cols), Region(0, 0))
    out = Layout.ROWS if layer.softmax else Layout.OUTPUTS
    tensors["out"] = DramTensor((layer.out,), out, lead + (layer.m, layer.n), Region(0, 0))
    return tensors


def _compile(layer: _Layer, allocator: DramAllocator, config: AccelConfig, timing: bool = False) \
        -> tuple[list[Section], list[tuple[Region, bytes]]]:
    """The layer's sections, and its constants' DRAM contents (`timing`: sections with their
    cycles only, no program, no contents)."""
    plan = _plan(layer, config)
    tiling = _tiling(layer, plan, config)
    tensors = {}
    try:
        for role, t in _tensors(layer, plan, config).items():
            words = dram_words(t.layout, t.shape, config)
            tensors[role] = dataclasses.replace(t, region=allocator.allocate(words, f"{layer.out}'s {t.layout.value}"))
    except ValueError as e:
        raise _Unsupported(f"the DRAM is full: {e}") from None
    signature = (config, layer.kind, layer.m, layer.k, layer.n, layer.batch, layer.relu, layer.gelu, layer.softmax,
                 plan.kind, plan.a_words, plan.a_align, plan.tiles, tiling)
    if timing and signature in _TIMINGS:
        return [Section((), (), (), (), (), 0, cycles, "") for cycles in _TIMINGS[signature]], []
    tiles = _tile_order(layer, plan, tiling, config)
    if len(_TIMINGS) > 4096:
        _TIMINGS.clear()
    if timing:
        _TIMINGS[signature] = _span_cycles(layer, plan, tiling, tensors, config, tiles)
        return [Section((), (), (), (), (), 0, cycles, "") for cycles in _TIMINGS[signature]], []
    spans = []  # (first tile, end tile, the builder of exactly those tiles)
    while not spans or spans[-1][1] < len(tiles):
        start = spans[-1][1] if spans else 0
        spans.append((start, *_span(layer, plan, tiling, tensors, config, tiles, start)))
    inputs = tuple(tensors[r] for r in ("x", "w") if r == "x" or layer.y)
    constants = tuple(tensors[r] for r in ("w", "params", "constants") if r in tensors and not (r == "w" and layer.y))
    sections = []
    for first, end, builder in spans:
        program, cycles = builder.finish()
        batch = f"{layer.batch} x " if layer.kind != "linear" else ""
        note = (f"{' -> '.join(o.result for o in layer.ops)}: {batch}M={layer.m} K={layer.k} N={layer.n}, "
                f"{plan.kind}, output tiles {first}..{end - 1} of {len(tiles)} (by groups of {tiling.group} row "
                f"blocks, groups of columns, row, column), K in {plan.chunks} chunk(s)")
        sections.append(Section(tuple(o.result for o in layer.ops), inputs, constants, (tensors["out"],),
                                program, builder.macs, cycles, note))
    _TIMINGS[signature] = tuple(section.cycles for section in sections)
    images = []
    if not layer.y:
        stream = encode(Layout.WEIGHTS, layer.weight, config) if plan.kind == "dense" else \
            encode(Layout.WEIGHT_STREAM, plan.stream, config)
        images.append((tensors["w"].region, stream))
    if "params" in tensors:
        params = layer.params.copy()
        if plan.kind == "binary":  # the padding bits of the last packed word add +1 each
            params[0] -= plan.a_words * config.data_bits - layer.k
        images.append((tensors["params"].region, encode(Layout.PARAMS, params, config)))
    if "constants" in tensors:
        words = np.repeat(np.asarray(layer.gelu or layer.softmax, np.int64)[:, None], config.cols, axis=1)
        images.append((tensors["constants"].region, encode(Layout.PARAM_WORDS, words, config)))
    return sections, images


def _span(layer: _Layer, plan: _Plan, tiling: _Tiling, tensors: dict[str, DramTensor], config: AccelConfig,
          tiles: list[tuple[int, int, int]], start: int, timing: bool = False) -> tuple[int, "_Builder"]:
    """The section from tile `start`: as many tiles as its program memory holds. Returns the
    end tile and the builder of exactly tiles[start:end]."""
    builder = _Builder(layer, plan, tiling, tensors, config, timing)
    for end in range(start, len(tiles)):
        mark = builder.mark()
        builder.tile(*tiles[end])
        if builder.size() > config.imem_depth:
            if end == start:
                raise _Unsupported(f"one output tile takes {builder.size()} instructions, "
                                   f"the program memory holds {config.imem_depth}")
            builder.rewind(mark)
            return end, builder
    return len(tiles), builder


def _span_key(layer: _Layer, plan: _Plan, config: AccelConfig, tiles: list[tuple[int, int, int]],
              classes: list[int]) -> tuple:
    """What the instructions of a section of `tiles` and their timing depend on, addresses
    aside, tile by tile: its product, row block and column tile numbered by first appearance
    (the keys of the rings and batches), the step from the previous row block, the row
    block's parity and rows, the column tile's chunk structure (`classes`) and whether it is
    the last. A prefix of the tiles has a prefix of the key."""
    names: dict[tuple, int] = {}
    last_n = math.ceil(layer.n / config.cols) - 1
    key, previous = [], None
    for b, m, n in tiles:
        ids = tuple(names.setdefault(k, len(names)) for k in (("b", b), ("m", b, m), ("n", b, n), ("p", n)))
        rows = min(layer.m, (m + 1) * config.rows) - m * config.rows
        key.append((ids, None if previous is None else m - previous, m % 2, rows, classes[n], n == last_n))
        previous = m
    return tuple(key)


def _span_cycles(layer: _Layer, plan: _Plan, tiling: _Tiling, tensors: dict[str, DramTensor], config: AccelConfig,
                 tiles: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """The cycles of each section `_compile` cuts the layer into, scheduling only sections
    unlike those before: one whose tiles have the `_span_key` of a section already scheduled,
    and whose next tile has it too (so it ends where that one did), takes its cycles."""
    structures: dict[tuple, int] = {}
    classes = [structures.setdefault(tuple((c.words, c.k, c.steps) for c in chunks), len(structures))
               for chunks in plan.tiles]
    seen: dict[tuple, tuple[tuple | None, int]] = {}  # a section's key -> (key with its next tile, cycles)
    cycles: list[int] = []
    start = length = 0
    while start < len(tiles):
        if length:
            end = min(start + length, len(tiles))
            key = _span_key(layer, plan, config, tiles[start:end + 1], classes)
            hit = seen.get(key[:end - start])
            if hit is not None and (end == len(tiles) or hit[0] == key):
                cycles.append(hit[1])
                start = end
                continue
        end, builder = _span(layer, plan, tiling, tensors, config, tiles, start, timing=True)
        key = _span_key(layer, plan, config, tiles[start:end + 1], classes)
        seen[key[:end - start]] = (key if end < len(tiles) else None, builder.finish()[1])
        cycles.append(seen[key[:end - start]][1])
        start, length = end, end - start
    return tuple(cycles)


def _compile_residual(layer: _Residual, allocator: DramAllocator, config: AccelConfig) \
        -> tuple[list[Section], list[tuple[Region, bytes]]]:
    """The residual add and layer norm, row by row on the vector unit: chunks of rows of both
    operands load into OBUF, per row vresadd into PBUF and vlayernorm back into OBUF, a store
    per chunk; two slots of everything, so the next chunk loads while this one runs."""
    words = math.ceil(layer.n / config.cols)
    count = len(layer.constants)
    chunk = min(layer.m, (config.obuf_depth // (6 * words)), _MAX_COUNT // words)
    if chunk < 1 or count + 2 * words > config.pbuf_depth:
        raise _Unsupported(f"rows of {layer.n} values do not fit OBUF (6 x {words} words) or PBUF "
                           f"({count} words of constants and 2 x {words})")
    shape = (layer.m, layer.n)
    try:
        tensors = {role: DramTensor((value,), lay, shp, allocator.allocate(dram_words(lay, shp, config),
                                                                           f"{layer.out}'s {role}"))
                   for role, value, lay, shp in (("a", layer.a, Layout.ROWS, shape), ("b", layer.b, Layout.ROWS, shape),
                                                 ("constants", layer.ops[-1].result, Layout.PARAM_WORDS,
                                                  layer.constants.shape), ("out", layer.out, Layout.ROWS, shape))}
    except ValueError as e:
        raise _Unsupported(f"the DRAM is full: {e}") from None
    beats = config.beats(Buffer.OBUF)
    per_section = max(1, (config.imem_depth - 8) // (2 * chunk + 4)) * chunk  # rows whose program fits
    sections = []
    for first in range(0, layer.m, per_section):
        streams: dict[Unit, list[_Node]] = {u: [] for u in Unit}

        def add(node: _Node) -> _Node:
            node.index = len(streams[node.unit])
            streams[node.unit].append(node)
            return node

        base = config.pbuf_depth - count
        const = add(_Node(Opcode.LOAD, [], config, buf=Buffer.PBUF, addr=base, count=count,
                          dram=tensors["constants"].region.start))
        readers: list[_Node | None] = [None, None]  # the last vresadd reading each input slot
        stores: list[_Node | None] = [None, None]
        for i, low in enumerate(range(first, min(layer.m, first + per_section), chunk)):
            rows, slot = min(chunk, layer.m - low), i % 2
            a_at, b_at, out_at = ((2 * k + slot) * chunk * words for k in range(3))
            loads = [add(_Node(Opcode.LOAD, [readers[slot]], config, buf=Buffer.OBUF, addr=at, count=rows * words,
                               dram=tensors[role].region.start + low * words * beats))
                     for role, at in (("a", a_at), ("b", b_at))]
            norm = None
            for r in range(rows):
                deps = loads + [const] if r == 0 else []
                readers[slot] = add(_Node(Opcode.VRESADD, deps, config, dst=(r % 2) * words, a=a_at + r * words,
                                          b=b_at + r * words, n=words, param=base))
                norm = add(_Node(Opcode.VLAYERNORM, [stores[slot]] if r == 0 else [], config, dst=out_at + r * words,
                                 a=(r % 2) * words, n=words, len=layer.n, param=base + 7))
            stores[slot] = add(_Node(Opcode.STORE, [norm], config, buf=Buffer.OBUF, addr=out_at, count=rows * words,
                                     dram=tensors["out"].region.start + low * words * beats))
        program, cycles = _schedule(streams)
        end = min(layer.m, first + per_section)
        note = (f"{' -> '.join(o.result for o in layer.ops)}: rows {first}..{end - 1} of {layer.m}, N={layer.n}, "
                f"residual add and layer norm on the vector unit, {chunk} rows per chunk")
        sections.append(Section(tuple(o.result for o in layer.ops), (tensors["a"], tensors["b"]),
                                (tensors["constants"],), (tensors["out"],), program, 0, cycles, note))
    return sections, [(tensors["constants"].region, encode(Layout.PARAM_WORDS, layer.constants, config))]


class _Node:
    """An instruction being scheduled: its fields, the instructions of other units it waits
    for, its position in its unit's stream, and (once placed) its end cycle and tokens."""

    __slots__ = ("op", "fields", "deps", "unit", "index", "occupancy", "duration", "end", "wait", "signal")

    def __init__(self, op: Opcode, deps: list["_Node | None"], config: AccelConfig, **fields: int):
        self.op, self.fields, self.unit = op, fields, UNITS[op]
        self.deps = [d for d in deps if d is not None]
        self.occupancy = occupancy(op, fields.__getitem__, config)
        self.duration = self.occupancy + drain(op, config)
        self.index, self.end = 0, -1
        self.wait: list[Token] = []
        self.signal: list[Token] = []

    def instruction(self) -> Instruction:
        return Instruction.make(self.op, tuple(self.wait), tuple(self.signal), **self.fields)


class _Ring:
    """Equal slots of one buffer, refilled oldest first. Remembers the item each slot holds
    and the last instruction that read it: the next load into the slot waits for that one."""

    def __init__(self, buffer: Buffer, size: int, slots: int):
        self.buffer, self.size, self.slots = buffer, size, slots
        self.items: dict[tuple, tuple[int, _Node]] = {}  # key -> (slot, the load that filled it)
        self.held: list[tuple | None] = [None] * slots
        self.readers: list[_Node | None] = [None] * slots
        self.next = 0

    def fetch(self, key: tuple, count: int, dram: int, builder: "_Builder") -> tuple[int, _Node]:
        """(address, load) of item `key` (`count` words at DRAM word `dram`), loaded into the
        oldest slot unless a slot holds it."""
        if key not in self.items:
            slot, self.next = self.next, (self.next + 1) % self.slots
            self.items.pop(self.held[slot], None)
            load = builder.add(_Node(Opcode.LOAD, [self.readers[slot]], builder.config, buf=self.buffer,
                                     addr=slot * self.size, count=count, dram=dram))
            self.held[slot], self.items[key] = key, (slot, load)
        slot, load = self.items[key]
        return slot * self.size, load

    def read(self, address: int, node: _Node) -> None:
        self.readers[address // self.size] = node


@dataclass
class _Batch:
    """Row blocks of one column tile requantized into one OBUF slot, stored together."""

    key: tuple[int, int]  # (product of the batch, column tile)
    first: int
    last: int
    slot: int
    requant: _Node


class _Builder:
    """The four instruction streams of one section, built tile by tile (`timing`: for their
    cycles only, with no DRAM addresses and no program)."""

    def __init__(self, layer: _Layer, plan: _Plan, tiling: _Tiling, tensors: dict[str, DramTensor],
                 config: AccelConfig, timing: bool = False):
        self.layer, self.plan, self.tiling, self.tensors, self.config = layer, plan, tiling, tensors, config
        self.timing = timing
        self.streams: dict[Unit, list[_Node]] = {u: [] for u in Unit}
        self.a = _Ring(Buffer.ABUF, tiling.a_size, tiling.a_slots)
        self.w = _Ring(Buffer.BBUF, tiling.b_size, tiling.b_slots)
        self.p = _Ring(Buffer.PBUF, 3, tiling.p_slots)
        self.o_readers: list[_Node | None] = [None] * tiling.o_slots  # the last store of each OBUF slot
        self.o_next = 0
        self.batch: _Batch | None = None
        self.acc_readers: list[_Node | None] = [None, None]  # the last vector reader of each accumulator bank
        self.constants: tuple[int, _Node] | None = None  # (PBUF address, load) of the fused op's constants
        self.scores: list[_Node] = []  # a softmax row block's vaccs
        self.tiles = 0
        self.macs = 0

    def add(self, node: _Node) -> _Node:
        stream = self.streams[node.unit]
        node.index = len(stream)
        stream.append(node)
        return node

    def _dram(self, role: str, block: int, index: int, batch: int = 0) -> int:
        if self.timing:
            return 0
        t = self.tensors[role]
        return t.region.start + word_offset(t.layout, t.shape, block, index, self.config, batch)

    def _constants(self) -> tuple[int, _Node]:
        """The fused op's constants at PBUF's top, loaded once per section."""
        if self.constants is None:
            t, cfg = self.tensors["constants"], self.config
            count = t.shape[0]
            address = cfg.pbuf_depth - count
            self.constants = address, self.add(_Node(Opcode.LOAD, [], cfg, buf=Buffer.PBUF, addr=address, count=count,
                                                     dram=t.region.start))
        return self.constants

    def tile(self, b: int, m: int, n: int) -> None:
        """Output tile (product b of the batch, row block m, column tile n): its array steps,
        then requant (and a fused vgelu) and a (batched) store, or for a softmax the raw
        scores into PBUF (and once the row block is complete, vsoftmax per row and a store)."""
        layer, plan, tiling, cfg = self.layer, self.plan, self.tiling, self.config
        bank = self.tiles % 2
        beats = cfg.beats(Buffer.BBUF)
        w = self.tensors["w"]
        w_base = w.region.start + b * batch_words(w.layout, w.shape, cfg) if layer.y else w.region.start
        first, gemm = True, None
        for c, chunk in enumerate(plan.tiles[n]):
            if tiling.resident:
                a_slot, a_load = self.a.fetch(("A", b, m), plan.a_words, self._dram("x", m, 0, b), self)
                a = a_slot
            else:
                a_slot, a_load = self.a.fetch(("A", b, m, c), chunk.k, self._dram("x", m, chunk.k_low, b), self)
                a = a_slot - chunk.k_low  # the steps count from the row's first word
            w_slot, w_load = self.w.fetch(("W", b, n, c), chunk.words, w_base + chunk.start * beats, self)
            for step in chunk.steps:
                fields = dict(step.fields)
                fields["a"] += a
                fields["b"] += w_slot
                deps = [a_load, w_load, self.acc_readers[bank] if first else None]
                gemm = self.add(_Node(step.op, deps, cfg, **fields, acc=int(not first), bank=bank))
                first = False
                self.a.read(a_slot, gemm)
                self.w.read(w_slot, gemm)
        self.tiles += 1
        rows = min(layer.m, (m + 1) * cfg.rows) - m * cfg.rows
        cols = min(layer.n, (n + 1) * cfg.cols) - n * cfg.cols
        self.macs += rows * (cols * layer.k if plan.kind in ("dense", "binary") else
                             int(np.count_nonzero(layer.weight[n * cfg.cols:(n + 1) * cfg.cols])))
        if layer.softmax:
            self._scores(b, m, n, gemm, bank)
            return
        param, p_load = self.p.fetch(("P", n), 3, self._dram("params", n, 0), self)
        batch = self.batch
        if batch is not None and (batch.key != (b, n) or m != batch.last + 1 or m - batch.first == tiling.batch):
            self._flush()
            batch = None
        slot = batch.slot if batch is not None else self.o_next
        first_row = batch.first if batch is not None else m
        dst = (slot * tiling.batch + m - first_row) * cfg.rows
        last = requant = self.add(_Node(Opcode.REQUANT, [gemm, p_load, self.o_readers[slot]], cfg, dst=dst,
                                        param=param, relu=int(layer.relu), bank=bank))
        if layer.gelu:
            address, load = self._constants()
            last = self.add(_Node(Opcode.VGELU, [load], cfg, dst=dst, a=dst, n=cfg.rows, param=address))
        self.acc_readers[bank] = requant
        self.p.read(param, requant)
        if batch is None:
            self.o_next = (slot + 1) % tiling.o_slots
            self.batch = _Batch((b, n), m, m, slot, last)
        else:
            batch.last, batch.requant = m, last

    def _scores(self, b: int, m: int, n: int, gemm: _Node, bank: int) -> None:
        """A softmax layer's tile: raw scores into the row block's PBUF slot (row r, word n at
        slot + r * J + n); after the last column tile, vsoftmax per row into OBUF and a store."""
        cfg, layer = self.config, self.layer
        words = math.ceil(layer.n / cfg.cols)
        slot = (m % 2) * cfg.rows * words  # PBUF and OBUF slots alike
        vacc = self.add(_Node(Opcode.VACC, [gemm], cfg, dst=slot + n, stride=words, bank=bank))
        self.acc_readers[bank] = vacc
        if n < words - 1:
            return
        address, load = self._constants()
        rows = min(layer.m, (m + 1) * cfg.rows) - m * cfg.rows
        last = None
        for r in range(rows):
            deps = [load, self.o_readers[m % 2]] if r == 0 else []
            last = self.add(_Node(Opcode.VSOFTMAX, deps, cfg, dst=slot + r * words, a=slot + r * words, n=words,
                                  len=layer.n, param=address))
        store = self.add(_Node(Opcode.STORE, [last], cfg, buf=Buffer.OBUF, addr=slot, count=rows * words,
                               dram=self._dram("out", m * cfg.rows, 0, b)))
        self.o_readers[m % 2] = store

    def _flush(self) -> None:
        batch, rows = self.batch, self.config.rows
        assert batch is not None
        count = min(self.layer.m, (batch.last + 1) * rows) - batch.first * rows
        b, n = batch.key
        store = self.add(_Node(Opcode.STORE, [batch.requant], self.config, buf=Buffer.OBUF,
                               addr=batch.slot * self.tiling.batch * rows, count=count,
                               dram=self._dram("out", n, batch.first * rows, b)))
        self.o_readers[batch.slot] = store
        self.batch = None

    def mark(self) -> tuple:
        """What `rewind` needs to take back the tiles added after this point."""
        b = self.batch  # the open batch's fields: tiles change it in place
        return tuple(map(len, self.streams.values())), b and (b.key, b.first, b.last, b.slot, b.requant), self.macs

    def rewind(self, mark: tuple) -> None:
        """Take back the tiles added since `mark`, for `finish`: the streams and the open batch
        as they were (later tiles only append instructions; the rings' state is left, as no
        tile follows)."""
        lengths, batch, self.macs = mark
        self.batch = batch and _Batch(*batch)
        for stream, length in zip(self.streams.values(), lengths):
            del stream[length:]

    def size(self) -> int:
        """Instructions of the section if it ended here (with its last store and halt)."""
        return sum(map(len, self.streams.values())) + (self.batch is not None) + 1

    def finish(self) -> tuple[tuple[Instruction, ...], int]:
        """The section's program (ending in halt; none when timing) and its cycles."""
        if self.batch is not None:
            self._flush()
        return _schedule(self.streams, self.timing)


def _schedule(streams: dict[Unit, list[_Node]], timing: bool = False) -> tuple[tuple[Instruction, ...], int]:
    """Interleave the units' streams into one program, greedily placing next the instruction
    that can issue first (the ISA's timing: in order, one per cycle, once its unit is idle and
    what it waits for has ended), turn each dependency into a token, and append halt. Returns
    the program (`timing`: none, nor tokens) and its cycles (halt's issue + 1)."""
    lanes = [streams[u] for u in (Unit.ARRAY, Unit.VECTOR, Unit.LOAD, Unit.STORE)]  # on a tie the array goes first
    heads, free = [0] * len(lanes), [0] * len(lanes)
    covered: dict[tuple[Unit, Unit], int] = {}  # (producer unit, consumer unit) -> latest producer waited for
    order: list[_Node] = []
    t = FETCH_CYCLES
    last_end = 0
    while True:
        best, best_issue, best_lane = None, 0, 0
        for lane, stream in enumerate(lanes):
            if heads[lane] < len(stream):
                node = stream[heads[lane]]
                issue = max(t, free[lane])
                for d in node.deps:
                    if d.end < 0:
                        break
                    issue = max(issue, d.end)
                else:
                    if best is None or issue < best_issue:
                        best, best_issue, best_lane = node, issue, lane
        if best is None:
            break
        node, issue = best, best_issue
        if not timing:
            latest: dict[Unit, _Node] = {}
            for d in node.deps:
                if d.unit not in latest or d.index > latest[d.unit].index:
                    latest[d.unit] = d
            for unit, d in latest.items():
                if d.index > covered.get((unit, node.unit), -1):
                    covered[(unit, node.unit)] = d.index
                    token = HANDOFF[(unit, node.unit)]
                    d.signal.append(token)
                    node.wait.append(token)
            order.append(node)
        node.end = issue + node.duration
        last_end = max(last_end, node.end)
        free[best_lane] = issue + node.occupancy
        heads[best_lane] += 1
        t = issue + 1
    assert all(head == len(stream) for head, stream in zip(heads, lanes)), "the streams' dependencies form a cycle"
    program = () if timing else tuple(n.instruction() for n in order) + (Instruction(Opcode.HALT),)
    return program, max(t, last_end) + 1
