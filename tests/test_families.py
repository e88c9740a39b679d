"""Transformer families a user brings (issue 19): Hugging Face and torch.nn models built from
small configs compile and match eager; what still fails is listed in the README."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import tcc
from conftest import assert_tiers_agree, built, eager_outputs
from tcc import zoo
from tcc.passes.layers import choose_layers

EAGER = {"rtol": 1e-5, "atol": 1e-5}  # tcc's fp32 against PyTorch eager (another summation order)


class Splits(nn.Module):
    """`chunk`, `split` by sizes and `unbind` of an activation."""

    def forward(self, x):
        a, b, c = x.chunk(3, dim=-1)
        d, e = torch.split(x, [5, 7], dim=1)
        return a * b + c, d.sum() + e.mean(), x.unbind(0)[1], torch.split(x, 5, dim=1)[2]


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_splits_of_an_activation_are_slices(frontend):
    x = torch.randn(2, 12)
    artifact = tcc.compile(Splits(), (x,), frontend=frontend)
    assert {op.kind for op in artifact.graph.ops} >= {"slice", "select"}
    for got, expected in zip(artifact.run(x), Splits()(x)):
        torch.testing.assert_close(got, expected, **EAGER)


def test_nn_transformer_with_cross_attention_matches_eager():
    model, (src, tgt) = _nn_transformer()
    torch.testing.assert_close(tcc.compile(model, (src, tgt)).run((src, tgt)), model(src, tgt), **EAGER)


SLOW_FAMILIES = ("qwen2", "mistral", "phi", "opt", "xlm-roberta", "mpnet", "mobilebert", "electra", "beit", "hubert")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n
                                  for n in zoo.HF_FAMILIES if n not in zoo.ZOO or n == "roberta"])
def test_families_compile_and_match_eager(name):
    """Before: each stopped on one unsupported op: of its position code (cos/sin of RoPE; abs,
    log, clamp of relative-position buckets), computed from constants alone and now folded; or
    GPT-2's split of its fused qkv projection, now slices; or the `cumsum` of the padding mask
    that RoBERTa, XLM-R and OPT take their position ids from (a row padded at its end here).
    Text models take that padded row; vision and speech encoders the inputs `hf_family` gives."""
    torch.manual_seed(0)
    model, inputs = zoo.hf_family(name)
    model.eval()
    if "input_ids" in inputs:
        inputs = {"input_ids": torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0)),
                  "attention_mask": torch.ones(2, 16, dtype=torch.int64)}
        inputs["input_ids"][1, 12:] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    artifact = tcc.compile(model, inputs)
    torch.testing.assert_close(artifact.run(inputs)["last_hidden_state"], expected, **EAGER)
    if name == "mistral":  # its mask (no padding) is a constant: canonicalize makes it a sliding window
        inputs = {"input_ids": inputs["input_ids"]}
        attention = [op for op in tcc.compile(model, inputs).graph.ops if op.kind == "scaled_dot_product_attention"]
        assert attention and all(op.attr("is_causal") and op.attr("window") == 8 for op in attention)


def _nn_transformer():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           batch_first=True, dropout=0.0).eval()
    return model, (torch.randn(2, 10, 32), torch.randn(2, 6, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in zoo.HF_FAMILIES if n not in zoo.ZOO] + ["nn-transformer"])
def test_families_on_fpga_small(name):
    """The families outside the zoo, int8 on the ISA simulator with every linear on the array:
    the first output correlates with eager >= 0.999 (the zoo's are checked below)."""
    torch.manual_seed(0)
    model, inputs = _nn_transformer() if name == "nn-transformer" else zoo.hf_family(name)
    _check_on_fpga_small(model.eval(), inputs)


def _check_on_fpga_small(model, inputs) -> None:
    expected = eager_outputs(model, inputs)[0]
    artifact = tcc.compile(model, inputs, target="fpga-small")
    got = _first(artifact.run(inputs, on="sim"))
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] >= 0.999
    linears = [op for op in artifact.graph.ops if op.kind == "linear"]
    assert linears and artifact.manifest["accel"]["sections"] >= len(linears)
    assert not [h for h in artifact.manifest["accel"]["host_ops"] if h["op"] == "linear"]


# the zoo's families (issue 19); the others of `zoo.ZOO` are checked alike by test_frontend_zoo and
# test_accel_codegen
FAMILY_ZOO = ["llama", "gpt2", "t5-encoder", "roberta", "whisper-encoder", "wav2vec2", "conformer", "swin"]


def _first(outputs):
    return outputs if isinstance(outputs, torch.Tensor) else next(iter(
        outputs.values() if isinstance(outputs, dict) else outputs))


@pytest.mark.parametrize("name", [n if n in ("llama", "conformer", "swin") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAMILY_ZOO])  # each also runs int8 bit-exact in test_accel_codegen
def test_zoo_family_on_fpga_small(name):
    """int8 on the ISA simulator, every linear on the array (none among the host ops): the first
    output correlates with eager >= 0.999."""
    _check_on_fpga_small(*built(name))


