"""simplify-nonlinear, BMT's hardware-friendly components: golden rewrites, each replacement's
semantics against numpy, idempotence, and fine-tuning that wins back what a replacement costs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from scipy import special

import tcc
from tcc.evaluate import evaluate
from tcc.ir import parse_graph, print_graph
from tcc.passes import Dataset, PassContext, SimplifyNonlinear
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime.torch_executor import TorchExecutor
from tcc.zoo import digits_data, train_digits

SOURCE = textwrap.dedent("""
    graph @main(%x: f32[2,4,8], %q: f32[1,2,4,4], %k: f32[1,2,4,4], %v: f32[1,2,4,4]) {
      const @g : f32[8]
      const @b : f32[8]
      %n = layer_norm(%x, @g, @b) {normalized_shape = [8]} : f32[2,4,8]
      %h = gelu(%n) : f32[2,4,8]
      %a = scaled_dot_product_attention(%q, %k, %v) : f32[1,2,4,4]
      return %h, %a
    }
    """).lstrip("\n")

EVERYTHING = textwrap.dedent("""
    graph @main(%x: f32[2,4,8], %q: f32[1,2,4,4], %k: f32[1,2,4,4], %v: f32[1,2,4,4]) {
      const @g : f32[8]
      const @b : f32[8]
      const @a.scale : f32[]
      const @h.slope : f32[]
      const @h.half : f32[]
      const @h.zero : f32[]
      const @h.one : f32[]
      const @a.probs.keys : f32[]
      %n.rms = rms_norm(%x, @g) {normalized_shape = [8], eps = 1e-05} : f32[2,4,8]
      %n = add(%n.rms, @b) : f32[2,4,8]
      %h.sloped = mul(%n, @h.slope) : f32[2,4,8]
      %h.centred = add(%h.sloped, @h.half) : f32[2,4,8]
      %h.low = maximum(%h.centred, @h.zero) : f32[2,4,8]
      %h.gate = minimum(%h.low, @h.one) : f32[2,4,8]
      %h = mul(%n, %h.gate) : f32[2,4,8]
      %a.kt = transpose(%k) {dim0 = -2, dim1 = -1} : f32[1,2,4,4]
      %a.scores = matmul(%q, %a.kt) : f32[1,2,4,4]
      %a.scaled = mul(%a.scores, @a.scale) : f32[1,2,4,4]
      %a.probs.relu = relu(%a.scaled) : f32[1,2,4,4]
      %a.probs = mul(%a.probs.relu, @a.probs.keys) : f32[1,2,4,4]
      %a = matmul(%a.probs, %v) : f32[1,2,4,4]
      return %h, %a
    }
    """).lstrip("\n")


def graph():
    rng = np.random.default_rng(0)
    return parse_graph(SOURCE, {"g": rng.standard_normal(8).astype(np.float32),
                                "b": rng.standard_normal(8).astype(np.float32)})


def test_golden_every_component_replaced_and_keep_changes_nothing():
    out = SimplifyNonlinear(gelu="hard", softmax="relu", norm="rms")(graph(), PassContext())
    assert print_graph(out) == EVERYTHING
    result = SimplifyNonlinear().run(graph(), PassContext())
    assert not result.changed and print_graph(result.graph) == SOURCE


@pytest.mark.parametrize("options", [dict(gelu="relu"), dict(gelu="hard"), dict(softmax="relu"), dict(norm="rms")])
def test_each_replacement_computes_what_it_says_and_is_idempotent(options):
    rng = np.random.default_rng(1)
    source = graph()
    inputs = [rng.standard_normal(t.shape).astype(np.float32) for _, t in source.inputs]
    ctx = PassContext()
    out = SimplifyNonlinear(**options)(source, ctx)
    assert SimplifyNonlinear(**options).run(out, ctx).changed is False
    x, q, k, v = inputs
    g, b = (np.asarray(source.weights[n]) for n in ("g", "b"))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    norm = (x - mean) / np.sqrt(var + 1e-5) * g + b
    if options.get("norm") == "rms":
        norm = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g + b
    gelu = {"relu": np.maximum(norm, 0), "hard": norm * np.clip(0.375 * norm + 0.5, 0, 1)}.get(
        options.get("gelu"), norm * 0.5 * (1 + special.erf(norm / np.sqrt(2))))
    scores = q @ np.swapaxes(k, -1, -2) / 2  # 1 / sqrt(4)
    exps = np.exp(scores - scores.max(-1, keepdims=True))
    probs = np.maximum(scores, 0) / 4 if options.get("softmax") == "relu" else exps / exps.sum(-1, keepdims=True)
    h, a = NumpyExecutor(out)(*inputs)
    np.testing.assert_allclose(h, gelu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, probs @ v, rtol=1e-5, atol=1e-5)


def test_fine_tuning_wins_back_relu_attention():
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = digits_data()
    model = train_digits(x_train[:512], y_train[:512], epochs=15)
    test = Dataset((x_test,), y_test, "digits test")
    train = Dataset((x_train[:512],), y_train[:512], "digits train")

    def accuracy(pipeline: str) -> float:
        return evaluate(tcc.compile(model, (x_test[:64],), pipeline=pipeline, train_data=train), test)["accuracy"]

    fp32 = accuracy("dce")
    swapped = accuracy("simplify-nonlinear{softmax=relu,epochs=0}")
    tuned = accuracy("simplify-nonlinear{softmax=relu,epochs=6}")
    assert swapped < fp32 - 0.05 and tuned > swapped + 0.05 and tuned > fp32 - 0.03, (fp32, swapped, tuned)
    ctx = PassContext(torch_module=TorchExecutor)
    SimplifyNonlinear(softmax="relu", epochs=0)(tcc.compile(model, (x_test[:64],)).graph, ctx)
    assert ctx.log[-1] == "simplify-nonlinear: changed; 2 attention softmax as relu / keys"
