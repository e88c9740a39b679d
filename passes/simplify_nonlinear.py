"""simplify-nonlinear: the hardware-friendly components of a binarized Transformer (BMT), each
an option, then fine-tuning (distilled from the model as it was) to win back what they cost:

- `gelu=relu`: GELU as ReLU; `gelu=hard`: as x * clip(3x/8 + 1/2, 0, 1), a slope of 3/8 (a
  shift and an add) in place of the normal CDF: no erf, no tanh;
- `softmax=relu`: an attention softmax over L keys as relu(s) / L (ReLU attention, Wortsman
  et al., "Replacing softmax with ReLU in Vision Transformers", 2023): no exponent, no row
  max and no division, 1/L a constant (a shift when L is a power of two); the vector unit's
  softmax spends most of its cycles in its division (`isa.passes`). Fused attention is
  written out first (decompose-attention); masked scores (-inf) give 0;
- `norm=rms`: LayerNorm as RMSNorm plus its bias: no mean, one pass over the row fewer.

What each costs in accuracy is measured by `benchmarks/binarized.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from tcc.ir.graph import Graph

from .base import Pass, PassContext, PassResult, option
from .decompose_attention import DecomposeAttention
from .finetune import TrainingOptions, train, trained_weights, training_data, with_weights
from .rewrite import Rewriter


@dataclass(frozen=True)
class SimplifyNonlinear(Pass, TrainingOptions):
    name = "simplify-nonlinear"
    summary = "hardware-friendly GELU, attention softmax and norm (BMT), fine-tuned when training data is given"

    gelu: Literal["keep", "relu", "hard"] = option("keep", "GELU as it is, as ReLU, or as x * clip(3x/8 + 1/2, 0, 1)")
    softmax: Literal["keep", "relu"] = option("keep", "an attention softmax as it is, or as relu(scores) / keys")
    norm: Literal["keep", "rms"] = option("keep", "LayerNorm as it is, or as RMSNorm plus its bias")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        original = graph
        if self.softmax != "keep":
            graph = DecomposeAttention().run(graph, ctx).graph
        teacher = graph
        users = graph.users()
        rw = Rewriter(graph)
        done: dict[str, int] = {}
        for op in graph.ops:
            dtype = op.type.dtype.numpy
            if op.kind == "gelu" and self.gelu != "keep":
                x = op.operands[0]
                if self.gelu == "relu":
                    y = rw.op("relu", x, name=op.result)
                else:
                    def const(what: str, value: float) -> str:
                        return rw.constant(f"{op.result}.{what}", np.asarray(value, dtype))
                    gate = rw.op("mul", x, const("slope", 0.375), name=f"{op.result}.sloped")
                    gate = rw.op("add", gate, const("half", 0.5), name=f"{op.result}.centred")
                    gate = rw.op("maximum", gate, const("zero", 0.0), name=f"{op.result}.low")
                    gate = rw.op("minimum", gate, const("one", 1.0), name=f"{op.result}.gate")
                    y = rw.op("mul", x, gate, name=op.result)
                rw.alias(op.result, y)
                done[f"gelu as {self.gelu}"] = done.get(f"gelu as {self.gelu}", 0) + 1
            elif op.kind == "softmax" and self.softmax == "relu" and op.attr("dim") in (-1, op.type.rank - 1) and \
                    any(u.kind == "matmul" and u.operands[0] == op.result for u in users[op.result]):
                keys = op.type.shape[-1]
                positive = rw.op("relu", op.operands[0], name=f"{op.result}.relu")
                per_key = rw.constant(f"{op.result}.keys", np.asarray(1 / keys, dtype))
                rw.alias(op.result, rw.op("mul", positive, per_key, name=op.result))
                done["attention softmax as relu / keys"] = done.get("attention softmax as relu / keys", 0) + 1
            elif op.kind == "layer_norm" and self.norm == "rms":
                x, *params = op.operands
                weight, bias = (params + [None, None])[:2]
                y = rw.op("rms_norm", x, *([weight] if weight else []),
                          name=op.result if bias is None else f"{op.result}.rms",
                          normalized_shape=op.attr("normalized_shape"), eps=op.attr("eps"))
                if bias is not None:
                    y = rw.op("add", y, bias, name=op.result)
                rw.alias(op.result, y)
                done["layer norm as rms norm"] = done.get("layer norm as rms norm", 0) + 1
            else:
                rw.keep(op)
        if not done:
            ctx.note("nothing to simplify")
            return PassResult(original, False)
        out = rw.finish()
        ctx.note(", ".join(f"{n} {what}" for what, n in done.items()))
        data = training_data(ctx, out, self)
        if data is not None:
            module = train(out, ctx, self, data, desc=self.name, teacher=teacher)
            out = with_weights(out, trained_weights(module, out))
            ctx.note(f"fine-tuned on {data.source} ({len(data)} examples, {self.epochs} epochs"
                     f"{', distilled' if self.distill else ''})")
        return PassResult(out, True)
