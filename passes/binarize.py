"""binarize: 1-bit weights, with 8-bit (W1A8) or 1-bit (W1A1) activations.

Weights become `alpha[c] * sign(W[c, :])` with alpha[c] = mean |W[c, :]| per output channel
(optionally of the row-centred W). Each selected linear turns into integer arithmetic:

    %x.q   = quantize(%x) {dtype = i8, scale = s_x}         W1A8: calibrated 8-bit activations
    %x.q   = quantize(sub(%x, @beta)) {dtype = b1, scale = a}  W1A1: elastic sign(x - beta), learned a, beta
    %y.acc = linear(%x.q, @w : b1 !q(axis=0, scales=alpha), @b_q) : i32   (XNOR-popcount on hardware)
    %y     = dequantize(%y.acc, @s_x*alpha) : f32

W1A1 also splits attention so that softmax outputs are kept unsigned `attn_bits`-bit.
With training data it trains first (straight-through estimators, distillation from the
fp32 model); `tws=true` trains a ternary model first and splits each ternary weight into
two binary halves whose sum it is (BinaryBERT), doubling the binary work of those layers.
Input projections (embeddings) and the classifier head stay in float by default.
"""

from __future__ import annotations

import dataclasses
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


class TernaryWeight(nn.Module):
    """Weight transform (TWN): alpha[c] * sign(W) where |W| > 0.7 mean |W[c]|, else 0."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        keep = (w.abs() > 0.7 * w.abs().mean(dim=1, keepdim=True)).to(w.dtype)
        alpha = (w.abs() * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
        return alpha * _ste(w, _sign(w) * keep)


class ElasticBinary(nn.Module):
    """BiT-style activation binarization: a * sign(x - beta) with learned a and beta; the
    gradient passes where |x - beta| <= a."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x - self.bias) / self.scale
        return self.scale * _ste(s.clamp(-1, 1), _sign(s))


class UnsignedLevels(nn.Module):
    """Values in [0, 1] (softmax outputs) rounded to 2^bits - 1 steps (straight-through)."""

    def __init__(self, bits: int):
        super().__init__()
        self.levels = (1 << bits) - 1

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return _ste(p, torch.round(p * self.levels) / self.levels)


