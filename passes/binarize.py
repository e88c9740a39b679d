"""binarize: 1-bit weights, with 8-bit (W1A8), 4-bit (W1A4) or 1-bit (W1A1) activations
(BMT, the binarized Transformer of the BAT/BMT co-design, and BiT's binarization).

Weights become `alpha[c] * sign(W[c, :])` with alpha[c] = mean |W[c, :]| per output channel
(optionally of the row-centred W). Each selected linear turns into integer arithmetic:

    %x.q   = quantize(%x) {dtype = i8, scale = s_x}          W1A8: calibrated 8-bit activations
    %x.q   = quantize(%x) {dtype = i4, scale = s_x}          W1A4: a learned step (LSQ)
    %x.q   = quantize(sub(%x, @beta)) {dtype = b1, scale = a}  W1A1: elastic sign(x - beta), learned a, beta
    %y.acc = linear(%x.q, @w : b1 !q(axis=0, scales=alpha), @b_q) : i32   (XNOR-popcount on hardware)
    %y     = dequantize(%y.acc, @s_x*alpha) : f32

W1A1 (BiT's elastic binarization): the threshold beta is one per tensor or, with
`threshold=channel`, one per channel; the scale a is one per tensor (it multiplies the
product's reduction axis: a scale per channel there would make the weights multi-bit). An
activation that is never negative (a ReLU's output) binarizes unsigned, to {0, a} (BiT): the
threshold is beta + a/2, the lowering computes sign(x - beta - a/2) in {-1, +1} and adds the
weights' row sums to the bias (a * u = a/2 * (s + 1)). W1A1 also splits attention so that
softmax outputs are kept unsigned `attn_bits`-bit; with `attention=binary` the attention
products are integer too: Q, K and V elastic binary, P (the softmax output) `attn_bits`-bit,
`matmul(q : b1, k^T : b1)` and `matmul(p : i8, v : b1)` dequantized by their scales.

With training data it trains first (straight-through estimators, distillation from the
fp32 model, of hidden states too with `hidden`); `tws=true` trains a ternary model first and
splits each ternary weight into two binary halves whose sum it is (BinaryBERT), then learns
the halves with a scale per channel: they run as one binary layer over the input twice
(`_split_ternary`), doubling the binary work of those layers. Input projections (embeddings)
and the classifier head stay in float by default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.quant import PerChannel
from tcc.ir.types import TensorType

from .base import Pass, PassContext, PassResult, option
from .calibrate import observe
from .decompose_attention import DecomposeAttention
from .finetune import TrainingOptions, train, trained_weights, training_data, with_weights
from .layers import Layer, LayerOptions, select_layers
from .rewrite import Rewriter


def _ste(value: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """`forward` in the forward pass, the gradient of `value` in the backward pass."""
    return value + (forward - value).detach()


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryWeight(nn.Module):
    """Weight transform: alpha[c] * sign(W[c]) with alpha = mean |W[c]| (straight-through)."""

    def __init__(self, centered: bool):
        super().__init__()
        self.centered = centered

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = w - w.mean(dim=1, keepdim=True) if self.centered else w
        return c.abs().mean(dim=1, keepdim=True) * _ste(c, _sign(c))


class ScaledBinary(nn.Module):
    """Weight transform gamma[c] * sign(W[c]) with a learned scale per output channel
    (straight-through): ternary weight splitting's coefficient, learned with the halves."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.scale = nn.Parameter(torch.from_numpy(np.abs(weight).mean(axis=1, keepdims=True).astype(np.float32)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale.to(w.dtype) * _ste(w, _sign(w))


