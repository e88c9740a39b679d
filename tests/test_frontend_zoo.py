"""Every zoo model: lowered through torch.export (and torch.fx.symbolic_trace where it applies),
verified, round-tripped through the text form, and equal to torch eager within 1e-5 relative
error on both executors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import built, eager_outputs, has_cuda, max_relative_error
from tcc import zoo
from tcc.frontend import from_module, split_inputs
from tcc.ir import parse_graph, print_graph, verify
from tcc.runtime.numpy_executor import NumpyExecutor
from tcc.runtime.torch_executor import TorchExecutor

CASES = [(name, "export") for name in zoo.ZOO] + [(name, "fx") for name, e in zoo.ZOO.items() if e.symbolic_trace]


def _flat_inputs(inputs, signature):
    args, kwargs = split_inputs(inputs)
    return list(args) + [kwargs[n] for n in signature.input_names if n in kwargs]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{f}" for n, f in CASES])
def lowered(request):
    name, frontend = request.param
    model, inputs = built(name)
    graph, signature = from_module(model, inputs, frontend=frontend)
    return name, model, inputs, graph, signature


def test_graph_verifies_and_round_trips(lowered):
    _, _, _, graph, _ = lowered
    verify(graph)
    text = print_graph(graph)
    again = parse_graph(text, graph.weights)
    assert again.same_as(graph)
    assert print_graph(again) == text


EXECUTORS = ["numpy", "cpu"] + (["gpu"] if has_cuda() else [])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_matches_eager(lowered, executor):
    name, model, inputs, graph, signature = lowered
    expected = eager_outputs(model, inputs)
    flat = _flat_inputs(inputs, signature)
    if executor == "numpy":
        actual = [torch.from_numpy(np.asarray(a)) for a in NumpyExecutor(graph)(*[x.numpy() for x in flat])]
    else:
        device = "cuda" if executor == "gpu" else "cpu"
        actual = [a.cpu() for a in TorchExecutor(graph, device).run(flat)]
    assert len(actual) == len(expected)
    tolerance = 1e-5 if executor != "gpu" else 1e-3  # TF32/fused kernels on GPU
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert max_relative_error(a, e) < tolerance, name


def test_no_dropout_or_clone_survives(lowered):
    _, _, _, graph, _ = lowered
    kinds = {op.kind for op in graph.ops}
    assert kinds <= set(__import__("tcc").ir.OPS)
    assert not any(op.kind == "cast" and op.type == graph.types[op.operands[0]] for op in graph.ops)


def test_attention_mask_construction_is_folded():
    """HF BERT builds position ids and token types from buffers only: no op of the lowered graph
    may depend on constants alone (folding took them)."""
    model, inputs = built("hf-bert")
    graph, _ = from_module(model, inputs)
    constant_only = set(graph.constant_names)
    for op in graph.ops:
        if op.kind in ("full", "arange"):
            constant_only.add(op.result)
            continue
        assert not all(o in constant_only for o in op.operands), f"{op.result} = {op.kind} was not folded"


def test_torch_executor_is_differentiable():
    model, inputs = built("bert-style")
    graph, signature = from_module(model, inputs)
    executor = TorchExecutor(graph, trainable=True)
    hidden, pooled = executor(*_flat_inputs(inputs, signature))
    pooled.square().sum().backward()
    grads = [p.grad for p in executor.parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


def test_unsupported_op_names_op_node_and_module():
    class Sorts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.sort(self.proj(x), dim=-1).values

    from tcc.ir.errors import TccError
    with pytest.raises(TccError) as info:
        from_module(Sorts(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "unsupported op aten.sort" in message and "node 'sort'" in message
    assert "test_frontend_zoo.py" in message  # the source line of the op
