"""The chains ("layers") the accelerator runs exactly, matched in the graph:

    %y.acc = linear(%x, @w, @b?)                     x: integer of <= data_bits, w: constant in data_bits
    %y.q   = requantize(%y.acc, @mult, @shift)       to data_bits with zero point 0; constant per-channel
    %y.r   = relu(%y.q) | int_gelu(%y.q)             or per-tensor mult/shift; the epilogue is optional

the same after an integer `matmul(%x, %y)` of two values (attention's products; a batch over
the leading dims, the right operand laid out as weights), or a matmul whose raw accumulators
feed `int_softmax` (scores: the vector unit reads them from the accumulators, row by row; a
bool mask over the keys, per query row or for all, broadcast over the batch dims, is read
beside them),
and the residual add of widened i8 values into `requantize -> int_layer_norm` (row by row
on the vector unit), or an `int_layer_norm` alone. Leading batch dims of a linear's x flatten
into M. Every other op runs
on the host; `AccelProgram.host_ops` says why (layout ops are data movement between
sections: the DMA moves contiguous runs, whole tiles transposed and rows apart, not other
re-layouts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op
from tcc.ir.ops import MOVES
from tcc.ir.sparsity import Sparsity

from ..config import AccelConfig
from ..isa import wrap

_DATA = {4: DType.I4, 8: DType.I8, 16: DType.I16}


class Unsupported(Exception):
    """Why a matched layer cannot run on this config."""


@dataclass(frozen=True)
class Layer:
    """A chain the array runs: `linear` (constant weight) or `matmul` (both operands values,
    `batch` products over their leading dims), then `requantize` (-> relu | int_gelu | a
    saturating add of constants, a linear's: `addend`) or, for a matmul, `int_softmax` of the
    raw accumulators (`softmax`: its constants)."""

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
    mask: str = ""  # int_softmax's bool mask: the keys each query row keeps
    mask_shape: tuple[int, ...] = ()  # its shape: [..., 1 or m, n], broadcast over the batch's leading dims
    mask_index: tuple[int, ...] = ()  # per product of the batch, the mask's leading index it reads
    heads: int = 0  # a matmul whose output the head merge joins (`addressing.merge_heads`): `out` is the merged value
    addend: np.ndarray | None = field(default=None, compare=False)  # [m, n] constants vadd adds after requantize
    out_rows: tuple[int, ...] = ()  # merged heads: where the merged value's rows lie (`DramTensor.rows`)

    @property
    def kind(self) -> str:
        return "softmax" if self.softmax else "matmul" if self.y else "linear"

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def n(self) -> int:
        return self.weight.shape[0]


def _match(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> Layer | str:
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
    addend = None
    if not gelu and (found := _addend(ops[-1], graph, users, config)) is not None:
        ops, out, addend = ops + found[0], found[0][-1].result, found[1].reshape(m, n)
    binary = x_type.dtype is DType.B1 and types[w].dtype is DType.B1
    return Layer((op,) + ops, x, out, weight, np.stack([bias, mult, shift]), (b or "", mult_name, shift_name), relu,
                 m, types[w].sparsity, binary, gelu=gelu, addend=addend)


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


def _addend(req: Op, graph: Graph, users, config: AccelConfig) -> tuple[tuple[Op, ...], np.ndarray] | None:
    """`requantize(add(cast(req), c), identity)` to `data_bits` after the requantize (or its
    relu) `req`, c an i32 constant within the data lanes that broadcasts to the output
    (positions after an input projection): the saturating add `vadd` runs after requantize.
    (its ops, c broadcast to the output) or None."""
    types, weights, outputs = graph.types, graph.weights, set(graph.outputs)

    def only(value: str, kind: str) -> Op | None:
        after = users[value] if value not in outputs else []
        return after[0] if len(after) == 1 and after[0].kind == kind else None

    cast = only(req.result, "cast")
    add = cast and cast.type.dtype is DType.I32 and only(cast.result, "add")
    back = add and only(add.result, "requantize")
    if not back or not config.vector_unit or back.attr("dtype") is not _DATA[config.data_bits] or \
            back.attr("zero_point") != 0:
        return None
    c = next((o for o in add.operands if o != cast.result), "")
    scalars = [weights.get(v) for v in back.operands[1:]]
    if c not in weights or types[c].dtype is not DType.I32 or any(v is None or np.asarray(v).size != 1 for v in scalars):
        return None
    mult, shift = (int(np.asarray(v).reshape(())) for v in scalars)
    low, high = _DATA[config.data_bits].value_range
    values = np.asarray(weights[c], np.int64)
    if not 0 <= shift <= 62 or mult != 1 << shift or values.size and (values.min() < low or values.max() > high):
        return None
    try:
        return (cast, add, back), np.broadcast_to(values, types[req.result].shape)
    except ValueError:
        return None


def _fits_lanes(values, config: AccelConfig) -> bool:
    return all(-(1 << config.acc_bits - 1) <= v < 1 << config.acc_bits - 1 for v in values)


def _match_matmul(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> Layer | str:
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
    if len(after) == 1 and after[0].kind == "int_softmax":
        sm = after[0]
        mask = sm.operands[1] if len(sm.operands) == 2 else ""
        if mask:
            tm, lead = types[mask], tx.shape[:-2]
            if tm.dtype is not DType.BOOL or tm.rank < 2 or tm.shape[-1] != n or tm.shape[-2] not in (1, m) or \
                    len(tm.shape) > len(lead) + 2 or any(d not in (1, e) for d, e in zip(tm.shape[-3::-1], lead[::-1])):
                return "its int_softmax's mask is not a bool over the keys, broadcast over queries and batch dims"
        if not config.nonlinear_unit:
            return "its int_softmax needs the vector unit's nonlinear datapaths, which this config leaves out"
        constants = tuple(int(sm.attr(key)) for key in _SOFTMAX)
        if sm.type.dtype is not data or not 1 <= sm.attr("out_bits") < config.data_bits:
            return f"its int_softmax gives {sm.type.dtype} with {sm.attr('out_bits')} bits, the vector unit " \
                   f"{data} with fewer than {config.data_bits}"
        if not _fits_lanes(constants, config):
            return f"its int_softmax constants do not fit {config.acc_bits}-bit lanes"
        index = ()
        if mask:
            heads = types[mask].shape[:-2]
            index = tuple(np.broadcast_to(np.arange(math.prod(heads)).reshape(heads), tx.shape[:-2]).reshape(-1)
                          .tolist())
        return Layer(ops=(op, sm), out=sm.result, params=np.zeros((3, n), np.int64), param_values=("", "", ""),
                     relu=False, softmax=constants, mask=mask, mask_shape=types[mask].shape if mask else (),
                     mask_index=index, **base)
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
    return Layer(ops=(op,) + ops, out=out, params=params, param_values=("", mult_name, shift_name), relu=relu,
                 gelu=gelu, **base)


@dataclass(frozen=True)
class Residual:
    """`int_layer_norm(requantize(rq_a(a) + rq_b(b)))`, the encoder's residual add and norm,
    on the vector unit row by row (rq: an optional per-tensor requantize of a widened i8, or of
    `b` a wider integer: a pre-norm block's residual stream, read from PBUF); or, with no `b`,
    `int_layer_norm(a)` alone (a pre-norm block's, the embeddings'). `stream`: the requantized
    sum where other ops read it too (the pre-norm stream the next residual add reads), kept."""

    ops: tuple[Op, ...]  # in graph order
    a: str
    b: str  # "": the norm alone, of `a`
    out: str
    m: int
    n: int
    constants: np.ndarray  # [(7 +) 2 + 3J, cols] PBUF words: vresadd's (with an add), then vlayernorm's
    wide: bool = False  # b is wider than data_bits: PBUF rows
    stream: str = ""
    b_values: np.ndarray | None = field(default=None, compare=False)  # b a constant: its [m, n] rows


def _norm_constants(norm: Op, graph: Graph, config: AccelConfig) -> np.ndarray | str:
    """vlayernorm's PBUF words for `int_layer_norm` op `norm` (eps and shift, then the weight
    words and the bias's low and high words), or why its constants do not fit the lanes."""
    weights, types = graph.weights, graph.types
    x, w, bias = norm.operands
    if norm.attr("dtype") is not _DATA[config.data_bits] or w not in weights or bias not in weights:
        return "its layer norm is not per-channel constants into the vector unit's lanes"
    n = types[x].shape[-1]
    words = math.ceil(n / config.cols)
    lanes = np.zeros((2, words * config.cols), np.int64)
    lanes[0, :n], lanes[1, :n] = np.asarray(weights[w], np.int64), np.asarray(weights[bias], np.int64)
    low, high = wrap(lanes[1] & ((1 << config.acc_bits) - 1), config.acc_bits), lanes[1] >> config.acc_bits
    scalars = (int(norm.attr("eps")), int(norm.attr("shift")))
    if not _fits_lanes(scalars, config) or not _fits_lanes(lanes[0], config) or not _fits_lanes(high, config):
        return f"its constants do not fit {config.acc_bits}-bit lanes"
    return np.concatenate([np.repeat(np.array(scalars, np.int64)[:, None], config.cols, axis=1),
                           lanes[0].reshape(words, -1), low.reshape(words, -1), high.reshape(words, -1)])


def _match_residual(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> Residual | str:
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
        """(ops, the widened integer, multiplier, shift) of `cast` or `requantize(cast)`, or an
        i32 constant as it is (position embeddings at the sum's step), if it broadcasts to the
        sum's shape."""
        if value in weights:
            t = types[value]
            fits = len(t.shape) <= op.type.rank and all(d in (1, e) for d, e in zip(t.shape[::-1], op.type.shape[::-1]))
            return ((), value, 1, 0) if t.dtype is DType.I32 and fits else None
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
        dtype = types[source].dtype
        if not dtype.is_int or dtype.bits > config.acc_bits or source in weights:
            return None
        return (op_,) + chain, source, mult, shift

    if op.type.dtype is not DType.I32:
        return "the vector unit adds widened integer residuals in i32"
    if not config.nonlinear_unit:
        return "the residual add and layer norm need the vector unit's nonlinear datapaths, which this config " \
               "leaves out"
    sides = [operand(v) for v in op.operands]
    norm_q = only_user(op.result)
    readers = users[norm_q.result] if norm_q is not None else []
    norms = [u for u in readers if u.kind == "int_layer_norm" and u.operands[0] == norm_q.result]
    if None in sides or norm_q is None or norm_q.kind != "requantize" or len(norms) != 1:
        return "only the residual add of widened integers into requantize -> int_layer_norm runs on the accelerator"
    if types[sides[0][1]].dtype is not data:  # the wide one (a pre-norm stream) second: vresadd reads it in PBUF
        sides.reverse()
    if types[sides[0][1]].dtype is not data:
        return f"the vector unit adds one residual stream wider than {data} at a time: both sides are wider"
    (ops_a, a, m_a, s_a), (ops_b, b, m_b, s_b) = sides
    norm = norms[0]
    kept = len(readers) > 1 or norm_q.result in outputs
    m, s = scalar(norm_q.operands[1]), scalar(norm_q.operands[2])
    bits = norm_q.attr("dtype").bits
    if m is None or s is None or norm_q.attr("zero_point") != 0 or bits > config.acc_bits:
        return "its requantize is not per-tensor constants into the vector unit's lanes"
    scalars = (m_a, s_a, m_b, s_b, m, s, bits)
    constants = _norm_constants(norm, graph, config)
    if isinstance(constants, str):
        return constants
    if not _fits_lanes(scalars, config):
        return f"its constants do not fit {config.acc_bits}-bit lanes"
    ops = tuple(sorted(ops_a + ops_b + (op, norm_q, norm), key=lambda o: index[o.result]))
    if max(index.get(a, -1), index.get(b, -1)) > index[ops[0].result]:
        return "its operands are computed after its first op"
    x = norm.operands[0]
    constants = np.concatenate([np.repeat(np.array(scalars, np.int64)[:, None], config.cols, axis=1), constants])
    rows, width = math.prod(types[x].shape[:-1]), types[x].shape[-1]
    return Residual(ops, a, b, norm.result, rows, width, constants, wide=types[b].dtype is not data,
                    stream=norm_q.result if kept else "",
                    b_values=np.broadcast_to(weights[b], op.type.shape).reshape(rows, width) if b in weights else None)


def _match_norm(op: Op, graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> Residual | str:
    """`int_layer_norm` of an integer that fits the PBUF lanes, alone (a residual add before it
    is `_match_residual`'s): rows loaded into PBUF, vlayernorm each."""
    x = op.operands[0]
    t = graph.types[x]
    if not config.nonlinear_unit:
        return "the layer norm needs the vector unit's nonlinear datapaths, which this config leaves out"
    if not t.dtype.is_int or t.dtype.bits > config.acc_bits or x in graph.weights:
        return f"its input is {t.dtype}: the vector unit normalizes integers of at most {config.acc_bits} bits"
    constants = _norm_constants(op, graph, config)
    if isinstance(constants, str):
        return constants
    return Residual((op,), x, "", op.result, math.prod(t.shape[:-1]), t.shape[-1], constants)


MATCHERS = {"linear": _match, "matmul": _match_matmul, "add": _match_residual,  # the op kinds a layer starts at
            "int_layer_norm": _match_norm}


def residual_operands(graph: Graph, users: dict[str, list[Op]], config: AccelConfig) -> frozenset[str]:
    """The values residual adds on the vector unit read (`_match_residual`), and those they are
    reshapes or transposes of: a layer computing one writes it in the rows layout they read."""
    producer = graph.producer()
    found = (_match_residual(op, graph, users, config) for op in graph.ops if op.kind == "add")
    out = set()
    for value in (v for r in found if isinstance(r, Residual) for v in (r.a, "" if r.wide else r.b) if v):
        while value not in out:
            out.add(value)
            op = producer.get(value)
            if op is None or op.kind not in LAYOUT_OPS:
                break
            value = op.operands[0]
    return frozenset(out)


LAYOUT_OPS = MOVES | {"cat", "pad"}


def host_reason(op: Op, why: dict[str, str]) -> str:
    if op.kind == "requantize" and op.operands[0] in why:
        return "it requantizes a product the host runs"
    if op.kind in ("quantize", "dequantize"):
        return "conversions between float and integer run on the host"
    if op.kind in LAYOUT_OPS and op.type.dtype.is_int:
        return "data movement: the host re-lays the tensor out between accelerator sections (the DMA moves " \
               "contiguous runs, whole tiles transposed and rows apart: not this)"
    return f"the accelerator runs integer linear and matmul -> requantize (-> relu | int_gelu) or int_softmax, and " \
           f"(residual add ->) int_layer_norm; not {op.kind} on {op.type.dtype}"
