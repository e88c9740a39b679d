"""Transformer families a user brings (issue 19): Hugging Face and torch.nn models built from
small configs compile and match eager; what still fails is listed in the README."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tcc

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
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           batch_first=True, dropout=0.0).eval()
    src, tgt = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    torch.testing.assert_close(tcc.compile(model, (src, tgt)).run((src, tgt)), model(src, tgt), **EAGER)


HF_FAMILIES = ["llama", "gpt2", "t5-encoder", "deberta-v2", "roberta", "qwen2", "mistral", "phi", "xlm-roberta", "opt"]


def _hf(name: str) -> nn.Module:
    import transformers  # a dependency of tcc (the zoo's Hugging Face models): never skipped
    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    config = {
        "llama": lambda: transformers.LlamaConfig(**small, num_key_value_heads=2),  # GQA, RoPE, RMSNorm, SwiGLU
        "qwen2": lambda: transformers.Qwen2Config(**small, num_key_value_heads=2),
        "mistral": lambda: transformers.MistralConfig(**small, num_key_value_heads=2, sliding_window=8),
        "phi": lambda: transformers.PhiConfig(**small),
        "t5-encoder": lambda: transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4),  # relative-position buckets
        "deberta-v2": lambda: transformers.DebertaV2Config(**small),  # relative positions, log buckets
        "roberta": lambda: transformers.RobertaConfig(**small),  # position ids: cumsum of the padding mask
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**small),
        "opt": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64,
                                              word_embed_proj_dim=32),  # positions: cumsum of the mask
        "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0),  # split of the fused qkv
    }[name]()
    config.use_cache = False
    model_class = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "mistral": "MistralModel", "phi": "PhiModel",
                   "t5-encoder": "T5EncoderModel", "deberta-v2": "DebertaV2Model", "gpt2": "GPT2Model",
                   "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel", "opt": "OPTModel"}[name]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("qwen2", "mistral", "phi", "xlm-roberta", "opt") else n
                                  for n in HF_FAMILIES])
def test_families_compile_and_match_eager(name):
    """Before: each stopped on one unsupported op: of its position code (cos/sin of RoPE; abs,
    log, clamp of relative-position buckets), computed from constants alone and now folded; or
    GPT-2's split of its fused qkv projection, now slices; or the `cumsum` of the padding mask
    that RoBERTa, XLM-R and OPT take their position ids from (a row padded at its end here)."""
    model = _hf(name)
    inputs = {"input_ids": torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(2, 16, dtype=torch.int64)}
    inputs["input_ids"][1, 12:] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    expected = model(**inputs).last_hidden_state
    out = tcc.compile(model, inputs).run(inputs)
    torch.testing.assert_close(out["last_hidden_state"], expected, **EAGER)
    if name in ("llama", "gpt2", "roberta"):  # and int8 on the accelerator, its linears on the array
        artifact = tcc.compile(model, inputs, target="fpga-small")
        got = artifact.run(inputs, on="sim")["last_hidden_state"]
        assert artifact.manifest["accel"]["sections"] >= 8  # the projections and MLPs of both layers
        assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] >= 0.999


class TwoUnsupported(nn.Module):
    def forward(self, x):
        y = torch.fmod(x, 2.0) + torch.fmod(x, 3.0)
        return torch.sort(y, dim=-1).values + torch.sort(x, dim=-1).values


def test_every_unsupported_op_is_named_at_once():
    """One line: each unsupported op with its first node and the model's line (here, this file),
    and how many more nodes have it; ops downstream of one are not reported again."""
    with pytest.raises(tcc.TccError) as caught:
        tcc.compile(TwoUnsupported(), (torch.randn(2, 8),))
    message = str(caught.value)
    assert message.startswith("2 unsupported ops: aten.fmod.Scalar at node 'fmod' (") and "\n" not in message
    assert "(and 1 more like it); aten.sort.default at node 'sort_1' (" in message
    assert message.count("test_families.py:") == 2
