"""int-nonlinear: the float parts left between a quantized encoder layer's linears become
integer-only (I-BERT, Kim et al. 2021), so that a vector unit with integer lanes runs the layer.

Runs after `quantize`. Values that `dequantize` of an integer value stand for are followed in
integers through data movement (reshape, permute, transpose, slice, select, (un)squeeze,
expand, zero padding, a `cat` of values at one scale: im2col taps, or of such a value and a
constant that fits its step's range: a class token) and multiplication or
division by a positive scalar constant (folded into the scale); a `quantize` of such a value
reads the integer directly (or requantizes it), and a `quantize` behind data movement is
hoisted to the value it moves, so layout ops run on integers. Then:

- `softmax` (last dim, input integer, optionally `where(mask, x, -inf)`) -> `int_softmax`;
  the attention scores' i32 accumulator feeds it directly, its scale folded into constants;
- `gelu` -> `int_gelu`; `layer_norm` (one normalized dim) -> `int_layer_norm`;
- `matmul` of two activations -> i8 x i8 -> i32 `matmul`, then `requantize` (kept in i32 when
  it feeds a softmax); `relu` -> integer `relu`;
- `add` of two integer-backed activations (a residual) -> both to a common step in i32
  (`cast`, `requantize`), integer `add`, `requantize` to `residual_bits` (saturating); where
  a layer norm reads the sum, one side may be a float constant (position embeddings: its
  integers at the common step, an i32 constant; where a `quantize` reads the sum instead, at
  the other side's step and dtype, it is a saturating integer add at that step), and an `embedding` of a float constant table (token embeddings) becomes a gather
  from the table quantized to i8 at one step.

Outputs take the scale of the `quantize` that reads them when there is one (so the next linear
reads them directly), else a scale calibrated as `quantize` does; a float `dequantize` of each
result is left for float readers (dead code when there are none). Every constant derived from
a scale is computed here; the int ops' attributes hold them as integers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph, Op
from tcc.ir.ops import moved_from, moves_elements
from tcc.ir.quant import PerTensor
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .calibrate import observe, symmetric_scale
from .dce import DeadCodeElimination
from .decompose_attention import DecomposeAttention
from .quantize import dequantized, fixed_point
from .rewrite import Rewriter

KINDS = ("softmax", "gelu", "layer_norm", "matmul", "add", "relu")
_NARROW = (DType.I4, DType.I8, DType.I16)

# I-BERT's second-order polynomials: exp(p) ~ a (p + b)^2 + c on (-ln 2, 0];
# erf(v) ~ sign(v) (1 - k (min(|v|, e) - e)^2)
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344
ERF_K, ERF_END = 0.2888, 1.769
SOFTMAX_FRACTION_BITS = 14  # the largest F with (b 2^F)^2 + c 2^2F / a < 2^31
GELU_FRACTION_BITS = 12


def _fixed(m: float, bits: int = 31) -> tuple[int, int]:
    mult, shift = fixed_point(np.array([m], np.float64), bits)
    return int(mult[0]), int(shift[0])


def _bits_for(bound: int) -> int:
    """Multiplier bits that keep |v * multiplier| <= 2^62 for |v| <= bound."""
    return min(31, 62 - int(bound).bit_length())


def softmax_attrs(scale: float, out_bits: int) -> dict[str, int]:
    """`int_softmax` attributes for an input with step `scale`."""
    f = 1 << SOFTMAX_FRACTION_BITS
    multiplier, shift = _fixed(scale * f)
    return {"multiplier": multiplier, "shift": shift, "ln2": round(math.log(2) * f), "b": round(EXP_B * f),
            "c": round(EXP_C / EXP_A * f * f), "out_bits": out_bits}


def gelu_attrs(scale: float, dtype: DType, out_scale: float, out_dtype: DType) -> dict:
    """`int_gelu` attributes for a `dtype` input with step `scale`, output `out_dtype` with step `out_scale`."""
    f = 1 << GELU_FRACTION_BITS
    multiplier, shift = _fixed(scale / math.sqrt(2) * f)
    clip, one = round(ERF_END * f), round(f * f / ERF_K)
    bound = (1 << (dtype.bits - 1)) * (2 * one + clip * clip)
    out_multiplier, out_shift = _fixed(scale * ERF_K / (2 * f * f) / out_scale, _bits_for(bound))
    return {"multiplier": multiplier, "shift": shift, "clip": clip, "one": one, "out_multiplier": out_multiplier,
            "out_shift": out_shift, "dtype": out_dtype, "scale": out_scale}


def layer_norm_params(scale: float, dtype: DType, gamma: np.ndarray, beta: np.ndarray, eps: float,
                      out_scale: float, out_dtype: DType) -> tuple[np.ndarray, np.ndarray, dict]:
    """`int_layer_norm` (weight i32, bias i64, attributes) for a `dtype` input with step `scale`
    and float affine `gamma`, `beta`: the largest shift that keeps |weight| < 2^31 and |bias| <= 2^60."""
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    n = gamma.shape[0]
    m = gamma * math.sqrt(n) / (2.0 ** 31 * out_scale)
    c = beta / out_scale
    limits = [62.0]
    if np.abs(m).max(initial=0) > 0:
        limits.append(math.log2((2 ** 31 - 1) / np.abs(m).max()))
    if np.abs(c).max(initial=0) > 0:
        limits.append(math.log2(2.0 ** 60 / np.abs(c).max()))
    shift = int(np.clip(math.floor(min(limits)), 0, 62))
    weight = np.clip(np.rint(np.ldexp(m, shift)), -(2 ** 31 - 1), 2 ** 31 - 1).astype(np.int32)
    bias = np.clip(np.rint(np.ldexp(c, shift)), -2.0 ** 60, 2.0 ** 60).astype(np.int64)
    eps_int = round(min(eps * n / scale / scale, (1 << 62) - 1 - n * (1 << 2 * dtype.bits)))  # v + eps < 2^62
    return weight, bias, {"eps": eps_int, "shift": shift, "dtype": out_dtype, "scale": out_scale}


@dataclass(frozen=True)
class _Int:
    """An integer value standing for a float one: real = value * scale, |value| <= bound."""

    value: str
    scale: float
    bound: int


ScaleOf = Callable[[str, DType], float]


@dataclass(frozen=True)
class IntNonlinear(Pass):
    """Make softmax, GELU, layer norm, activation matmuls, residual adds and relu integer-only
    after `quantize` (see the module doc); idempotent."""

    name = "int-nonlinear"
    summary = "integer-only softmax, GELU, layer norm, attention matmuls and residual adds (I-BERT), after quantize"

    ops: str = option(";".join(KINDS), "which float ops to make integer, joined by ';'")
    softmax_bits: int = option(7, "softmax probabilities in steps of 2^-bits (up to 7: i8, else i16)",
                               within="[1, 15]")
    residual_bits: int = option(16, "bits of residual sums (the layer norms' inputs): 8 or 16")
    calibration: Literal["minmax", "percentile"] = option("minmax", "output ranges: max |v| or a percentile of |v|")
    percentile: float = option(99.99, "the percentile of |v| (calibration=percentile)", within="(0, 100]")

    def validate(self) -> None:
        unknown = [k for k in self.ops.split(";") if k not in KINDS]
        if unknown or not self.ops:
            raise self.fail("ops", f"names unknown op '{unknown[0] if unknown else ''}' "
                                   f"(choose from {', '.join(KINDS)}, joined by ';')")
        if self.residual_bits not in (8, 16):
            raise self.fail("residual_bits", f"must be 8 or 16, got {self.residual_bits}")

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.ops.split(";"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        source = graph
        decomposed = {"softmax", "matmul"} & self.kinds and any(
            op.kind == "scaled_dot_product_attention" for op in graph.ops)
        if decomposed:
            graph = DecomposeAttention().run(graph, ctx).graph
        wanted: set[tuple[str, DType]] = set()
        probe = _Converter(graph, self, lambda v, dtype: wanted.add((v, dtype)) or 1.0)
        probe.run()
        if not probe.converted:
            left = ", ".join(f"{n} {k}" for k, n in sorted(probe.left.items()))
            ctx.note(f"left float: {left} (input not integer)" if left else
                     f"nothing to convert (no {', '.join(sorted(self.kinds))} with integer inputs)")
            return PassResult(source, False)
        scales = self._calibrate(graph, ctx, wanted) if wanted else {}
        converter = _Converter(graph, self, lambda v, dtype: scales[v, dtype])
        out = DeadCodeElimination().run(converter.run(), ctx).graph
        counts = ", ".join(f"{n} {k}" for k, n in sorted(converter.converted.items()))
        left = ", ".join(f"{n} {k}" for k, n in sorted(converter.left.items()))
        ctx.note(f"{'attention decomposed; ' if decomposed else ''}{counts} to integers "
                 f"(softmax {self.softmax_bits}-bit, residual i{self.residual_bits})"
                 f"{f'; left float: {left} (input not integer)' if left else ''}")
        return PassResult(out, not out.same_as(source))

    def _calibrate(self, graph: Graph, ctx: PassContext, wanted: set[tuple[str, DType]]) -> dict:
        percentile = self.percentile if self.calibration == "percentile" else None
        observers = observe(graph, ctx, {v for v, _ in wanted}, pass_name=self.name, percentile=percentile)
        return {(v, d): symmetric_scale(observers[v], d.value_range[1], percentile) for v, d in wanted}


class _Converter:
    """One rewrite of the graph; `scale_of(value, dtype)` gives a float value's calibrated step
    as `dtype` (the dry run records what is asked, then the real run reads the answers)."""

    def __init__(self, graph: Graph, p: IntNonlinear, scale_of: ScaleOf):
        self.graph, self.p, self.scale_of = graph, p, scale_of
        self.rw = Rewriter(graph)
        self.ints: dict[str, _Int] = {}
        self.users, self.producer = graph.users(), graph.producer()
        self.constants = set(graph.constant_names)
        self.residual = DType.I16 if p.residual_bits == 16 else DType.I8
        self.converted: Counter[str] = Counter()
        self.left: Counter[str] = Counter()
        self.hoisted = self._hoisted()

    # -- bookkeeping -------------------------------------------------------------------------
    def _hoisted(self) -> dict[str, Op]:
        """The first integer `quantize` reading each value through moves that keep every element,
        keyed by that value: it is emitted as soon as the value is defined."""
        out: dict[str, Op] = {}
        for op in self.graph.ops:
            if op.kind != "quantize" or op.attr("zero_point") != 0 or op.attr("dtype") not in _NARROW:
                continue
            out.setdefault(moved_from(op.operands[0], self.producer, whole=True), op)
        return out

    def _defined(self, name: str) -> None:
        op = self.hoisted.get(name)
        if op is None or name in self.ints or not self.types(name).dtype.is_float:
            return
        direct = op.operands[0] == name
        q = self.rw.op("quantize", name, name=op.result if direct else f"{name}.i", **op.attr_dict)
        self.ints[name] = _Int(q, op.attr("scale"), -op.attr("dtype").value_range[0])

    def types(self, name: str):
        return self.rw.types[self.rw.value(name)]

    def dtype(self, x: _Int) -> DType:
        return self.rw.types[x.value].dtype

    def _scalar(self, name: str) -> float | None:
        """The value of a positive finite scalar float constant (or `full` source), else None."""
        source = self.producer.get(name)
        if self.types(name).shape != () or not self.types(name).dtype.is_float:
            return None
        if name in self.constants:
            value = float(self.rw.weight(name))
        elif source is not None and source.kind == "full":
            value = float(source.attr("value"))
        else:
            return None
        return value if math.isfinite(value) and value > 0 else None

    def _reader_quant(self, value: str) -> tuple[DType, float] | None:
        """(dtype, scale) of the first integer `quantize` reading `value` (through moves: one that
        reads part of it, a select or a slice, was calibrated on all of it by `quantize`; through
        zero padding and a cat, im2col taps, the same: `ir.ops.moved_from`), so `value` can take it."""
        stack, seen = [value], set()
        while stack:
            v = stack.pop(0)
            for op in self.users.get(v, []):
                if (moves_elements(op) or op.kind == "cat") and op.result not in seen:
                    seen.add(op.result)
                    stack.append(op.result)
                elif op.kind == "quantize" and op.attr("zero_point") == 0 and op.attr("dtype") in _NARROW:
                    return op.attr("dtype"), op.attr("scale")
        return None

    def _out(self, value: str, default: DType) -> tuple[DType, float]:
        return self._reader_quant(value) or (default, self.scale_of(value, default))

    def _define(self, op: Op, x: _Int) -> None:
        """`x` stands for `op`'s result; a float dequantize of it keeps the name for float readers."""
        self.ints[op.result] = x
        scale = self.rw.constant(f"{op.result}.scale", np.asarray(x.scale, op.type.dtype.numpy))
        self.rw.op("dequantize", x.value, scale, name=op.result)

    # -- integer helpers ---------------------------------------------------------------------
    def _requantize(self, x: _Int, dtype: DType, scale: float, hint: str) -> _Int:
        """x at a new step `scale` in `dtype` (i32 included), rounding half up and saturating."""
        acc = x.value
        if self.dtype(x) not in (DType.I32, DType.I64):
            acc = self.rw.op("cast", acc, name=f"{hint}.wide", dtype=DType.I32)
        mult, shift = _fixed(x.scale / scale, _bits_for(x.bound))
        params = (self.rw.constant(f"{hint}.{what}", np.asarray(v, np.int32))
                  for what, v in (("multiplier", mult), ("shift", shift)))
        q = self.rw.op("requantize", acc, *params, name=hint, dtype=dtype, scale=scale)
        hi = -dtype.value_range[0]
        return _Int(q, scale, min(hi, math.ceil(x.bound * x.scale / scale) + 1))

    def _narrow(self, name: str, default: DType) -> _Int:
        """An i4/i8/i16 value for float `name`: its integer (requantized from an accumulator to
        `default`), else a new `quantize` to `default` at its calibrated scale."""
        x = self.ints.get(name)
        if x is not None and self.dtype(x) in _NARROW:
            return x
        scale = self.scale_of(name, default)
        if x is not None:
            x = self._requantize(x, default, scale, f"{name}.i")
        else:
            x = _Int(self.rw.op("quantize", name, name=f"{name}.i", dtype=default, scale=scale), scale,
                     -default.value_range[0])
        self.ints[name] = x
        return x

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> Graph:
        for name in self.graph.input_names:
            self._defined(name)
        for op in self.graph.ops:
            handler = getattr(self, f"_{op.kind}", None) if op.kind in self.p.kinds else None
            if op.kind == "quantize":
                self._quantize(op)
            elif handler is not None and handler(op):
                self.converted[op.kind] += 1
            else:
                self.rw.keep(op)
                self._follow(op)
            self._defined(op.result)
        return self.rw.finish()

    def _follow(self, op: Op) -> None:
        """Integers for a kept float op that only moves or rescales a value with one."""
        if op.kind == "dequantize" and (found := dequantized(self.rw, op.result)) is not None:
            q, scale = found
            self.ints[op.result] = _Int(q, scale, -self.rw.types[q].dtype.value_range[0])
        elif moves_elements(op) and (x := self.ints.get(op.operands[0])) is not None:
            moved = self.rw.op(op.kind, x.value, name=f"{op.result}.i", **op.attr_dict)
            self.ints[op.result] = _Int(moved, x.scale, x.bound)
        elif op.kind == "cat" and (xs := self._cat_operands(op)) is not None:
            moved = self.rw.op("cat", *(x.value for x in xs), name=f"{op.result}.i", **op.attr_dict)
            self.ints[op.result] = _Int(moved, xs[0].scale, max(x.bound for x in xs))
        elif op.kind in ("mul", "div"):
            x, c = self.ints.get(op.operands[0]), self._scalar(op.operands[1])
            if op.kind == "mul" and x is None:
                x, c = self.ints.get(op.operands[1]), self._scalar(op.operands[0])
            if x is not None and c is not None and op.type.shape == self.rw.types[x.value].shape:
                self.ints[op.result] = _Int(x.value, x.scale * c if op.kind == "mul" else x.scale / c, x.bound)

    def _cat_operands(self, op: Op) -> list[_Int] | None:
        """The integers of a cat's operands, all at one step and dtype; a float constant among
        them (a class token) at that step, where it fits the dtype's range unclipped."""
        known = [self.ints.get(o) for o in op.operands]
        if not any(known) or len({(x.scale, self.dtype(x)) for x in known if x is not None}) != 1:
            return None
        like = next(x for x in known if x is not None)
        dtype, out = self.dtype(like), []
        for x, name in zip(known, op.operands):
            if x is None:
                if name not in self.constants:
                    return None
                value = np.rint(np.asarray(self.rw.weight(name), np.float64) / like.scale)
                if np.abs(value).max(initial=0) > -dtype.value_range[0] - 1:
                    return None
                type_ = TensorType(value.shape, dtype, quant=PerTensor(like.scale))
                x = _Int(self.rw.constant(f"{name}_q", value.astype(dtype.numpy), type_), like.scale, like.bound)
            out.append(x)
        return out

    def _quantize(self, op: Op) -> None:
        x, dtype, scale = self.ints.get(op.operands[0]), op.attr("dtype"), op.attr("scale")
        if x is None or op.attr("zero_point") != 0 or dtype not in _NARROW:
            self.rw.keep(op)
            if op.attr("zero_point") == 0 and dtype in _NARROW:
                self.ints.setdefault(op.operands[0], _Int(op.result, scale, -dtype.value_range[0]))
        elif self.dtype(x) is dtype and x.scale == scale:
            self.rw.alias(op.result, x.value)
        else:
            self.rw.alias(op.result, self._requantize(x, dtype, scale, f"{op.result}.i").value)

    # -- conversions: each returns whether it replaced the op --------------------------------
    def _softmax(self, op: Op) -> bool:
        if op.attr("dim") % op.type.rank != op.type.rank - 1:
            return False
        x, mask = self.ints.get(op.operands[0]), ()
        where = self.producer.get(op.operands[0])
        if x is None and where is not None and where.kind == "where":
            cond, data, fill = where.operands
            if (self.types(cond).dtype is DType.BOOL and fill in self.constants
                    and np.all(self.rw.weight(fill) == -np.inf)):
                x, mask = self.ints.get(data), (cond,)
        if x is None or self.dtype(x) is DType.I64 or self.rw.types[x.value].shape != op.type.shape:
            self.left[op.kind] += 1
            return False
        bits = self.p.softmax_bits
        y = self.rw.op("int_softmax", x.value, *mask, name=f"{op.result}.i", **softmax_attrs(x.scale, bits))
        self._define(op, _Int(y, 2.0 ** -bits, (1 << bits) - 1))
        return True

    def _gelu(self, op: Op) -> bool:
        x = self._narrow(op.operands[0], DType.I8)
        dtype, scale = self._out(op.result, DType.I8)
        y = self.rw.op("int_gelu", x.value, name=f"{op.result}.i",
                       **gelu_attrs(x.scale, self.dtype(x), scale, dtype))
        self._define(op, _Int(y, scale, -dtype.value_range[0]))
        return True

    def _layer_norm(self, op: Op) -> bool:
        affine = op.operands[1:]
        if len(op.attr("normalized_shape")) != 1 or any(w not in self.constants for w in affine):
            return False
        n = op.attr("normalized_shape")[0]
        gamma = self.rw.weight(affine[0]) if affine else np.ones(n)
        beta = self.rw.weight(affine[1]) if len(affine) == 2 else np.zeros(n)
        x = self._narrow(op.operands[0], self.residual)
        dtype, scale = self._out(op.result, DType.I8)
        weight, bias, attrs = layer_norm_params(x.scale, self.dtype(x), gamma, beta, op.attr("eps"), scale, dtype)
        w, b = (self.rw.constant(f"{affine[i]}_q" if len(affine) > i else f"{op.result}.{what}_q", value)
                for i, (what, value) in enumerate((("weight", weight), ("bias", bias))))
        y = self.rw.op("int_layer_norm", x.value, w, b, name=f"{op.result}.i", **attrs)
        self._define(op, _Int(y, scale, -dtype.value_range[0]))
        return True

    def _matmul(self, op: Op) -> bool:
        if not op.type.dtype.is_float or any(o in self.constants for o in op.operands):
            return False
        a, b = (self._narrow(o, DType.I8) for o in op.operands)
        k = self.rw.types[a.value].shape[-1]
        acc = _Int(self.rw.op("matmul", a.value, b.value, name=f"{op.result}.acc"), a.scale * b.scale,
                   k * a.bound * b.bound)
        if not self._feeds_softmax(op.result):
            dtype, scale = self._out(op.result, DType.I8)
            acc = self._requantize(acc, dtype, scale, f"{op.result}.i")
        self._define(op, acc)
        return True

    def _feeds_softmax(self, value: str) -> bool:
        """Whether `value` reaches a softmax this pass converts through scaling and masking."""
        if "softmax" not in self.p.kinds:
            return False
        stack = [value]
        while stack:
            for op in self.users.get(stack.pop(), []):
                if op.kind == "softmax":
                    return True
                if op.kind in ("mul", "div", "where"):
                    stack.append(op.result)
        return False

    def _add(self, op: Op) -> bool:
        if not op.type.dtype.is_float:
            return False
        xs = [None if o in self.constants else self.ints.get(o) or self._gathered(o) for o in op.operands]
        constant = [o for o, x in zip(op.operands, xs) if x is None and o in self.constants]
        if not any(xs) or None in xs and not constant:
            return False
        ints = [x for x in xs if x is not None]
        if constant and not any(u.kind == "layer_norm" for u in self.users[op.result]):
            return self._offset(op, ints[0], constant[0]) if len(ints) == len(constant) == 1 else False
        # a common step no coarser than the finer input, coarse enough that all fit 2^29
        magnitude = max([x.bound * x.scale for x in ints] + [float(np.abs(self.rw.weight(c)).max(initial=0))
                                                               for c in constant])
        common = max(min(x.scale for x in ints), magnitude / 2 ** 29)
        wide = []
        for x, name in zip(xs, op.operands):
            if x is None:  # a float constant (position embeddings): its integers at the common step
                value = np.rint(np.asarray(self.rw.weight(name), np.float64) / common).astype(np.int32)
                wide.append(_Int(self.rw.constant(f"{op.result}.{name}", value), common,
                                 int(np.abs(value).max(initial=0))))
            elif x.scale == common and self.dtype(x) is DType.I32:
                wide.append(x)
            elif x.scale == common:
                cast = self.rw.op("cast", x.value, name=f"{op.result}.{name}.wide", dtype=DType.I32)
                wide.append(_Int(cast, common, x.bound))
            else:
                wide.append(self._requantize(x, DType.I32, common, f"{op.result}.{name}"))
        total = _Int(self.rw.op("add", *(w.value for w in wide), name=f"{op.result}.sum"), common,
                     sum(w.bound for w in wide))
        self._define(op, self._requantize(total, self.residual, self.scale_of(op.result, self.residual),
                                          f"{op.result}.i"))
        return True

    def _offset(self, op: Op, x: _Int, constant: str) -> bool:
        """`x + c` for x a requantized product (relu'd or not) and c a float constant, where what reads the sum
        takes it at x's own step and dtype (`quantize` gives a linear adding a constant the
        sum's step): c's integers at that
        step (saturated to the dtype) added in i32 and saturated back, the saturating integer
        add of the vector unit's `vadd` after the linear's requantize."""
        dtype, source = self.dtype(x), self.rw.producer(x.value)
        if source is not None and source.kind == "relu":  # a conv front end's: fused into its requantize
            source = self.rw.producer(source.operands[0])
        if dtype not in _NARROW or source is None or source.kind != "requantize" or \
                self._reader_quant(op.result) != (dtype, x.scale):
            return False
        low, high = dtype.value_range
        value = np.clip(np.rint(np.asarray(self.rw.weight(constant), np.float64) / x.scale), low, high)
        c = self.rw.constant(f"{op.result}.{constant}", value.astype(np.int32))
        cast = self.rw.op("cast", x.value, name=f"{op.result}.{x.value}.wide", dtype=DType.I32)
        total = _Int(self.rw.op("add", cast, c, name=f"{op.result}.sum"), x.scale,
                     x.bound + int(np.abs(value).max(initial=0)))
        self._define(op, self._requantize(total, dtype, x.scale, f"{op.result}.i"))
        return True

    def _gathered(self, name: str) -> _Int | None:
        """An embedding of a float constant table as a gather of the table quantized to i8 (one
        step for the whole table, so the rows it picks add up in integers)."""
        op = self.producer.get(name)
        if op is None or op.kind != "embedding" or op.operands[0] not in self.constants:
            return None
        table = np.asarray(self.rw.weight(op.operands[0]), np.float64)
        scale = float(np.abs(table).max(initial=0)) / 127 or 1.0
        quantized = self.rw.constant(f"{op.operands[0]}_q", np.clip(np.rint(table / scale), -127, 127).astype(np.int8))
        x = _Int(self.rw.op("embedding", quantized, op.operands[1], name=f"{name}.i", quant=PerTensor(scale)),
                 scale, 127)
        self.ints[name] = x
        return x

    def _relu(self, op: Op) -> bool:
        x = self.ints.get(op.operands[0])
        if x is None:
            return False
        y = self.rw.op("relu", x.value, name=f"{op.result}.i", quant=PerTensor(x.scale))
        self._define(op, _Int(y, x.scale, x.bound))
        return True
