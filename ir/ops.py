"""The op table: the one closed list of IR ops.

Each `OpDef` declares its operands, its typed attributes and its type rule; the type rule is
also the op's verifier (it raises `OpTypeError` naming the problem). The numpy reference
semantics of every op live in `tcc.ir.reference`, keyed by the same names.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .dtypes import DType, promote
from .quant import PerTensor
from .types import TensorType


CANONICAL_NAN = float("nan")  # one nan object, so attribute tuples holding nan compare equal


class OpTypeError(Exception):
    """Raised by a type rule; the verifier prefixes the op and result it came from."""


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    INTS = "ints"
    DTYPE = "dtype"


@dataclass(frozen=True)
class AttrSpec:
    kind: AttrKind
    default: Any = None
    required: bool = False
    optional: bool = False  # None is an accepted value
    choices: tuple[str, ...] = ()

    def check(self, key: str, value: Any) -> Any:
        """Return `value` in its canonical Python form, or raise ValueError naming `key`."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"attribute '{key}' must not be none")
        kind = self.kind
        if kind is AttrKind.BOOL and isinstance(value, (bool, np.bool_)):
            return bool(value)
        if kind is AttrKind.INT and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if kind is AttrKind.FLOAT and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            return CANONICAL_NAN if math.isnan(value) else float(value)
        if kind is AttrKind.STR and isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ValueError(f"attribute '{key}' is '{value}', expected one of {', '.join(self.choices)}")
            return value
        if kind is AttrKind.INTS and isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
        ):
            return tuple(int(v) for v in value)
        if kind is AttrKind.DTYPE and isinstance(value, DType):
            return value
        raise ValueError(f"attribute '{key}' expects {kind.value}, got {value!r}")


def A(kind: AttrKind, default: Any = None, *, required: bool = False, optional: bool = False, choices=()) -> AttrSpec:
    return AttrSpec(kind, default, required, optional, tuple(choices))


TypeRule = Callable[[list[TensorType], dict[str, Any]], TensorType]