COMPRESSIONS = ["hp-prune{sparsity=0.5},quantize", "block-prune{sparsity=0.5}", "binarize", "quantize{bits=4}"]


@pytest.mark.parametrize("pipeline", COMPRESSIONS)
@pytest.mark.parametrize("name", [n if n in ("llama", "conformer") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAMILY_ZOO])  # a decoder and a speech model by default
def test_compression_on_every_family(name, pipeline):
    """One-shot (random weights, no data): every block linear compressed, the head and the
    convolutions left alone and said so; the compressed model still runs and tracks eager."""
    model, inputs = built(name)
    expected = eager_outputs(model, inputs)[0]
    artifact = tcc.compile(model, inputs, pipeline=pipeline)
    log = "\n".join(artifact.manifest["pass_log"])
    verb = {"hp": "pruned", "bl": "pruned", "bi": "binarized", "qu": "quantized"}[pipeline[:2]]
    keep = verb != "quantized"  # quantize takes the head and input projections too
    chosen = choose_layers(tcc.compile(model, inputs).graph, ".*", keep_head=keep, keep_input=keep, pass_name="t")
    assert re.search(rf"{verb} {len(chosen.chosen)} of {len(chosen.layers)} linear weights", log), log
    if any(op.kind.startswith("conv") for op in artifact.graph.ops) and verb != "quantized":
        assert "dense (" in log and "convolutions are not compressed" in log
    got = _first(artifact.run(inputs))
    assert torch.isfinite(got).all()
    if verb != "binarized":  # one-shot 1-bit weights of a random model keep little of it
        assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] >= 0.5


@pytest.mark.parametrize("name", ["conformer", "llama", "wav2vec2"])
def test_pruned_int8_family_on_the_simulator_agrees_with_the_reference(name):
    """HP-pruned, int8 on fpga-small: the ISA simulator's outputs are the numpy reference's (the
    integer work bit for bit, the host's float ops within the tiers' tolerance)."""
    model, inputs = built(name)
    artifact = tcc.compile(model, inputs, target="fpga-small",
                           pipeline="hp-prune{sparsity=0.5},conv-as-gemm,quantize")
    assert any(str(t.sparsity).startswith("~hp") for _, t in artifact.graph.constants)
    for got, reference in zip(*(torch.utils._pytree.tree_leaves(artifact.run(inputs, on=on))
                                for on in ("sim", "numpy"))):
        assert_tiers_agree(got.numpy(), reference.numpy(), name)


class TwoUnsupported(nn.Module):
    def forward(self, x):
        y = torch.fmod(x, 2.0) + torch.fmod(x, 3.0)
        return torch.sort(y, dim=-1).values + torch.sort(x, dim=-1).values


class Decomposed(nn.Module):
    def forward(self, x):
        return nn.functional.mish(x) * 2


def test_an_op_of_a_decomposition_names_the_users_call():
    """`F.mish` has no converter; decomposed, its `log1p` has none either: the error names mish."""
    with pytest.raises(tcc.TccError, match=r"unsupported op aten\.log1p\.default at node 'log1p' \(F\.mish, "
                                           r"\S*test_families\.py:\d+\)"):
        tcc.compile(Decomposed(), (torch.randn(2, 8),))


class WritesAliasedBuffer(nn.Module):
    """Writes its buffer in place through a view kept as a plain attribute: a non-strict export
    lifts the view as a constant aliasing the buffer, which torch cannot decompose."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 8))
        self.window = self.cache[1:3]

    def forward(self, x):
        self.window.copy_(x)
        return self.cache * 2


def test_a_program_torch_cannot_decompose_is_a_clear_error():
    """Neither lowered as exported nor decomposable: one TccError naming the op and torch's
    reason (it was an AssertionError from torch, reported as a bug in tcc)."""
    ep = torch.export.export(WritesAliasedBuffer(), (torch.randn(2, 8),), strict=False)
    with pytest.raises(tcc.TccError) as caught:
        tcc.compile(ep)
    message = str(caught.value)
    assert message.startswith("unsupported op aten.copy_.default at node 'copy_' (") and "\n" not in message
    assert "; torch cannot decompose the program either (AssertionError: " in message


def test_every_unsupported_op_is_named_at_once():
    """One line: each unsupported op with its first node and the model's line (here, this file),
    and how many more nodes have it; ops downstream of one are not reported again."""
    with pytest.raises(tcc.TccError) as caught:
        tcc.compile(TwoUnsupported(), (torch.randn(2, 8),))
    message = str(caught.value)
    assert message.startswith("2 unsupported ops: aten.fmod.Scalar at node 'fmod' (") and "\n" not in message
    assert "(and 1 more like it); aten.sort.default at node 'sort_1' (" in message
    assert message.count("test_families.py:") == 2