@dataclass(frozen=True)
class Binarize(Pass, LayerOptions, TrainingOptions):
    name = "binarize"
    summary = "1-bit weights (sign x per-channel mean|W|) with 8-bit (w1a8) or elastic 1-bit (w1a1) activations"

    mode: Literal["w1a8", "w1a1"] = option("w1a8", "activations: 8-bit (w1a8) or elastic binary (w1a1)")
    centered: bool = option(False, "binarize the row-centred weight W - mean(W[c])")
    tws: bool = option(False, "ternary weight splitting: train ternary, then split into two binary halves")
    attn_bits: int = option(4, "w1a1: bits of the unsigned softmax outputs", within="[1, 8]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        choice = self.layer_choice(graph, self.name)
        layers = list(choice.chosen)
        if not layers:
            for note in choice.notes("binarized"):
                ctx.note(note)
            return PassResult(graph, False)
        teacher = graph
        if self.mode == "w1a1":
            graph = DecomposeAttention().run(graph, ctx).graph
            layers = [layer for layer in select_layers(graph, self.layers, keep_head=False, pass_name=self.name)
                      if layer.weight in {x.weight for x in layers}]
        graph, taps = _tap_inputs(graph, layers)
        probs = [op.result for op in graph.ops if op.kind == "softmax"] if self.mode == "w1a1" else []
        names = [layer.weight for layer in layers]
        observed = observe(graph, ctx, set(taps.values()), pass_name=self.name)
        # w1a1: elastic sign(x - beta) * a per tap, a initialised to mean |x| (BiT)
        elastic = {tap: ElasticBinary(max(observed[tap].mean, 1e-6)) for tap in taps.values()} \
            if self.mode == "w1a1" else {}
        data = training_data(ctx, graph, self)
        if data is not None:
            acts: dict[str, nn.Module] = {**elastic, **{p: UnsignedLevels(self.attn_bits) for p in probs}}
            if self.tws:
                half = TrainingOptions(max(1, self.epochs // 2), self.lr, self.distill, self.temperature)
                module = train(graph, ctx, half, data, desc=f"{self.name} (ternary)", teacher=teacher,
                               weight_transforms={n: TernaryWeight() for n in names}, activation_transforms=acts)
                graph, names = _split_ternary(graph, trained_weights(module, graph), names)
            module = train(graph, ctx, self, data, desc=self.name, teacher=teacher,
                           weight_transforms={n: BinaryWeight(self.centered) for n in names},
                           activation_transforms=acts)
            graph = with_weights(graph, trained_weights(module, graph, transformed=False))
            ctx.note(f"trained on {data.source} ({len(data)} examples, {self.epochs} epochs"
                     f"{', ternary weight splitting' if self.tws else ''}{', distilled' if self.distill else ''})")
            if self.mode == "w1a8":  # activation ranges of the trained model
                observed = observe(graph, ctx, set(taps.values()), pass_name=self.name)
        else:
            if self.tws:
                raise TccError(f"{self.name}: option 'tws' needs training data (--train-data)")
            ctx.note("one-shot (no training data)")
        scales = {tap: (m.scale.item(), m.bias.item()) for tap, m in elastic.items()} if elastic else {
            tap: (max(o.amax, 1e-12) / 127, 0.0) for tap, o in observed.items()}
        out = self._lower(graph, names, scales, probs)
        for note in choice.notes("binarized", to=f"b1, {self.mode}" + (" (ternary weight splitting: 2 halves each)"
                                                                       if self.tws else "")):
            ctx.note(note)
        return PassResult(out, True)

    def _lower(self, graph: Graph, names: list[str], scales: dict[str, tuple[float, float]],
               probs: list[str]) -> Graph:
        """The float graph with taps to integer IR (see the module docstring); `scales` holds
        each tap's activation step and (w1a1) elastic bias."""
        types, weights = graph.types, graph.weights
        binary = set(names)
        rw = Rewriter(graph)
        quantized: dict[str, tuple[str, float]] = {}  # tap -> (integer value, activation scale)
        for op in graph.ops:
            if op.result in scales:
                tap, source = op.result, op.operands[0]
                scale, beta = scales[tap]
                if self.mode == "w1a8":
                    q = rw.op("quantize", source, name=f"{tap}.q", dtype=DType.I8, scale=scale)
                else:
                    shifted = rw.op("sub", source, rw.constant(f"{tap}.beta", np.asarray(beta, np.float32)),
                                    name=f"{tap}.shifted")
                    q = rw.op("quantize", shifted, name=f"{tap}.q", dtype=DType.B1, scale=scale)
                quantized[tap] = (q, scale)
            elif op.kind == "linear" and op.operands[1] in binary:
                x, w = op.operands[:2]
                q, s_x = quantized[x]
                latent = np.asarray(weights[w], dtype=np.float64)
                centred = latent - latent.mean(axis=1, keepdims=True) if self.centered else latent
                alpha = np.abs(centred).mean(axis=1)
                alpha = np.where(alpha > 0, alpha, 1.0)
                signs = np.where(centred >= 0, 1, -1).astype(np.int8)
                wtype = TensorType(types[w].shape, DType.B1, quant=PerChannel(0, tuple(map(float, alpha)),
                                                                              (0,) * len(alpha)))
                operands = [q, rw.constant(f"{w}.b1", signs, wtype)]
                step = s_x * alpha
                if len(op.operands) == 3:
                    bias = np.asarray(weights[op.operands[2]], dtype=np.float64)
                    operands.append(rw.constant(f"{op.operands[2]}.q", np.rint(bias / step).astype(np.int32)))
                acc = rw.op("linear", *operands, name=f"{op.result}.acc")
                scale = rw.constant(f"{op.result}.step", step.astype(types[op.result].dtype.numpy))
                rw.alias(op.result, rw.op("dequantize", acc, scale, name=op.result))
            elif op.result in probs:
                rw.keep(op)
                levels = (1 << self.attn_bits) - 1
                zero = -(1 << (self.attn_bits - 1)) if self.attn_bits > 1 else 0
                dtype = DType.I4 if self.attn_bits <= 4 else DType.I8
                q = rw.op("quantize", op.result, name=f"{op.result}.q", dtype=dtype, scale=1.0 / levels,
                          zero_point=zero)
                scale = rw.constant(f"{op.result}.step", np.asarray(1.0 / levels, dtype=np.float32))
                rw.alias(op.result, rw.op("dequantize", q, scale, name=f"{op.result}.dq", zero_point=zero))
            else:
                rw.keep(op)
        return rw.finish()


def _tap_inputs(graph: Graph, layers: list[Layer]) -> tuple[Graph, dict[str, str]]:
    """Give the selected linears' inputs their own value (an identity reshape, the tap), so
    activation transforms on it leave other users (e.g. residual paths) alone. Returns the
    graph and {input value: tap}."""
    binary_ops = {op.result for layer in layers for op in layer.ops}
    rw = Rewriter(graph)
    taps: dict[str, str] = {}
    for op in graph.ops:
        if op.result in binary_ops:
            x = op.operands[0]
            if x not in taps:
                taps[x] = rw.op("reshape", x, name=f"{x}.tap", shape=rw.types[x].shape)
            rw.keep(dataclasses.replace(op, operands=(taps[x],) + op.operands[1:]))
        else:
            rw.keep(op)
    return rw.finish(), taps


def _split_ternary(graph: Graph, ternary: dict[str, np.ndarray], names: list[str]) -> tuple[Graph, list[str]]:
    """Each linear on a ternary weight T (values 0, +-alpha[c]) becomes the sum of two linears
    on halves A, B with A + B = T: both T/2 where T != 0, +-alpha/2 where T == 0, so each half
    binarizes exactly (mean |A[c]| = alpha[c]/2). Returns the graph and the halves' names."""
    rw = Rewriter(graph)
    halves: dict[str, tuple[str, str]] = {}
    for name in names:
        t = ternary[name].astype(np.float64)
        alpha = np.abs(t).max(axis=1, keepdims=True)
        a = np.where(t != 0, t / 2, alpha / 2)
        dtype = graph.types[name].dtype.numpy
        halves[name] = tuple(rw.constant(f"{name}.half{i}", h.astype(dtype)) for i, h in enumerate((a, t - a)))
    for op in graph.ops:
        if op.kind == "linear" and op.operands[1] in halves:
            first, second = halves[op.operands[1]]
            y0 = rw.op("linear", op.operands[0], first, *op.operands[2:], name=f"{op.result}.half0")
            y1 = rw.op("linear", op.operands[0], second, name=f"{op.result}.half1")
            rw.alias(op.result, rw.op("add", y0, y1, name=op.result))
        else:
            rw.keep(op)
    return rw.finish(), [h for pair in halves.values() for h in pair]