class TernaryWeight(nn.Module):
    """Weight transform (TWN): alpha[c] * sign(W) where |W| > 0.7 mean |W[c]|, else 0."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        keep = (w.abs() > 0.7 * w.abs().mean(dim=1, keepdim=True)).to(w.dtype)
        alpha = (w.abs() * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
        return alpha * _ste(w, _sign(w) * keep)


class ElasticBinary(nn.Module):
    """BiT's elastic activation binarization with a learned scale a and threshold beta (a
    scalar, or one per channel of the last axis: `channels`): signed, a * sign(x - beta), the
    gradient passing where |x - beta| <= a; `unsigned`, a * [x - beta >= a/2] in {0, a}, the
    gradient passing where 0 <= x - beta <= a."""

    def __init__(self, scale: float, channels: int = 0, unsigned: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.zeros(channels) if channels else torch.tensor(0.0))
        self.unsigned = unsigned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x - self.bias) / self.scale
        if self.unsigned:
            return self.scale * _ste(s.clamp(0, 1), (s >= 0.5).to(x.dtype))
        return self.scale * _ste(s.clamp(-1, 1), _sign(s))

    def lowering(self) -> tuple[float, np.ndarray, bool]:
        """(step, threshold, unsigned) of the integer form: sign(x - threshold) at `step`."""
        scale, bias = self.scale.item(), self.bias.detach().cpu().numpy().astype(np.float64)
        return (scale / 2, bias + scale / 2, True) if self.unsigned else (scale, bias, False)


class LearnedStep(nn.Module):
    """LSQ (Esser et al., ICLR 2020): s * clamp(round(x / s), lo, hi) to `bits` signed levels
    with a learned step s; the gradient passes where x / s lies in [lo, hi], and the step's is
    scaled by 1 / sqrt(numel * hi)."""

    def __init__(self, bits: int, step: float):
        super().__init__()
        self.lo, self.hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        self.step = nn.Parameter(torch.tensor(float(step)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(x.numel() * self.hi)
        step = (self.step - self.step * g).detach() + self.step * g  # the step's value, its gradient scaled
        q = (x / step).clamp(self.lo, self.hi)
        return _ste(q, torch.round(q)) * step


class UnsignedLevels(nn.Module):
    """Values in [0, 1] (softmax outputs) rounded to 2^bits - 1 steps (straight-through)."""

    def __init__(self, bits: int):
        super().__init__()
        self.levels = (1 << bits) - 1

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return _ste(p, torch.round(p * self.levels) / self.levels)


@dataclass(frozen=True)
class _Tap:
    """How a binarized layer's input lowers: quantize(x - threshold) to `dtype` at `step`
    (`threshold`: None, a scalar or one per channel); `unsigned`: x ~ step * (q + 1), the
    layer adds its weights' row sums to its bias."""

    dtype: DType
    step: float
    threshold: np.ndarray | None = None
    unsigned: bool = False


