"""Model zoo: small Transformers (encoders, and a Llama-style decoder) with random weights, used by tests, examples and
benchmarks. Each entry builds `(model, example_inputs)` where example_inputs is a tuple of
positional tensors or a dict of keyword tensors. Hugging Face models are built from configs
(no download)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BertStyleLayer(nn.Module):
    """A post-norm encoder layer written out op by op (traceable by torch.fx.symbolic_trace)."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(self.dropout(F.softmax(scores, dim=-1)), v)
        batch, _, seq, _ = context.shape
        context = context.transpose(1, 2).contiguous().view(batch, seq, self.heads * self.head_dim)
        x = self.attn_norm(x + self.dropout(self.attn_out(context)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class BertStyleEncoder(nn.Module):
    """Token + position embeddings, an additive attention mask built from `attention_mask`,
    N post-norm layers and a tanh pooler."""

    def __init__(self, vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
                 max_len: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertStyleLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


class DigitsTransformer(nn.Module):
    """`nn.TransformerEncoder` (batch_first) over the 8 rows of an 8x8 digit image, mean-pooled
    into a 10-way classifier."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, ffn: int = 128, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(images) + self.position)
        return self.head(x.mean(dim=1))


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`, as Llama and Qwen2 normalize."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaStyleLayer(nn.Module):
    """A pre-norm decoder layer as Llama writes it, without rotary embeddings: RMSNorm, causal
    attention through q/k/v/o_proj, RMSNorm, a SiLU-gated MLP (gate/up/down_proj), no biases."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.input_layernorm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(context.transpose(1, 2).reshape(batch, seq, hidden))
        h = self.post_attention_layernorm(x)
        gate = self.gate_proj(h)
        return x + self.down_proj(gate * torch.sigmoid(gate) * self.up_proj(h))  # SiLU(gate) * up


class LlamaStyleDecoder(nn.Module):
    """Token embeddings, N pre-norm `LlamaStyleLayer`s, a final RMSNorm and an LM head; returns
    the logits and the final (normalized) hidden states."""

    def __init__(self, vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaStyleLayer(hidden, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.lm_head(x), x


class FeatureEncoder(nn.Module):
    """`nn.TransformerEncoder` (post-norm, batch_first) straight on feature vectors (no input
    projection: the first layer's attention `in_proj` reads the model input), mean-pooled into a
    classifier."""

    def __init__(self, d_model: int = 32, heads: int = 4, layers: int = 2, ffn: int = 64, classes: int = 5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(features).mean(dim=1))


def digits_data(test_size: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 real images shipped inside the package), scaled to
    [0, 1]: (x_train, x_test, y_train, y_test), split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = (data.images / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=test_size, random_state=0)
    return tuple(torch.from_numpy(a) for a in (x_train, x_test, y_train, y_test))


def residual_stream(rows: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Synthetic activations as an encoder's layer norms see them (a residual stream plus a
    sublayer's output): per-row offsets ~ N(0, 2) and spreads from 0.3 to 4, three outlier
    channels six times larger, quantized to i16 at their range. Returns (x: i16 [rows, width],
    scale)."""
    x = rng.normal(0, 1, (rows, width)) * rng.uniform(0.3, 4, (rows, 1)) + rng.normal(0, 2, (rows, 1))
    x[:, :3] *= 6
    scale = float(np.abs(x).max() / 32767)
    return np.rint(x / scale).astype(np.int16), scale


def train_digits(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> DigitsTransformer:
    """A DigitsTransformer trained on (x, y) with AdamW (about 3 s on two cores)."""
    torch.manual_seed(seed)
    model = DigitsTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _token_inputs(batch: int, seq: int, vocab: int, with_mask: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator)}
    if with_mask:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[:, seq - seq // 4:] = 0
        inputs["attention_mask"] = mask
    return inputs


def bert_style():
    model = BertStyleEncoder()
    inputs = _token_inputs(2, 16, 100)
    return model, (inputs["input_ids"], inputs["attention_mask"])


def transformer_encoder():
    model = DigitsTransformer()
    return model, (torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)),)


def llama_style():
    model = LlamaStyleDecoder()
    return model, (_token_inputs(2, 12, 100, with_mask=False)["input_ids"],)


def feature_encoder():
    model = FeatureEncoder()
    return model, (torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0)),)


def _hf_bert(hidden: int, layers: int, heads: int, ffn: int, vocab: int, seq: int, batch: int = 1, **extra):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=max(512, seq), **extra)
    return BertModel(config), _token_inputs(batch, seq, vocab)


def hf_bert():
    return _hf_bert(hidden=64, layers=2, heads=4, ffn=128, vocab=200, seq=16, batch=2)


def tinybert4():
    """TinyBERT-4 shape (4 x 312, 12 heads, FFN 1200) with a small vocabulary."""
    return _hf_bert(hidden=312, layers=4, heads=12, ffn=1200, vocab=1000, seq=32)


def bert_base():
    """BERT-base shape (12 x 768, 12 heads, FFN 3072, vocab 30522), sequence 128: benchmarks only."""
    return _hf_bert(hidden=768, layers=12, heads=12, ffn=3072, vocab=30522, seq=128)


def hf_distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    config = DistilBertConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    return DistilBertModel(config), _token_inputs(2, 16, 200)


def hf_vit():
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ViTModel(config, add_pooling_layer=True), {"pixel_values": pixels}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    symbolic_trace: bool  # torch.fx.symbolic_trace handles it as is
    needs_transformers: bool


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("bert-style", bert_style, True, False),
    ZooEntry("transformer-encoder", transformer_encoder, False, False),
    ZooEntry("llama-style", llama_style, True, False),
    ZooEntry("feature-encoder", feature_encoder, False, False),
    ZooEntry("hf-bert", hf_bert, False, True),
    ZooEntry("tinybert4", tinybert4, False, True),
    ZooEntry("hf-distilbert", hf_distilbert, False, True),
    ZooEntry("hf-vit", hf_vit, False, True),
)}
BENCHMARK_MODELS = {"bert-base": bert_base}


def build(name: str) -> tuple[nn.Module, Any]:
    """Build zoo model `name` in eval mode with a fixed seed."""
    torch.manual_seed(0)
    builder = ZOO[name].build if name in ZOO else BENCHMARK_MODELS[name]
    model, inputs = builder()
    return model.eval(), inputs
