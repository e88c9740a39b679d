"""Constant subgraphs are evaluated before lowering (issue 19's first step): whatever depends
only on parameters, buffers, constants and static shapes is computed in torch and enters the IR
as a named constant, converter or not; what is not safe or not worth folding stays an op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tcc
from tcc.frontend import lowering

EAGER = {"rtol": 1e-5, "atol": 1e-5}  # tcc's fp32 against PyTorch eager (another summation order)


class RotaryAttention(nn.Module):
    """Attention with rotary position embeddings computed from a buffer and the static sequence
    length: the tables are computed once, in torch, not on every run."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d // heads, 2).float() / (d // heads)),
                             persistent=False)

    @staticmethod
    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        freqs = torch.outer(torch.arange(s, dtype=torch.float32), self.inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        cos, sin = table.cos(), table.sin()
        q, k, v = (f(x).view(b, s, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = q * cos + self.rotate(q) * sin, k * cos + self.rotate(k) * sin
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


@pytest.fixture(scope="module")
def rotary():
    torch.manual_seed(0)
    return RotaryAttention().eval(), torch.randn(2, 16, 32)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_rotary_tables_become_constants_and_match_eager(rotary, frontend):
    model, x = rotary
    graph = tcc.compile(model, (x,), frontend=frontend, pipeline="").graph
    kinds = {op.kind for op in graph.ops}
    assert not kinds & {"cos", "sin", "arange"} and {"cos", "sin"} <= {name for name, _ in graph.constants}
    assert {"q.weight", "k.weight", "v.weight", "o.weight"} <= set(graph.constant_names)  # the weights keep names
    artifact = tcc.compile(model, (x,), frontend=frontend)
    torch.testing.assert_close(artifact.run(x), model(x), **EAGER)


class SortedBias(nn.Module):
    """A bias computed from a buffer by ops without a converter (sort, fmod)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.fmod(torch.sort(self.table).values, 1.0)


def test_ops_without_a_converter_are_folded_when_constant_and_named_when_not(monkeypatch):
    torch.manual_seed(0)
    model, x = SortedBias().eval(), torch.randn(2, 8)
    torch.testing.assert_close(tcc.compile(model, (x,)).run(x), model(x), **EAGER)
    monkeypatch.setattr(lowering, "fold_node", lambda *args: None)  # the control: the converter table alone
    with pytest.raises(tcc.TccError, match="unsupported op aten.sort.default at node 'sort'"):
        tcc.compile(model, (x,))


class Kept(nn.Module):
    """A transposed parameter, random noise and a buffer expanded far beyond its size: none of
    them is folded."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("row", torch.arange(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = self.row.expand(1 << 18, 8)  # 2M elements from 8
        return x @ self.w.t() + big[: x.shape[0]]


def test_layout_of_a_parameter_and_large_results_stay_ops(monkeypatch):
    torch.manual_seed(0)
    model, x = Kept().eval(), torch.randn(4, 8)
    folded, fold = [], lowering.fold_node

    def spy(lowerer, node, args, kwargs):
        result = fold(lowerer, node, args, kwargs)
        folded.extend([node.name] if result is not None else [])
        return result
    monkeypatch.setattr(lowering, "fold_node", spy)
    graph = tcc.compile(model, (x,), pipeline="").graph
    assert folded == [] and all(t.numel < 1 << 18 for _, t in graph.constants)
    torch.testing.assert_close(tcc.compile(model, (x,)).run(x), model(x), **EAGER)


def test_random_ops_are_never_evaluated_ahead():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand(4, 8)

    with pytest.raises(tcc.TccError, match="unsupported op aten.rand"):
        tcc.compile(Noisy(), (torch.zeros(4, 8),))