@dataclass(frozen=True)
class Binarize(Pass, LayerOptions, TrainingOptions):
    name = "binarize"
    summary = ("1-bit weights (sign x per-channel mean|W|) with 8-bit (w1a8), 4-bit (w1a4) or elastic 1-bit "
               "(w1a1) activations")

    mode: Literal["w1a8", "w1a4", "w1a1"] = option(
        "w1a8", "activations: 8-bit calibrated (w1a8), 4-bit with a learned step (w1a4) or elastic binary (w1a1)")
    centered: bool = option(False, "binarize the row-centred weight W - mean(W[c])")
    tws: bool = option(False, "ternary weight splitting: train ternary, then split into two binary halves")
    attn_bits: int = option(4, "w1a1: bits of the unsigned softmax outputs", within="[1, 8]")
    threshold: Literal["tensor", "channel"] = option(
        "tensor", "w1a1: the learned threshold of an activation's sign, one per tensor or one per channel")
    unsigned: bool = option(True, "w1a1: binarize activations that are never negative (a ReLU's output) to {0, a}")
    attention: Literal["float", "binary"] = option(
        "float", "w1a1: the attention products Q K^T and P V on dequantized values (float) or integer (binary)")
    hidden: float = option(1.0, "with distill: weight of distilling hidden states too (the MSE of every layer "
                                "norm's output and attention map to the fp32 model's, relative to its mean square)",
                           within="[0, 100]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        choice = self.layer_choice(graph, self.name)
        layers = list(choice.chosen)
        if not layers:
            for note in choice.notes("binarized"):
                ctx.note(note)
            return PassResult(graph, False)
        if self.mode == "w1a1":  # the teacher decomposed too: the same function, its attention maps named alike
            graph = DecomposeAttention().run(graph, ctx).graph
            layers = [layer for layer in select_layers(graph, self.layers, keep_head=False, pass_name=self.name)
                      if layer.weight in {x.weight for x in layers}]
        teacher = graph
        products = _attention_products(graph) if self.mode == "w1a1" and self.attention == "binary" else {}
        graph, taps = _tap_inputs(graph, layers, {v for pair in products.values() for v in pair if v})
        probs = [op.result for op in graph.ops if op.kind == "softmax"] if self.mode == "w1a1" else []
        names = [layer.weight for layer in layers]
        observed = observe(graph, ctx, set(taps.values()), pass_name=self.name)
        transforms = self._transforms(graph, taps, observed, products)
        data = training_data(ctx, graph, self)
        if data is not None:
            acts: dict[str, nn.Module] = {**transforms, **{p: UnsignedLevels(self.attn_bits) for p in probs}}
            if self.tws:
                half = dataclasses.replace(self, epochs=max(1, self.epochs // 2))
                module = train(graph, ctx, half, data, desc=f"{self.name} (ternary)", teacher=teacher,
                               weight_transforms={n: TernaryWeight() for n in names}, activation_transforms=acts)
                graph, names = _split_ternary(graph, trained_weights(module, graph), names)
            binary = {n: ScaledBinary(graph.weights[n]) if self.tws else BinaryWeight(self.centered) for n in names}
            module = train(graph, ctx, self, data, desc=self.name, teacher=teacher, weight_transforms=binary,
                           activation_transforms=acts)
            # the halves with their learned scales (the lowering reads mean |W[c]|: gamma[c])
            graph = with_weights(graph, trained_weights(module, graph, transformed=False)
                                 | (trained_weights(module, graph) if self.tws else {}))
            ctx.note(f"trained on {data.source} ({len(data)} examples, {self.epochs} epochs"
                     f"{', ternary weight splitting' if self.tws else ''}{', distilled' if self.distill else ''})")
            if self.mode == "w1a8":  # activation ranges of the trained model
                observed = observe(graph, ctx, set(taps.values()), pass_name=self.name)
        else:
            if self.tws:
                raise TccError(f"{self.name}: option 'tws' needs training data (--train-data)")
            ctx.note("one-shot (no training data)")
        lowering = {tap: self._lowering(transforms.get(tap), observed[tap]) for tap in taps.values()}
        out = self._lower(graph, names, lowering, probs, products)
        for note in choice.notes("binarized", to=f"b1, {self.mode}" + (" (ternary weight splitting: 2 halves each)"
                                                                       if self.tws else "")):
            ctx.note(note)
        return PassResult(out, True)

    def _transforms(self, graph: Graph, taps: dict[str, str], observed: dict,
                    products: dict[str, tuple[str | None, str]]) -> dict[str, nn.Module]:
        """The taps' activation transforms, initialised from what calibration observed: w1a1
        elastic binary (unsigned where never negative; an attention product's operands signed,
        one threshold each), w1a4 a learned step (LSQ's initial 2 mean|x| / sqrt(7)), w1a8 none
        (its scales are calibrated after training)."""
        if self.mode == "w1a8":
            return {}
        operands = {taps[v] for pair in products.values() for v in pair if v}
        out: dict[str, nn.Module] = {}
        for tap in taps.values():
            o = observed[tap]
            mean = max(o.mean, 1e-6)
            if self.mode == "w1a4":
                out[tap] = LearnedStep(4, 2 * mean / math.sqrt(7))
            elif tap in operands:
                out[tap] = ElasticBinary(mean)
            else:
                unsigned = self.unsigned and o.low >= 0
                channels = graph.types[tap].shape[-1] if self.threshold == "channel" else 0
                out[tap] = ElasticBinary(2 * mean if unsigned else mean, channels, unsigned)
        return out

    def _lowering(self, transform: nn.Module | None, observed) -> _Tap:
        if isinstance(transform, ElasticBinary):
            step, threshold, unsigned = transform.lowering()
            return _Tap(DType.B1, step, threshold, unsigned)
        if isinstance(transform, LearnedStep):
            return _Tap(DType.I4, abs(transform.step.item()))
        return _Tap(DType.I8, max(observed.amax, 1e-12) / 127)

    def _lower(self, graph: Graph, names: list[str], taps: dict[str, _Tap], probs: list[str],
               products: dict[str, tuple[str | None, str]]) -> Graph:
        """The float graph with taps to integer IR (see the module docstring)."""
        types, weights = graph.types, graph.weights
        binary = set(names)
        levels_read = {op.operands[0] for op in graph.ops if op.result in products}  # softmax outputs as they are
        rw = Rewriter(graph)
        quantized: dict[str, tuple[str, _Tap]] = {}  # value -> (its integer value, how)
        for op in graph.ops:
            if op.result in taps:
                tap, source, how = op.result, op.operands[0], taps[op.result]
                if how.threshold is not None:
                    threshold = rw.constant(f"{tap}.beta", np.asarray(how.threshold, types[source].dtype.numpy))
                    source = rw.op("sub", source, threshold, name=f"{tap}.shifted")
                quantized[tap] = (rw.op("quantize", source, name=f"{tap}.q", dtype=how.dtype, scale=how.step), how)
            elif op.kind == "cat" and all(v in quantized for v in op.operands):  # merged halves' input twice
                q, how = quantized[op.operands[0]]
                quantized[op.result] = (rw.op("cat", *(quantized[v][0] for v in op.operands), name=f"{op.result}.q",
                                              **op.attr_dict), how)
            elif op.kind == "linear" and op.operands[1] in binary:
                x, w = op.operands[:2]
                q, how = quantized[x]
                latent = np.asarray(weights[w], dtype=np.float64)
                centred = latent - latent.mean(axis=1, keepdims=True) if self.centered else latent
                alpha = np.abs(centred).mean(axis=1)
                alpha = np.where(alpha > 0, alpha, 1.0)
                signs = np.where(centred >= 0, 1, -1).astype(np.int8)
                wtype = TensorType(types[w].shape, DType.B1, quant=PerChannel(0, tuple(map(float, alpha)),
                                                                              (0,) * len(alpha)))
                operands = [q, rw.constant(f"{w}.b1", signs, wtype)]
                step = how.step * alpha
                bias = np.zeros(len(alpha), np.int64)
                if len(op.operands) == 3:
                    bias += np.rint(np.asarray(weights[op.operands[2]], dtype=np.float64) / step).astype(np.int64)
                if how.unsigned:  # x ~ step * (q + 1): W x = step * (W q + W 1)
                    bias += signs.sum(axis=1, dtype=np.int64)
                if len(op.operands) == 3 or how.unsigned:
                    name = f"{op.operands[2]}.q" if len(op.operands) == 3 else f"{op.result}.offset"
                    operands.append(rw.constant(name, bias.astype(np.int32)))
                acc = rw.op("linear", *operands, name=f"{op.result}.acc")
                scale = rw.constant(f"{op.result}.step", step.astype(types[op.result].dtype.numpy))
                rw.alias(op.result, rw.op("dequantize", acc, scale, name=op.result))
            elif op.result in probs:
                rw.keep(op)
                levels = (1 << self.attn_bits) - 1
                if op.result in levels_read:  # the integer product reads the levels themselves
                    dtype = DType.I8 if levels <= 127 else DType.I16
                    q = rw.op("quantize", op.result, name=f"{op.result}.q", dtype=dtype, scale=1.0 / levels)
                    quantized[op.result] = (q, _Tap(dtype, 1.0 / levels))
                    continue
                zero = -(1 << (self.attn_bits - 1)) if self.attn_bits > 1 else 0
                dtype = DType.I4 if self.attn_bits <= 4 else DType.I8
                q = rw.op("quantize", op.result, name=f"{op.result}.q", dtype=dtype, scale=1.0 / levels,
                          zero_point=zero)
                scale = rw.constant(f"{op.result}.step", np.asarray(1.0 / levels, dtype=np.float32))
                rw.alias(op.result, rw.op("dequantize", q, scale, name=f"{op.result}.dq", zero_point=zero))
            elif op.result in products:
                (a, how_a), (b, how_b) = (quantized[v] for v in op.operands)
                acc = rw.op("matmul", a, b, name=f"{op.result}.acc")
                dtype = types[op.result].dtype.numpy
                scale = rw.constant(f"{op.result}.step", np.asarray(how_a.step * how_b.step, dtype))
                rw.alias(op.result, rw.op("dequantize", acc, scale, name=op.result))
            else:
                rw.keep(op)
        return rw.finish()


def _attention_products(graph: Graph) -> dict[str, tuple[str | None, str]]:
    """The attention products of a decomposed attention, by result, with the operands to
    binarize: the scores `q @ k^T` feeding a softmax (through scaling and masking), both; the
    context `p @ v` reading a softmax output, v (None for p: its own levels)."""
    producer, users = graph.producer(), graph.users()
    out: dict[str, tuple[str | None, str]] = {}
    for op in graph.ops:
        if op.kind != "softmax":
            continue
        source = producer.get(op.operands[0])
        while source is not None and source.kind in ("mul", "div", "add", "where"):
            source = producer.get(next((v for v in source.operands if v in producer), ""))
        if source is not None and source.kind == "matmul":
            out[source.result] = (source.operands[0], source.operands[1])
        for user in users[op.result]:
            if user.kind == "matmul" and user.operands[0] == op.result:
                out[user.result] = (None, user.operands[1])
    return out


def _tap_inputs(graph: Graph, layers: list[Layer], operands: set[str] = frozenset()) -> tuple[Graph, dict[str, str]]:
    """Give the selected linears' inputs and the attention products' `operands` their own value
    (an identity reshape, the tap), so activation transforms on it leave other users (e.g.
    residual paths) alone. Returns the graph and {value: tap}."""
    binary_ops = {op.result for layer in layers for op in layer.ops}
    rw = Rewriter(graph)
    taps: dict[str, str] = {}

    def tap(x: str) -> str:
        if x not in taps:
            taps[x] = rw.op("reshape", x, name=f"{x}.tap", shape=rw.types[x].shape)
        return taps[x]

    for op in graph.ops:
        if op.result in binary_ops:
            rw.keep(dataclasses.replace(op, operands=(tap(op.operands[0]),) + op.operands[1:]))
        elif op.kind == "matmul" and any(v in operands for v in op.operands):
            rw.keep(dataclasses.replace(op, operands=tuple(tap(v) if v in operands else v for v in op.operands)))
        else:
            rw.keep(op)
    return rw.finish(), taps


def _split_ternary(graph: Graph, ternary: dict[str, np.ndarray], names: list[str]) -> tuple[Graph, list[str]]:
    """Ternary weight splitting, its halves merged: each linear on a ternary weight T (values 0
    and +-alpha[c]) becomes one linear on its input twice, `cat(x, x)`, with halves A and B side
    by side, [A | B] (N x 2K), A + B = T: both T/2 where T != 0, +alpha/2 and -alpha/2 where
    T == 0. Every value of both is +-alpha[c]/2, so [A | B] is one binary layer with one scale
    per channel: the MACs of the two halves, one product and no add. (Not one binary layer of
    T's own shape: T takes three values, 0 among them, which a sign cannot.) Returns the graph
    and the merged weights' names."""
    rw = Rewriter(graph)
    merged: dict[str, str] = {}
    for name in names:
        t = ternary[name].astype(np.float64)
        alpha = np.abs(t).max(axis=1, keepdims=True)
        a = np.where(t != 0, t / 2, alpha / 2)
        pair = np.concatenate([a, t - a], axis=1).astype(graph.types[name].dtype.numpy)
        merged[name] = rw.constant(f"{name}.halves", pair)
    for op in graph.ops:
        if op.kind == "linear" and op.operands[1] in merged:
            x = op.operands[0]
            twice = rw.op("cat", x, x, name=f"{op.result}.twice", dim=-1)
            rw.alias(op.result, rw.op("linear", twice, merged[op.operands[1]], *op.operands[2:], name=op.result))
        else:
            rw.keep(op)
    return rw.finish(), list(merged.values())