@dataclass(frozen=True)
class OpDef:
    """One op: `operands` names its inputs (`name?` optional and trailing, `*name` variadic)."""

    name: str
    operands: tuple[str, ...]
    attrs: dict[str, AttrSpec]
    rule: TypeRule
    doc: str = ""
    elementwise: bool = field(default=False)

    @property
    def arity(self) -> tuple[int, int | None]:
        """(minimum, maximum) operand count; maximum None when variadic."""
        if any(o.startswith("*") for o in self.operands):
            return (len([o for o in self.operands if not o.startswith("*")]) + 1, None)
        required = len([o for o in self.operands if not o.endswith("?")])
        return (required, len(self.operands))

    def normalize_attrs(self, attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """Check `attrs` against the declaration; fill defaults; return them in declaration order."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ValueError(f"unknown attribute '{sorted(unknown)[0]}' (takes: {', '.join(self.attrs) or 'none'})")
        out = []
        for key, spec in self.attrs.items():
            if key in attrs:
                out.append((key, spec.check(key, attrs[key])))
            elif spec.required:
                raise ValueError(f"missing attribute '{key}'")
            else:
                out.append((key, spec.default))
        return tuple(out)

    def infer(self, types: list[TensorType], attrs: dict[str, Any]) -> TensorType:
        lo, hi = self.arity
        if len(types) < lo or (hi is not None and len(types) > hi):
            expected = f"at least {lo}" if hi is None else (str(lo) if lo == hi else f"{lo} to {hi}")
            raise OpTypeError(f"takes {expected} operands ({', '.join(self.operands)}), got {len(types)}")
        return self.rule(types, attrs)


# ---------------------------------------------------------------------------------------------
# shape and dtype helpers

def _axis(dim: int, rank: int) -> int:
    if not -rank <= dim < max(rank, 1):
        raise OpTypeError(f"dim {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))
    except ValueError:
        raise OpTypeError(f"shapes {' and '.join(map(str, map(list, shapes)))} do not broadcast") from None


def _same_dtype(types: list[TensorType]) -> DType:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise OpTypeError(f"operand dtypes differ ({', '.join(sorted(d.value for d in dtypes))})")
    return types[0].dtype


def _need_float(t: TensorType, what: str = "operand") -> None:
    if not t.dtype.is_float:
        raise OpTypeError(f"{what} must be a float tensor, got {t.dtype}")


def _need_int(t: TensorType, what: str) -> None:
    if not t.dtype.is_int:
        raise OpTypeError(f"{what} must be an integer tensor, got {t.dtype}")


def _need_index(t: TensorType, what: str) -> None:
    if t.dtype not in (DType.I32, DType.I64):
        raise OpTypeError(f"{what} must be i32 or i64, got {t.dtype}")


def _tt(shape, dtype: DType) -> TensorType:
    return TensorType(tuple(int(d) for d in shape), dtype)


# ---------------------------------------------------------------------------------------------
# type rules

def _binary(result_bool: bool = False, float_only: bool = False, no_bool: bool = False):
    def rule(ts, attrs):
        dtype = _same_dtype(ts)
        if float_only:
            _need_float(ts[0])
        if no_bool and dtype is DType.BOOL:
            raise OpTypeError("operands must not be bool")
        return _tt(_broadcast(ts[0].shape, ts[1].shape), DType.BOOL if result_bool else dtype)
    rule.__doc__ = (f"Operands of one {'float ' if float_only else ''}dtype{' (not bool)' if no_bool else ''} whose "
                    f"shapes broadcast; result: the broadcast shape, {'bool' if result_bool else 'their dtype'}.")
    return rule


def _logical(ts, attrs):
    """Bool operands whose shapes broadcast; result: bool of the broadcast shape."""
    for t in ts:
        if t.dtype is not DType.BOOL:
            raise OpTypeError(f"operands must be bool, got {t.dtype}")
    return _tt(_broadcast(*[t.shape for t in ts]), DType.BOOL)


def _unary(float_only: bool):
    def rule(ts, attrs):
        if float_only:
            _need_float(ts[0])
        if ts[0].dtype is DType.BOOL:
            raise OpTypeError("operand must not be bool")
        return _tt(ts[0].shape, ts[0].dtype)
    rule.__doc__ = f"A {'float' if float_only else 'non-bool'} operand; result: its shape and dtype."
    return rule


_INT_OPERANDS = (DType.I4, DType.I8, DType.I16, DType.B1)  # what integer linears and `quantize` produce


def _linear(ts, attrs):
    """Input `[..., in]`, weight `[out, in]` (rank 2), optional bias `[out]`; result `[..., out]`.
    Float: every operand of one float dtype, the result too. Integer: input and weight i4, i8,
    i16 or b1; the result (and the bias) i32, or i64 when an operand is i16."""
    x, w = ts[0], ts[1]
    if x.dtype.is_int:  # integer linear: exact accumulation in i32, or i64 when an operand is i16
        for t, what in ((x, "input"), (w, "weight")):
            if t.dtype not in _INT_OPERANDS:
                raise OpTypeError(f"integer linear takes an i4, i8, i16 or b1 {what}, got {t.dtype}")
        dtype = DType.I64 if DType.I16 in (x.dtype, w.dtype) else DType.I32
        if len(ts) == 3 and ts[2].dtype is not dtype:
            raise OpTypeError(f"bias must be {dtype} (the accumulator of {x.dtype} x {w.dtype}), got {ts[2].dtype}")
    else:
        _need_float(x, "input")
        dtype = _same_dtype(ts)
    if w.rank != 2:
        raise OpTypeError(f"weight must be rank 2, got shape {list(w.shape)}")
    if x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise OpTypeError(f"input features {x.shape[-1:]} do not match weight {list(w.shape)} (out, in)")
    if len(ts) == 3 and ts[2].shape != (w.shape[0],):
        raise OpTypeError(f"bias shape {list(ts[2].shape)} is not [{w.shape[0]}]")
    return _tt(x.shape[:-1] + (w.shape[0],), dtype)


def _matmul(ts, attrs):
    """`torch.matmul` shapes: operands of rank >= 1 (a rank-1 operand gains a dim that the
    result drops), equal contraction dims, batch dims broadcast. Float: one dtype, the result's
    too. Integer (i4, i8, i16 or b1 operands): result i32, or i64 when an operand is i16."""
    a, b = ts
    if a.dtype in _INT_OPERANDS or b.dtype in _INT_OPERANDS:  # activation x activation: exact, like linear
        for t, what in ((a, "lhs"), (b, "rhs")):
            if t.dtype not in _INT_OPERANDS:
                raise OpTypeError(f"integer matmul takes i4, i8, i16 or b1 operands, got {t.dtype} {what}")
        dtype = DType.I64 if DType.I16 in (a.dtype, b.dtype) else DType.I32
    else:
        dtype = _same_dtype(ts)
    if a.rank == 0 or b.rank == 0:
        raise OpTypeError("operands must have rank >= 1")
    a_shape = a.shape if a.rank > 1 else (1,) + a.shape
    b_shape = b.shape if b.rank > 1 else b.shape + (1,)
    if a_shape[-1] != b_shape[-2]:
        raise OpTypeError(f"contraction dims differ: {list(a.shape)} @ {list(b.shape)}")
    batch = _broadcast(a_shape[:-2], b_shape[:-2])
    shape = batch + (a_shape[-2], b_shape[-1])
    if a.rank == 1:
        shape = shape[:-2] + shape[-1:]
    if b.rank == 1:
        shape = shape[:-1]
    return _tt(shape, dtype)


def _softmax(ts, attrs):
    """A float input and `dim` within its rank; result: the input's type."""
    _need_float(ts[0])
    _axis(attrs["dim"], ts[0].rank)
    return ts[0]


def _trailing_norm(ts, attrs):
    """A float input whose trailing dims are `normalized_shape`; optional affine operands
    (weight, then bias) of that shape and the input's dtype; result: the input's shape and dtype."""
    x = ts[0]
    _need_float(x, "input")
    _same_dtype(ts)
    norm = tuple(attrs["normalized_shape"])
    if not norm or x.shape[-len(norm):] != norm:
        raise OpTypeError(f"normalized_shape {list(norm)} is not a suffix of input shape {list(x.shape)}")
    for t, what in zip(ts[1:], ("weight", "bias")):
        if t.shape != norm:
            raise OpTypeError(f"{what} shape {list(t.shape)} is not normalized_shape {list(norm)}")
    return _tt(x.shape, x.dtype)


def _embedding(ts, attrs):
    """Weight `[V, D]` (rank 2) and i32/i64 indices of any shape; result: `indices.shape + [D]`
    in the weight's dtype."""
    w, idx = ts
    if w.rank != 2:
        raise OpTypeError(f"weight must be rank 2, got shape {list(w.shape)}")
    _need_index(idx, "indices")
    return _tt(idx.shape + w.shape[1:], w.dtype)


def _gather(ts, attrs):
    """An i32/i64 index of the input's rank and `dim` within it; result: the index's shape in
    the input's dtype."""
    x, idx = ts
    _need_index(idx, "index")
    _axis(attrs["dim"], x.rank)
    if idx.rank != x.rank:
        raise OpTypeError(f"index rank {idx.rank} differs from input rank {x.rank}")
    return _tt(idx.shape, x.dtype)


def _reshape(ts, attrs):
    """`shape`: non-negative dims holding the input's element count; result: that shape in the
    input's dtype (dense; per-tensor quantization carries over)."""
    shape = attrs["shape"]
    if any(d < 0 for d in shape):
        raise OpTypeError(f"shape {list(shape)} has a negative dim")
    if math.prod(shape) != ts[0].numel:
        raise OpTypeError(f"cannot reshape {list(ts[0].shape)} ({ts[0].numel} elements) to {list(shape)}")
    return ts[0].with_shape(shape)


def _permute(ts, attrs):
    """`dims`: a permutation of the input's axes (negative ones count from the end); result
    dim `i` is input dim `dims[i]`."""
    dims, rank = attrs["dims"], ts[0].rank
    if sorted(d % rank if rank else d for d in dims) != list(range(rank)):
        raise OpTypeError(f"dims {list(dims)} are not a permutation of {rank} axes")
    return ts[0].with_shape(tuple(ts[0].shape[d] for d in dims))


def _transpose(ts, attrs):
    """`dim0` and `dim1` within the input's rank; result: the shape with the two swapped."""
    shape = list(ts[0].shape)
    a, b = _axis(attrs["dim0"], len(shape)), _axis(attrs["dim1"], len(shape))
    shape[a], shape[b] = shape[b], shape[a]
    return ts[0].with_shape(tuple(shape))


def _slice(ts, attrs):
    """`dim` within the rank, `step` >= 1; result: dim's length becomes that of Python's
    `range(size)[start:end:step]` (`end` none: to the end)."""
    x = ts[0]
    dim = _axis(attrs["dim"], x.rank)
    if attrs["step"] < 1:
        raise OpTypeError(f"step {attrs['step']} must be positive")
    length = len(range(*slice(attrs["start"], attrs["end"], attrs["step"]).indices(x.shape[dim])))
    return x.with_shape(x.shape[:dim] + (length,) + x.shape[dim + 1:])


def _select(ts, attrs):
    """`index` in `[-size, size)` of `dim`; result: the shape without `dim`."""
    x = ts[0]
    dim = _axis(attrs["dim"], x.rank)
    if not -x.shape[dim] <= attrs["index"] < x.shape[dim]:
        raise OpTypeError(f"index {attrs['index']} out of range for dim {dim} of size {x.shape[dim]}")
    return x.with_shape(x.shape[:dim] + x.shape[dim + 1:])


def _unsqueeze(ts, attrs):
    """`dim` in `[-(rank + 1), rank]`; result: a dim of size 1 inserted there."""
    x = ts[0]
    dim = _axis(attrs["dim"], x.rank + 1)
    return x.with_shape(x.shape[:dim] + (1,) + x.shape[dim:])


def _squeeze(ts, attrs):
    """`dims` within the rank; result: the shape without those of them whose size is 1."""
    x = ts[0]
    dims = {_axis(d, x.rank) for d in attrs["dims"]}
    return x.with_shape(tuple(s for i, s in enumerate(x.shape) if not (i in dims and s == 1)))


def _expand(ts, attrs):
    """`shape` of at least the input's rank; aligned from the last dim, each input dim equals
    its target or is 1; result: `shape`."""
    x, shape = ts[0], attrs["shape"]
    if len(shape) < x.rank:
        raise OpTypeError(f"cannot expand {list(x.shape)} to fewer dims {list(shape)}")
    for have, want in zip(x.shape[::-1], shape[::-1]):
        if have != want and have != 1:
            raise OpTypeError(f"cannot expand {list(x.shape)} to {list(shape)}")
    return x.with_shape(tuple(shape))


def _cat(ts, attrs):
    """Operands of one dtype and rank whose shapes agree outside `dim`; result: their sizes
    along `dim` summed."""
    dtype = _same_dtype(ts)
    rank = ts[0].rank
    dim = _axis(attrs["dim"], rank)
    for t in ts[1:]:
        if t.rank != rank or t.shape[:dim] + t.shape[dim + 1:] != ts[0].shape[:dim] + ts[0].shape[dim + 1:]:
            raise OpTypeError(f"shapes {list(ts[0].shape)} and {list(t.shape)} differ outside dim {dim}")
    return _tt(ts[0].shape[:dim] + (sum(t.shape[dim] for t in ts),) + ts[0].shape[dim + 1:], dtype)


def _reduce(result_dtype: DType | None = None, float_only: bool = False, numeric: bool = False):
    def rule(ts, attrs):
        x = ts[0]
        if float_only:
            _need_float(x)
        if numeric and x.dtype is DType.BOOL:
            raise OpTypeError("operand must not be bool (cast it first)")
        dims = {_axis(d, x.rank) for d in attrs["dims"]} if attrs["dims"] else set(range(x.rank))
        shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape)) if attrs["keepdim"] else tuple(
            s for i, s in enumerate(x.shape) if i not in dims)
        return _tt(shape, result_dtype or x.dtype)
    rule.__doc__ = (("A float input; " if float_only else "A non-bool input; " if numeric else "") +
                    "`dims` within its rank (none: every dim); result: those dims removed, or kept as 1 with "
                    f"`keepdim`, {result_dtype.value if result_dtype else 'in the input dtype'}.")
    return rule


