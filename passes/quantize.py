"""quantize: integer-only linears, calibrated post-training quantization.

Each selected float `linear` becomes

    %x.q   = quantize(%x) {dtype = i8, scale = s_x}              activations: symmetric, per tensor
    %y.acc = linear(%x.q, @w_q, @b_q) : i32                      i8 (or i4/i16) weights per output channel
    %y.q   = requantize(%y.acc, @mult, @shift) {dtype = i8, scale = s_y}
    %y     = dequantize(%y.q, @s_y) : f32                        the original name and type

with weights `w_q = rint(w / s_w[c])`, `s_w[c] = max|w[c,:]| / qmax`, bias `b_q = rint(b / (s_x s_w[c]))`
in the accumulator type, and fixed-point multipliers `mult[c] * 2^-shift[c] = s_x s_w[c] / s_y`
(31-bit; fewer bits for i64 accumulators, so that requantize's int64 product never overflows).
Activation scales come from running the float graph on calibration data (max |v|, or a
percentile of |v|, over `qmax`); a linear reading part of a tensor (a select, a slice, through
reshapes; im2col taps: `ir.ops.moved_from`) takes the whole tensor's scale, a linear whose
only use is a relu the relu's, and a linear whose only use adds a constant shares one scale
with the sum (the wider range's). A `quantize` of a `dequantize` with the same scale
reads the integer value directly, so chained linears stay in integers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tcc.ir.dtypes import DType
from tcc.ir.graph import Graph
from tcc.ir.ops import OPS, moved_from
from tcc.ir.quant import PerChannel, PerTensor
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .calibrate import observe, symmetric_scale
from .dce import DeadCodeElimination
from .layers import Layer, choose_layers, name_list
from .rewrite import Rewriter

_DTYPES = {4: DType.I4, 8: DType.I8, 16: DType.I16}


def quantize_weight(w: np.ndarray, dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of `w` [out, in] to `dtype`: (integers, scales),
    s[c] = max|w[c, :]| / qmax (1 for all-zero rows)."""
    w = np.asarray(w, np.float64)
    qmax = dtype.value_range[1]
    amax = np.abs(w).max(axis=1)
    scales = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.rint(w / scales[:, None]), -qmax, qmax), scales


def fixed_point(m: np.ndarray, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """Integer (multiplier, shift) with multiplier * 2^-shift ~ m (m > 0): multiplier in
    [2^(bits-1), 2^bits) and shift in [0, 62]; where the shift clips, the multiplier leaves
    that range (clipped to [0, 2^bits - 1])."""
    exponent = np.frexp(m)[1]  # m = f * 2^exponent, f in [0.5, 1)
    shift = np.clip(bits - exponent, 0, 62)
    mult = np.rint(np.ldexp(m, shift))
    carry = (mult >= 2.0 ** bits) & (shift > 0)  # f rounded up to 1: halve both
    mult, shift = np.where(carry, mult / 2, mult), np.where(carry, shift - 1, shift)
    return np.clip(mult, 0, 2.0 ** bits - 1).astype(np.int32), shift.astype(np.int32)


@dataclass(frozen=True)
class Quantize(Pass):
    """Rewrite float linears with constant weights (matched by `layers`) into integer-only
    quantize -> integer linear -> requantize -> dequantize. Integer linears whose accumulator
    is dequantized directly (binarized layers: alpha * s_x per channel) get the requantize to
    calibrated activations in between, so their outputs are integers too. Idempotent."""

    name = "quantize"
    summary = "integer-only linears: per-channel weights, calibrated per-tensor activations, fixed-point requantize"

    bits: int = option(8, "weight bits: 4, 8 or 16")
    calibration: Literal["minmax", "percentile"] = option("minmax", "activation range: max |v| or a percentile of |v|")
    percentile: float = option(99.99, "the percentile of |v| (calibration=percentile)", within="(0, 100]")
    layers: str = option(".*", "regex searched in weight names: which linears to quantize")
    activation_bits: int = option(8, "activation bits: 4, 8 or 16")

    def validate(self) -> None:
        for key in ("bits", "activation_bits"):
            if getattr(self, key) not in _DTYPES:
                raise self.fail(key, f"must be 4, 8 or 16, got {getattr(self, key)}")
        try:
            re.compile(self.layers)
        except re.error as e:
            raise self.fail("layers", f"is not a valid regular expression ({e})") from None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        types, weights = graph.types, graph.weights
        constants = set(graph.constant_names)
        choice = choose_layers(graph, self.layers, keep_head=False, keep_input=False, pass_name=self.name,
                               float_only=False)
        chosen = [op for layer in choice.chosen for op in layer.ops]
        targets = {op.result: op for op in chosen if types[op.operands[0]].dtype.is_float
                   and types[op.operands[1]].dtype.is_float
                   and (len(op.operands) < 3 or (op.operands[2] in constants and types[op.operands[2]].dtype.is_float))}
        outputs, users = set(graph.outputs), graph.users()
        dequantized_acc = {}  # integer linear -> the dequantize that is its accumulator's only user
        for op in chosen:
            after = users[op.result]
            if op.type.dtype.is_int and op.result not in outputs and len(after) == 1 and \
                    after[0].kind == "dequantize" and after[0].operands[1] in constants:
                dequantized_acc[op.result] = after[0]
        choice = choice.skip(lambda layer: self._left_alone(layer, graph, targets, dequantized_acc))
        requantized = [layer.weight for layer in choice.chosen if any(op.result in dequantized_acc for op in layer.ops)]
        quantized_weights = [layer.weight for layer in choice.chosen if any(op.result in targets for op in layer.ops)]
        notes = choice.notes("quantized", quantized_weights,
                             to=f"{_DTYPES[self.activation_bits]} x {_DTYPES[self.bits]}")
        if requantized:
            notes.insert(1, f"{len(requantized)} integer linear weight{'s' if len(requantized) != 1 else ''} "
                            f"({name_list(requantized)}) requantized to {_DTYPES[self.activation_bits]}")
        if not targets and not dequantized_acc:
            for note in notes:
                ctx.note(note)
            return PassResult(graph, False)
        producer = graph.producer()
        ranged = {x: moved_from(x, producer) for x in {op.operands[0] for op in targets.values()}}
        # a linear whose only use is a relu takes the relu's range (the same integers after the
        # relu), which is what a later linear reading the relu's result quantizes it to
        relu = {y: after[0].result for y in targets if y not in outputs and len(after := users[y]) == 1
                and after[0].kind == "relu"}
        # a linear whose only use adds a constant (positions after an input projection) and the
        # sum share one step, the wider range's: the add is then of integers at that step
        offset = {y: after[0].result for y in targets if y not in outputs and len(after := users[y]) == 1
                  and after[0].kind == "add" and sum(o in constants for o in after[0].operands) == 1}
        scales = self.calibrate(graph, ctx, set(ranged.values()) | {op.result for op in targets.values()}
                                | {d.result for d in dequantized_acc.values()} | set(relu.values())
                                | set(offset.values()),
                                may_be_zero=frozenset(relu.values()) - set(ranged.values()))
        for y, total in offset.items():
            scales[y] = scales[total] = max(scales[y], scales[total])
        scales.update({x: scales[source] for x, source in ranged.items()})
        scales.update({y: scales[r] for y, r in relu.items() if r in scales})  # an all-zero relu: the linear's own
        adtype, wdtype = _DTYPES[self.activation_bits], _DTYPES[self.bits]
        # an output the graph already quantizes (directly or after its relu; a binarized layer's
        # input) takes that quantize's step: the quantize then reads the integers as they are
        for y in [*targets, *(d.result for d in dequantized_acc.values())]:
            if (step := _quantized_step(y, graph, users, outputs, adtype)) is not None:
                scales[y] = step

        rw = Rewriter(graph)
        quantized: dict[str, tuple[str, float]] = {}  # float value -> (integer value, its scale)
        weight_q: dict[str, tuple[str, np.ndarray]] = {}  # float weight -> (integer weight, s_w)

        def integer_input(x: str) -> tuple[str, float]:
            if x not in quantized:
                quantized[x] = dequantized(rw, x, adtype) or (
                    rw.op("quantize", x, name=f"{x}.q", dtype=adtype, scale=scales[x]), scales[x])
            return quantized[x]

        def integer_weight(w: str) -> tuple[str, np.ndarray]:
            if w not in weight_q:
                q, s_w = quantize_weight(weights[w], wdtype)
                t = dataclasses.replace(types[w], dtype=wdtype, quant=PerChannel(0, tuple(map(float, s_w)),
                                                                                  (0,) * len(s_w)))
                weight_q[w] = rw.constant(f"{_base(w)}.weight_q", q, t), s_w
            return weight_q[w]

        for op in graph.ops:
            if op.kind == "dequantize" and op.operands[0] in dequantized_acc:
                self._requantize_accumulator(rw, op, graph, scales[op.result], adtype)
                continue
            if op.result not in targets:
                rw.keep(op)
                continue
            x, w, y = op.operands[0], op.operands[1], op.result
            base = _base(w)
            (xq, s_x), (wq, s_w) = integer_input(x), integer_weight(w)
            acc = OPS["linear"].infer([rw.types[xq], rw.types[wq]], {}).dtype
            operands, bias_max = (xq, wq), 0
            if len(op.operands) == 3:
                bias = np.clip(np.rint(np.asarray(weights[op.operands[2]], np.float64) / (s_x * s_w)),
                               *acc.value_range)
                operands += (rw.constant(f"{base}.bias_q", bias, TensorType(bias.shape, acc)),)
                bias_max = int(np.abs(bias).max(initial=0))
            # |acc| <= k * 2^(a-1) * 2^(b-1) + |bias|: keep |acc * multiplier| <= 2^62, so requantize is
            # exact in int64 (31-bit multipliers always fit i32 accumulators)
            bound = types[w].shape[1] * -adtype.value_range[0] * -wdtype.value_range[0] + bias_max
            mult, shift = fixed_point(s_x * s_w / scales[y], min(31, 62 - math.ceil(math.log2(bound + 1))))
            vector = TensorType(mult.shape, DType.I32)
            yq = rw.op("requantize", rw.op("linear", *operands, name=f"{y}.acc"),
                       rw.constant(f"{base}.multiplier", mult, vector), rw.constant(f"{base}.shift", shift, vector),
                       name=f"{y}.q", dtype=adtype, scale=scales[y])
            s_y = rw.constant(f"{base}.output_scale", np.asarray(scales[y]), TensorType((), op.type.dtype))
            rw.alias(y, rw.op("dequantize", yq, s_y, name=y))

        for note in notes:
            ctx.note(note)
        # a dequantize whose users now read its integer operand is dead: drop it
        return PassResult(DeadCodeElimination().run(rw.finish(), ctx).graph, True)

    @staticmethod
    def _left_alone(layer: Layer, graph: Graph, targets: dict, dequantized_acc: dict) -> str | None:
        """Why the linears on `layer`'s weight stay as they are (None: this pass rewrites one)."""
        if any(op.result in targets or op.result in dequantized_acc for op in layer.ops):
            return None
        types = graph.types
        op = layer.ops[0]
        if not types[layer.weight].dtype.is_float:
            return f"{types[layer.weight].dtype} weights, already integer"
        if not types[op.operands[0]].dtype.is_float:
            return f"its input is {types[op.operands[0]].dtype}, not float"
        return "its bias is not a float constant"

    @staticmethod
    def _requantize_accumulator(rw: Rewriter, op, graph: Graph, scale: float, adtype: DType) -> None:
        """`y = dequantize(acc, step)` -> `y = dequantize(requantize(acc, step / scale), scale)`."""
        acc, step = op.operands
        linear = rw.producer(acc)
        x, w = linear.operands[:2]
        bias = int(np.abs(graph.weights[linear.operands[2]]).max(initial=0)) if len(linear.operands) == 3 else 0
        x_max, w_max = (1 << rw.types[x].dtype.bits - 1), (1 << graph.types[w].dtype.bits - 1)
        bound = graph.types[w].shape[1] * x_max * w_max + bias
        factor = np.broadcast_to(np.asarray(graph.weights[step], np.float64), (graph.types[w].shape[0],)) / scale
        mult, shift = fixed_point(factor, min(31, 62 - math.ceil(math.log2(bound + 1))))
        vector = TensorType(mult.shape, DType.I32)
        y = op.result
        yq = rw.op("requantize", acc, rw.constant(f"{y}.multiplier", mult, vector),
                   rw.constant(f"{y}.shift", shift, vector), name=f"{y}.q", dtype=adtype, scale=scale)
        s_y = rw.constant(f"{y}.output_scale", np.asarray(scale), TensorType((), op.type.dtype))
        rw.alias(y, rw.op("dequantize", yq, s_y, name=y))

    def calibrate(self, graph: Graph, ctx: PassContext, values: set[str],
                  may_be_zero: frozenset[str] = frozenset()) -> dict[str, float]:
        """Symmetric per-tensor scales of `values`, from the float graph run on calibration data;
        none for those of `may_be_zero` the data leaves all zero."""
        percentile = self.percentile if self.calibration == "percentile" else None
        observers = observe(graph, ctx, values, pass_name=self.name, percentile=percentile, may_be_zero=may_be_zero)
        qmax = _DTYPES[self.activation_bits].value_range[1]
        return {v: symmetric_scale(o, qmax, percentile) for v, o in observers.items()
                if v not in may_be_zero or o.range(percentile) > 0}


def _quantized_step(y: str, graph: Graph, users, outputs: set[str], dtype: DType) -> float | None:
    """The scale of the `quantize` to `dtype` (zero point 0) that is the only use of `y` or of
    its only use, a relu (relu commutes with requantize: both keep 0 and order)."""
    if y in outputs or len(users[y]) != 1:
        return None
    op = users[y][0]
    if op.kind == "relu" and op.result not in outputs and len(users[op.result]) == 1:
        op = users[op.result][0]
    if op.kind != "quantize" or op.attr_dict.get("zero_point", 0) != 0 or op.attr("dtype") != dtype:
        return None
    return float(op.attr("scale"))


def _base(weight: str) -> str:
    return weight[:-len(".weight")] if weight.endswith(".weight") else weight


def dequantized(rw: Rewriter, value: str, dtype: DType | None = None) -> tuple[str, float] | None:
    """(q, scale) when `value` is `dequantize(q, scale)` of a `dtype` (any integer type when None)
    value with zero point 0 and a scalar scale constant equal to q's type scale: then
    quantize(value) == q exactly."""
    op = rw.producer(value)
    if op is None or op.kind != "dequantize" or op.attr("zero_point") != 0:
        return None
    q, scale = op.operands
    quant = rw.types[q].quant
    if dtype not in (None, rw.types[q].dtype) or not isinstance(quant, PerTensor) or quant.zero_point != 0 or rw.types[
            scale].dtype not in (DType.F32, DType.F64):  # f32: rint(q * s / s) == q for |q| < 2^22
        return None
    s = rw.weight(scale)
    return (q, quant.scale) if s.shape == () and s == np.asarray(quant.scale, s.dtype) else None