def _cumsum(ts, attrs):
    """A non-bool input and `dim` within its rank; result: the input's type (the frontend casts
    integers to i64 first, as torch sums them)."""
    if ts[0].dtype is DType.BOOL:
        raise OpTypeError("operand must not be bool (cast it first)")
    _axis(attrs["dim"], ts[0].rank)
    return ts[0]


def _index(ts, attrs):
    """i32/i64 index tensors, at most the input's rank, whose shapes broadcast; result: their
    broadcast shape followed by the input's unindexed dims, in the input's dtype."""
    x, indices = ts[0], ts[1:]
    for t in indices:
        _need_index(t, "index")
    if len(indices) > x.rank:
        raise OpTypeError(f"{len(indices)} index tensors for rank {x.rank}")
    return _tt(_broadcast(*[t.shape for t in indices]) + x.shape[len(indices):], x.dtype)


def _index_copy(ts, attrs):
    """`dim` within the input's rank; a 1-D i32/i64 index; the source shaped like the input but
    for `dim`, whose length is the index's; result: the input's type."""
    x, index, source = ts
    dim = _axis(attrs["dim"], x.rank)
    _need_index(index, "index")
    if index.rank != 1:
        raise OpTypeError(f"index must be 1-D, got rank {index.rank}")
    expected = x.shape[:dim] + index.shape + x.shape[dim + 1:]
    if source.shape != expected or source.dtype is not x.dtype:
        raise OpTypeError(f"source must be {x.dtype}[{','.join(map(str, expected))}], got {source}")
    return _tt(x.shape, x.dtype)


def _where(ts, attrs):
    """A bool condition; lhs and rhs of one dtype; result: the three shapes broadcast, in that dtype."""
    cond, a, b = ts
    if cond.dtype is not DType.BOOL:
        raise OpTypeError(f"condition must be bool, got {cond.dtype}")
    dtype = _same_dtype([a, b])
    return _tt(_broadcast(cond.shape, a.shape, b.shape), dtype)


def _arange(ts, attrs):
    """A non-zero `step`; result: 1-D of `len(range(start, end, step))` elements of `dtype`."""
    length = len(range(attrs["start"], attrs["end"], attrs["step"])) if attrs["step"] else -1
    if length < 0:
        raise OpTypeError("step must be non-zero")
    return _tt((length,), attrs["dtype"])


def _full(ts, attrs):
    """An integer `dtype` needs an integral `value`; result: `shape` in `dtype`."""
    dtype, value = attrs["dtype"], attrs["value"]
    if dtype.is_int and not (math.isfinite(value) and value == int(value)):
        raise OpTypeError(f"value {value!r} is not an integer for dtype {dtype}")
    return _tt(attrs["shape"], dtype)


def _sdpa(ts, attrs):
    """Float query `[..., L, E]`, key `[..., S, E]`, value `[..., S, Ev]` of one dtype and one
    rank >= 2; an optional mask, bool or the query's dtype, broadcasting to `[..., L, S]` (not
    with `is_causal`); `window` (>= 1) only with `is_causal`; result `[..., L, Ev]`, batch dims
    broadcast."""
    q, k, v = ts[:3]
    _need_float(q, "query")
    _same_dtype([q, k, v])
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise OpTypeError(f"query/key/value ranks differ or are < 2: {q.rank}, {k.rank}, {v.rank}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise OpTypeError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit")
    batch = _broadcast(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    window = attrs["window"]
    if window is not None and (not attrs["is_causal"] or window < 1):
        raise OpTypeError(f"window {window} needs is_causal and must be >= 1")
    if len(ts) == 4:
        mask = ts[3]
        if attrs["is_causal"]:
            raise OpTypeError("is_causal and an explicit mask are exclusive")
        if mask.dtype is not DType.BOOL and mask.dtype is not q.dtype:
            raise OpTypeError(f"mask must be bool or {q.dtype}, got {mask.dtype}")
        _broadcast(mask.shape, batch + (q.shape[-2], k.shape[-2]))
    return _tt(batch + (q.shape[-2], v.shape[-1]), q.dtype)


def _conv(spatial: int):
    layout = {1: ("NCL", "OIL"), 2: ("NCHW", "OIHW")}[spatial]

    def rule(ts, attrs):
        x, w = ts[0], ts[1]
        _need_float(x, "input")
        _same_dtype(ts)
        if x.rank != 2 + spatial or w.rank != 2 + spatial:
            raise OpTypeError(f"input and weight must be rank {2 + spatial} ({', '.join(layout)}), got {x.rank} "
                              f"and {w.rank}")
        for key in ("stride", "padding", "dilation"):
            if len(attrs[key]) != spatial or min(attrs[key]) < (0 if key == "padding" else 1):
                raise OpTypeError(f"{key} {list(attrs[key])} is not {spatial} "
                                  f"{'non-negative' if key == 'padding' else 'positive'} int(s)")
        groups = attrs["groups"]
        if groups < 1 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
            raise OpTypeError(f"channels do not fit: input {list(x.shape)}, weight {list(w.shape)}, groups {groups}")
        if len(ts) == 3 and ts[2].shape != (w.shape[0],):
            raise OpTypeError(f"bias shape {list(ts[2].shape)} is not [{w.shape[0]}]")
        sizes = []
        for i in range(spatial):
            stride, pad, dil = attrs["stride"][i], attrs["padding"][i], attrs["dilation"][i]
            size = (x.shape[2 + i] + 2 * pad - dil * (w.shape[2 + i] - 1) - 1) // stride + 1
            if size < 1:
                raise OpTypeError(f"kernel {list(w.shape[2:])} does not fit input {list(x.shape[2:])}")
            sizes.append(size)
        return _tt((x.shape[0], w.shape[0], *sizes), x.dtype)
    rule.__doc__ = (f"Float {layout[0]} input and {layout[1]} weight of one dtype, input channels = weight's I x "
                    "`groups`, O divisible by `groups`, optional bias `[O]`; result "
                    f"`[N, O, {'L' if spatial == 1 else 'H, W'}']` with each spatial size `(size + 2 padding - "
                    "dilation (kernel - 1) - 1) // stride + 1`, at least 1.")
    return rule


def _channel_norm(ts, attrs):
    """A float input `[N, C, ...]` of rank >= 2; the other operands `[C]` of its dtype (batch_norm:
    running mean and variance, then optional weight and bias; group_norm: optional weight and
    bias, C divisible by `num_groups`); result: the input's type."""
    x = ts[0]
    _need_float(x, "input")
    _same_dtype(ts)
    if x.rank < 2:
        raise OpTypeError(f"input must be [N, C, ...], got shape {list(x.shape)}")
    if "num_groups" in attrs and (attrs["num_groups"] < 1 or x.shape[1] % attrs["num_groups"]):
        raise OpTypeError(f"{x.shape[1]} channels are not divisible into {attrs['num_groups']} groups")
    for t in ts[1:]:
        if t.shape != (x.shape[1],):
            raise OpTypeError(f"per-channel operand shape {list(t.shape)} is not [{x.shape[1]}]")
    return x


def _pad(ts, attrs):
    """`pads`: (before, after) pairs from the last dim backwards (`F.pad` order), at most two per
    dim of the input, non-negative; result: each padded dim grown by its pair, the input's dtype."""
    x, pads = ts[0], attrs["pads"]
    if len(pads) % 2 or len(pads) > 2 * x.rank or min(pads, default=0) < 0:
        raise OpTypeError(f"pads {list(pads)} are not non-negative (before, after) pairs for rank {x.rank}")
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        shape[-1 - i] += pads[2 * i] + pads[2 * i + 1]
    return _tt(shape, x.dtype)


def _argmax(ts, attrs):
    """A non-bool input and `dim` within its rank; result: i64 indices with that dim removed (kept
    as 1 with `keepdim`)."""
    x = ts[0]
    if x.dtype is DType.BOOL:
        raise OpTypeError("operand must not be bool (cast it first)")
    dim = _axis(attrs["dim"], x.rank)
    shape = x.shape[:dim] + ((1,) if attrs["keepdim"] else ()) + x.shape[dim + 1:]
    return _tt(shape, DType.I64)


def _quantized(shape, attrs, dtypes: tuple[DType, ...]) -> TensorType:
    """The result type of `quantize` and `requantize`: `dtype` with per-tensor (scale, zero_point)."""
    dtype, scale, zp = attrs["dtype"], attrs["scale"], attrs["zero_point"]
    if dtype not in dtypes:
        raise OpTypeError(f"dtype must be one of {', '.join(d.value for d in dtypes)}, got {dtype}")
    if not (math.isfinite(scale) and scale > 0):
        raise OpTypeError(f"scale must be positive and finite, got {scale!r}")
    lo, hi = (0, 0) if dtype is DType.B1 else dtype.value_range
    if not lo <= zp <= hi:
        raise OpTypeError(f"zero_point {zp} is outside [{lo}, {hi}] of {dtype}")
    return TensorType(tuple(shape), dtype, quant=PerTensor(scale, zp))


def _per_channel(t: TensorType, x: TensorType, what: str) -> None:
    """`t` is a scalar or a vector along the last dim of `x` (per-tensor or per-channel)."""
    if t.rank > 1 or (t.rank == 1 and (x.rank == 0 or t.shape[0] != x.shape[-1])):
        raise OpTypeError(f"{what} shape {list(t.shape)} is neither [] nor [{x.shape[-1] if x.rank else 1}] "
                          f"(the input's last dim)")


def _quantize(ts, attrs):
    """A float input; result: the input's shape in `dtype` (i4, i8, i16 or b1) with per-tensor
    quantization `!q(scale, zero_point)`; `scale` positive and finite, `zero_point` within the
    dtype's range (0 for b1)."""
    _need_float(ts[0], "input")
    return _quantized(ts[0].shape, attrs, _INT_OPERANDS)


def _dequantize(ts, attrs):
    """An integer input; a float scale `[]` or `[C]` (C: the input's last dim); result: the
    input's shape in the scale's dtype."""
    x, scale = ts
    _need_int(x, "input")
    _need_float(scale, "scale")
    _per_channel(scale, x, "scale")
    return _tt(x.shape, scale.dtype)


def _requantize(ts, attrs):
    """An i32/i64 accumulator; i32 multiplier and shift, each `[]` or `[C]` (the last dim);
    result: the input's shape in `dtype` (i4, i8, i16 or i32) with `!q(scale, zero_point)`."""
    x, multiplier, shift = ts
    if x.dtype not in (DType.I32, DType.I64):
        raise OpTypeError(f"input must be an i32 or i64 accumulator, got {x.dtype}")
    for t, what in ((multiplier, "multiplier"), (shift, "shift")):
        if t.dtype is not DType.I32:
            raise OpTypeError(f"{what} must be i32, got {t.dtype}")
        _per_channel(t, x, what)
    return _quantized(x.shape, attrs, (DType.I4, DType.I8, DType.I16, DType.I32))


def _cast(ts, attrs):
    """Any input; result: its shape in `dtype`."""
    return _tt(ts[0].shape, attrs["dtype"])


def _in_range(attrs, key: str, lo: int, hi: int) -> int:
    value = attrs[key]
    if not lo <= value <= hi:
        raise OpTypeError(f"attribute '{key}' is {value}, expected [{lo}, {hi}]")
    return value


def _int_input(x: TensorType, dtypes: tuple[DType, ...]) -> None:
    if x.dtype not in dtypes:
        raise OpTypeError(f"input must be {', '.join(d.value for d in dtypes)}, got {x.dtype}")
    if x.rank == 0 or x.shape[-1] == 0:
        raise OpTypeError(f"input needs a non-empty last dim, got shape {list(x.shape)}")


_NARROW = (DType.I4, DType.I8, DType.I16)  # inputs whose products with 31-bit constants fit int64 easily


def _int_softmax(ts, attrs):
    """An i4/i8/i16/i32 input with a non-empty last dim; an optional bool mask broadcasting to
    it; `multiplier` < 2^31, `shift` <= 62, 1 <= `ln2` <= `b` <= 2^30, `b^2 + c` < 2^31,
    `out_bits` in [1, 15]; result: the input's shape, i8 (`out_bits` <= 7) or i16, with
    `!q(2^-out_bits)`."""
    x = ts[0]
    _int_input(x, _NARROW + (DType.I32,))
    if len(ts) == 2:
        if ts[1].dtype is not DType.BOOL:
            raise OpTypeError(f"mask must be bool, got {ts[1].dtype}")
        try:
            fits = _broadcast(ts[1].shape, x.shape) == x.shape
        except OpTypeError:
            fits = False
        if not fits:
            raise OpTypeError(f"mask shape {list(ts[1].shape)} does not broadcast to input {list(x.shape)}")
    _in_range(attrs, "multiplier", 0, (1 << 31) - 1)
    _in_range(attrs, "shift", 0, 62)
    ln2 = _in_range(attrs, "ln2", 1, 1 << 30)
    b = _in_range(attrs, "b", ln2, 1 << 30)
    if not 0 <= attrs["c"] < (1 << 31) - b * b:
        raise OpTypeError(f"attribute 'c' is {attrs['c']}: the polynomial b^2 + c must stay below 2^31")
    bits = _in_range(attrs, "out_bits", 1, 15)
    return TensorType(x.shape, DType.I8 if bits <= 7 else DType.I16, quant=PerTensor(2.0 ** -bits))


def _int_gelu(ts, attrs):
    """An i4/i8/i16 input with a non-empty last dim; `multiplier`, `out_multiplier` < 2^31,
    `shift`, `out_shift` <= 62, `clip` <= 2^30, `one` <= 2^40, and `|x| (2 one + clip^2)
    out_multiplier` <= 2^62 for every input value; result: the input's shape in `dtype` (i4,
    i8 or i16) with `!q(scale)`."""
    x = ts[0]
    _int_input(x, _NARROW)
    for key in ("multiplier", "out_multiplier"):
        _in_range(attrs, key, 0, (1 << 31) - 1)
    for key in ("shift", "out_shift"):
        _in_range(attrs, key, 0, 62)
    clip = _in_range(attrs, "clip", 0, 1 << 30)
    one = _in_range(attrs, "one", 0, 1 << 40)
    if (1 << (x.dtype.bits - 1)) * (2 * one + clip * clip) * attrs["out_multiplier"] > 1 << 62:
        raise OpTypeError(f"|input| * (2 one + clip^2) * out_multiplier may exceed 2^62 for {x.dtype} input")
    return _quantized(x.shape, {**attrs, "zero_point": 0}, _NARROW)


def _int_layer_norm(ts, attrs):
    """An i4/i8/i16 input `[..., N]`; weight i32 `[N]`, bias i64 `[N]`; `shift` <= 62 and
    `N 2^(2 bits) + eps` < 2^62; result: the input's shape in `dtype` (i4, i8 or i16) with
    `!q(scale)`."""
    x, w, b = ts
    _int_input(x, _NARROW)
    n = x.shape[-1]
    for t, what, dtype in ((w, "weight", DType.I32), (b, "bias", DType.I64)):
        if t.dtype is not dtype or t.shape != (n,):
            raise OpTypeError(f"{what} must be {dtype}[{n}] (per channel of the last dim), got {t}")
    _in_range(attrs, "shift", 0, 62)
    if not 0 <= attrs["eps"] or n * (1 << 2 * x.dtype.bits) + attrs["eps"] >= 1 << 62:
        raise OpTypeError(f"attribute 'eps' is {attrs['eps']}: the sum of squares plus eps must stay in [0, 2^62)")
    return _quantized(x.shape, {**attrs, "zero_point": 0}, _NARROW)


# ---------------------------------------------------------------------------------------------
# the table

I, F, B, S, INTS, DT = (AttrKind.INT, AttrKind.FLOAT, AttrKind.BOOL, AttrKind.STR, AttrKind.INTS, AttrKind.DTYPE)
_REDUCE_ATTRS = {"dims": A(INTS, ()), "keepdim": A(B, False)}

_DEFS = [
    OpDef("linear", ("input", "weight", "bias?"), {}, _linear,
          "y = x @ weight.T + bias; on integers (i4/i8/i16/b1) exact, accumulated in i32 (i64 with an i16 operand)"),
    OpDef("matmul", ("lhs", "rhs"), {}, _matmul, "batched matrix product with broadcasting"),
    OpDef("add", ("lhs", "rhs"), {}, _binary(), "lhs + rhs", elementwise=True),
    OpDef("sub", ("lhs", "rhs"), {}, _binary(no_bool=True), "lhs - rhs", elementwise=True),
    OpDef("mul", ("lhs", "rhs"), {}, _binary(), "lhs * rhs", elementwise=True),
    OpDef("div", ("lhs", "rhs"), {}, _binary(float_only=True), "true division", elementwise=True),
    OpDef("pow", ("lhs", "rhs"), {}, _binary(float_only=True), "lhs ** rhs", elementwise=True),
    OpDef("maximum", ("lhs", "rhs"), {}, _binary(), "the larger of lhs and rhs", elementwise=True),
    OpDef("minimum", ("lhs", "rhs"), {}, _binary(), "the smaller of lhs and rhs", elementwise=True),
    OpDef("eq", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs == rhs", elementwise=True),
    OpDef("ne", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs != rhs", elementwise=True),
    OpDef("lt", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs < rhs", elementwise=True),
    OpDef("le", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs <= rhs", elementwise=True),
    OpDef("gt", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs > rhs", elementwise=True),
    OpDef("ge", ("lhs", "rhs"), {}, _binary(result_bool=True), "lhs >= rhs", elementwise=True),
    OpDef("logical_and", ("lhs", "rhs"), {}, _logical, "lhs and rhs", elementwise=True),
    OpDef("logical_or", ("lhs", "rhs"), {}, _logical, "lhs or rhs", elementwise=True),
    OpDef("logical_not", ("input",), {}, _logical, "not x", elementwise=True),
    OpDef("neg", ("input",), {}, _unary(False), "-x", elementwise=True),
    OpDef("relu", ("input",), {}, _unary(False), "max(x, 0)", elementwise=True),
    OpDef("tanh", ("input",), {}, _unary(True), "tanh(x)", elementwise=True),
    OpDef("sigmoid", ("input",), {}, _unary(True), "1 / (1 + exp(-x))", elementwise=True),
    OpDef("exp", ("input",), {}, _unary(True), "e^x", elementwise=True),
    OpDef("sqrt", ("input",), {}, _unary(True), "square root", elementwise=True),
    OpDef("rsqrt", ("input",), {}, _unary(True), "1 / sqrt(x)", elementwise=True),
    OpDef("erf", ("input",), {}, _unary(True), "the error function", elementwise=True),
    OpDef("abs", ("input",), {}, _unary(False), "|x|", elementwise=True),
    OpDef("sign", ("input",), {}, _unary(False), "-1, 0 or 1 as x is negative, zero or positive", elementwise=True),
    OpDef("floor", ("input",), {}, _unary(True), "the largest integer <= x", elementwise=True),
    OpDef("ceil", ("input",), {}, _unary(True), "the smallest integer >= x", elementwise=True),
    OpDef("log", ("input",), {}, _unary(True), "the natural logarithm", elementwise=True),
    OpDef("cos", ("input",), {}, _unary(True), "cosine", elementwise=True),
    OpDef("sin", ("input",), {}, _unary(True), "sine", elementwise=True),
    OpDef("silu", ("input",), {}, _unary(True), "x * sigmoid(x) (SiLU, swish)", elementwise=True),
    OpDef("gelu", ("input",), {"approximate": A(S, "none", choices=("none", "tanh"))}, _unary(True),
          "GELU, exact (erf) or tanh approximation", elementwise=True),
    OpDef("softmax", ("input",), {"dim": A(I, required=True)}, _softmax, "exp(x) / sum(exp(x)) along dim"),
    OpDef("layer_norm", ("input", "weight?", "bias?"),
          {"normalized_shape": A(INTS, required=True), "eps": A(F, 1e-5)}, _trailing_norm,
          "(x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_shape dims (biased variance)"),
    OpDef("rms_norm", ("input", "weight?"), {"normalized_shape": A(INTS, required=True), "eps": A(F, 1e-6)},
          _trailing_norm, "x / sqrt(mean(x^2) + eps) * weight over the trailing normalized_shape dims"),
    OpDef("embedding", ("weight", "indices"), {}, _embedding, "rows of weight picked by indices"),
    OpDef("gather", ("input", "index"), {"dim": A(I, required=True)}, _gather, "torch.gather"),
    OpDef("reshape", ("input",), {"shape": A(INTS, required=True)}, _reshape,
          "the elements in row-major order, in a new shape"),
    OpDef("permute", ("input",), {"dims": A(INTS, required=True)}, _permute, "axes reordered (torch.permute)"),
    OpDef("transpose", ("input",), {"dim0": A(I, required=True), "dim1": A(I, required=True)}, _transpose,
          "two axes swapped"),
    OpDef("slice", ("input",), {"dim": A(I, required=True), "start": A(I, 0), "end": A(I, None, optional=True),
                                "step": A(I, 1)}, _slice, "python slice start:end:step along dim"),
    OpDef("select", ("input",), {"dim": A(I, required=True), "index": A(I, required=True)}, _select,
          "one index along dim, which disappears (x.select(dim, index))"),
    OpDef("unsqueeze", ("input",), {"dim": A(I, required=True)}, _unsqueeze, "a dim of size 1 inserted at dim"),
    OpDef("squeeze", ("input",), {"dims": A(INTS, required=True)}, _squeeze, "those of dims whose size is 1 removed"),
    OpDef("expand", ("input",), {"shape": A(INTS, required=True)}, _expand, "broadcast to shape (torch.expand)"),
    OpDef("cat", ("*inputs",), {"dim": A(I, required=True)}, _cat, "the operands joined along dim"),
    OpDef("mean", ("input",), dict(_REDUCE_ATTRS), _reduce(float_only=True), "mean over dims (all if empty)"),
    OpDef("sum", ("input",), dict(_REDUCE_ATTRS), _reduce(numeric=True), "sum over dims (all if empty)"),
    OpDef("any", ("input",), dict(_REDUCE_ATTRS), _reduce(DType.BOOL), "logical or over dims (all if empty)"),
    OpDef("cumsum", ("input",), {"dim": A(I, required=True)}, _cumsum, "running sum along dim (torch.cumsum)"),
    OpDef("index", ("input", "*indices"), {}, _index,
          "advanced indexing x[i0, i1, ...] on the leading dims with broadcast integer indices"),
    OpDef("index_copy", ("input", "index", "source"), {"dim": A(I, required=True)}, _index_copy,
          "the input with its slices at positions index along dim replaced by source's, in order "
          "(torch.index_copy; a static cache's write of new positions)"),
    OpDef("where", ("condition", "lhs", "rhs"), {}, _where, "lhs where condition holds, else rhs", elementwise=True),
    OpDef("arange", (), {"start": A(I, 0), "end": A(I, required=True), "step": A(I, 1), "dtype": A(DT, DType.I64)},
          _arange, "start, start + step, ... up to but excluding end"),
    OpDef("full", (), {"shape": A(INTS, required=True), "value": A(F, required=True),
                       "dtype": A(DT, DType.F32)}, _full, "a tensor filled with one value (scalars: shape [])"),
    OpDef("scaled_dot_product_attention", ("query", "key", "value", "mask?"),
          {"is_causal": A(B, False), "scale": A(F, None, optional=True), "window": A(I, None, optional=True)}, _sdpa,
          "softmax(q @ k^T * scale + mask) @ v; a bool mask keeps True positions; is_causal: query i sees keys "
          "j <= i (and i - j < window: a sliding window)"),
    OpDef("conv1d", ("input", "weight", "bias?"),
          {"stride": A(INTS, (1,)), "padding": A(INTS, (0,)), "dilation": A(INTS, (1,)), "groups": A(I, 1)},
          _conv(1), "NCL convolution (groups = channels: depthwise)"),
    OpDef("conv2d", ("input", "weight", "bias?"),
          {"stride": A(INTS, (1, 1)), "padding": A(INTS, (0, 0)), "dilation": A(INTS, (1, 1)), "groups": A(I, 1)},
          _conv(2), "NCHW convolution"),
    OpDef("batch_norm", ("input", "mean", "var", "weight?", "bias?"), {"eps": A(F, 1e-5)}, _channel_norm,
          "(x - mean) / sqrt(var + eps) * weight + bias per channel (dim 1), with running statistics"),
    OpDef("group_norm", ("input", "weight?", "bias?"), {"num_groups": A(I, required=True), "eps": A(F, 1e-5)},
          _channel_norm, "layer norm over each group of channels (dim 1) and all later dims, then a per-channel "
          "weight and bias"),
    OpDef("pad", ("input",), {"pads": A(INTS, required=True), "value": A(F, 0.0)}, _pad,
          "constant padding (F.pad, mode 'constant')"),
    OpDef("argmax", ("input",), {"dim": A(I, required=True), "keepdim": A(B, False)}, _argmax,
          "index of the first largest element along dim"),
    OpDef("cast", ("input",), {"dtype": A(DT, required=True)}, _cast,
          "the elements converted to dtype (float to integer truncates toward zero; to bool: non-zero)"),
    OpDef("quantize", ("input",), {"dtype": A(DT, required=True), "scale": A(F, required=True),
                                   "zero_point": A(I, 0)}, _quantize,
          "clip(rint(x / scale) + zero_point) to dtype (round half to even); b1: +1 where x >= 0 else -1"),
    OpDef("dequantize", ("input", "scale"), {"zero_point": A(I, 0)}, _dequantize,
          "(q - zero_point) * scale; scale [] or per channel [C] on the last dim; result in scale's dtype"),
    OpDef("requantize", ("input", "multiplier", "shift"), {"dtype": A(DT, required=True), "scale": A(F, required=True),
                                                           "zero_point": A(I, 0)}, _requantize,
          "int64 fixed point: clip(((acc * multiplier + 2^(shift-1)) >> shift) + zero_point) to dtype "
          "(round half up; shift in [0, 62]); multiplier and shift [] or [C]; scale: the output's step"),
    OpDef("int_softmax", ("input", "mask?"),
          {"multiplier": A(I, required=True), "shift": A(I, required=True), "ln2": A(I, required=True),
           "b": A(I, required=True), "c": A(I, required=True), "out_bits": A(I, 7)}, _int_softmax,
          "integer-only softmax over the last dim (I-BERT i-exp, see reference.py); probabilities in "
          "[0, 2^out_bits - 1] with scale 2^-out_bits (i8 up to 7 bits, else i16); masked (False) lanes give 0"),
    OpDef("int_gelu", ("input",),
          {"multiplier": A(I, required=True), "shift": A(I, required=True), "clip": A(I, required=True),
           "one": A(I, required=True), "out_multiplier": A(I, required=True), "out_shift": A(I, required=True),
           "dtype": A(DT, required=True), "scale": A(F, required=True)}, _int_gelu,
          "integer-only GELU (I-BERT i-erf, see reference.py), requantized to dtype with step scale",
          elementwise=True),
    OpDef("int_layer_norm", ("input", "weight", "bias"),
          {"eps": A(I, required=True), "shift": A(I, required=True), "dtype": A(DT, required=True),
           "scale": A(F, required=True)}, _int_layer_norm,
          "integer-only layer norm over the last dim (integer mean, variance, bit-by-bit sqrt; see "
          "reference.py); weight i32 and bias i64 per channel are the affine in fixed point"),
]

OPS: dict[str, OpDef] = {d.name: d for d in _DEFS}

# ops that only move elements (each result element is an operand element); WHOLE_MOVES keep
# every element too, and so the operand's range
MOVES = frozenset({"reshape", "permute", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand"})
WHOLE_MOVES = MOVES - {"slice", "select"}


def moves_elements(op, *, whole: bool = False) -> bool:
    """Whether one-operand `op` only moves its operand's elements (MOVES; WHOLE_MOVES when
    `whole`) or pads them with zeros: quantizing, then `op`, is `op`, then quantizing."""
    return op.kind in (WHOLE_MOVES if whole else MOVES) or (op.kind == "pad" and op.attr("value") == 0)


def moved_from(value: str, producer: dict, *, whole: bool = False) -> str:
    """The value whose elements `value` only moves (itself if none), through `moves_elements`
    ops and a `cat` of such moves of one value (conv-as-gemm's im2col taps): quantizing that
    value, then moving, is quantizing `value`. `producer`: value -> op."""
    while (op := producer.get(value)) is not None:
        if moves_elements(op, whole=whole):
            value = op.operands[0]
        elif op.kind == "cat" and len(sources := {moved_from(o, producer) for o in op.operands}) == 1:
            value = sources.pop()
        else:
            break
    return value


__all__ = ["OPS", "OpDef", "AttrKind", "AttrSpec", "OpTypeError", "promote"]
