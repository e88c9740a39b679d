"""Model zoo: small Transformers (encoders, and a Llama-style decoder) with random weights, used by tests, examples and
benchmarks. Each entry builds `(model, example_inputs)` where example_inputs is a tuple of
positional tensors or a dict of keyword tensors. Hugging Face models are built from configs
(no download); `hf_family` builds more of them (`HF_FAMILIES`: decoders, text, vision and
speech encoders) with the inputs each takes, from the small sizes shared below (`_LAYERS`,
`_TEXT`, `_VISION`, `_SEQ2SEQ`, `_WAV2VEC2`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

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

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask_bias is not None:
            scores = scores + mask_bias
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


class SpeechTransformer(nn.Module):
    """A speech recognizer for CTC: log-mel features `[B, mels, frames]` -> batch norm of each mel
    band (the features' scale, learned) -> two stride-2 conv1d subsampling layers (ReLU) ->
    learned positions -> N post-norm encoder layers (separate q, k,
    v and output linears, GELU FFN: the layer kinds the systolic-pruning study prunes apart) ->
    a linear CTC head: per-frame logits `[B, frames / 4, vocab]`."""

    def __init__(self, mels: int = 40, frames: int = 200, d_model: int = 64, heads: int = 4, layers: int = 2,
                 ffn: int = 128, vocab: int = 28):
        super().__init__()
        self.features = nn.BatchNorm1d(mels)
        self.subsample1 = nn.Conv1d(mels, d_model, 3, stride=2, padding=1)
        self.subsample2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.position = nn.Parameter(torch.zeros(1, -(-frames // 4), d_model))
        self.layers = nn.ModuleList(BertStyleLayer(d_model, heads, ffn) for _ in range(layers))
        self.ctc_head = nn.Linear(d_model, vocab)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.subsample2(F.relu(self.subsample1(self.features(features))))).transpose(1, 2) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.ctc_head(x)


class DigitsTransformer(nn.Module):
    """`nn.TransformerEncoder` (batch_first) over the 8 rows of an 8x8 digit image, mean-pooled
    into a 10-way classifier; its FFN's `activation` "relu" (torch's default) or "gelu"."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, ffn: int = 128, classes: int = 10,
                 activation: str = "relu"):
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True, activation=activation)
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


class ConformerConvModule(nn.Module):
    """The Conformer's convolution module: LayerNorm, pointwise conv to 2C, GLU, depthwise conv,
    BatchNorm, SiLU, pointwise conv (on `[B, T, C]`, convolving over T)."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_out = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)
        h = F.silu(self.batch_norm(self.depthwise(h)))
        return self.pointwise_out(h).transpose(1, 2)


class ConformerFeedForward(nn.Module):
    """LayerNorm, linear, SiLU (swish), linear: the Conformer's half-step FFN."""

    def __init__(self, d_model: int, ffn: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(self.norm(x))))


class ConformerBlock(nn.Module):
    """Gulati et al. 2020: x + FFN/2, + multi-head self-attention (q/k/v/out linears, SDPA),
    + convolution module, + FFN/2, LayerNorm."""

    def __init__(self, d_model: int, heads: int, ffn: int, kernel: int):
        super().__init__()
        self.heads = heads
        self.ffn_in = ConformerFeedForward(d_model, ffn)
        self.attn_norm = nn.LayerNorm(d_model)
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.conv = ConformerConvModule(d_model, kernel)
        self.ffn_out = ConformerFeedForward(d_model, ffn)
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn_in(x)
        batch, time, d_model = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(batch, time, self.heads, -1).transpose(1, 2)
                   for p in (self.linear_q, self.linear_k, self.linear_v))
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, time, d_model)
        x = x + self.linear_out(context)
        x = x + self.conv(x)
        return self.final_norm(x + 0.5 * self.ffn_out(x))


class ConformerCTC(nn.Module):
    """Log-mel features `[B, mels, T]` -> two stride-2 conv1d subsampling layers (SiLU) -> N
    Conformer blocks -> a linear CTC head over characters: per-frame logits `[B, T/4, vocab]`."""

    def __init__(self, mels: int = 16, d_model: int = 32, heads: int = 4, ffn: int = 64, layers: int = 2,
                 kernel: int = 7, vocab: int = 30):
        super().__init__()
        self.subsample1 = nn.Conv1d(mels, d_model, 3, stride=2, padding=1)
        self.subsample2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ConformerBlock(d_model, heads, ffn, kernel) for _ in range(layers))
        self.ctc_head = nn.Linear(d_model, vocab)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.subsample2(F.silu(self.subsample1(features)))).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.ctc_head(x)


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


def train_digits(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0,
                 activation: str = "relu") -> DigitsTransformer:
    """A DigitsTransformer (its FFN's `activation`) trained on (x, y) with AdamW (about 3 s on two cores)."""
    torch.manual_seed(seed)
    model = DigitsTransformer(activation=activation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def train_speech(x: torch.Tensor, texts: list[str], vocab: tuple[str, ...], *, epochs: int = 40, batch: int = 16,
                 lr: float = 2e-3, seed: int = 0, width: int = 64,
                 on_epoch: Callable[[int, float, SpeechTransformer], None] | None = None) -> SpeechTransformer:
    """A SpeechTransformer `width` wide (heads of 16, an FFN twice as wide) trained with the CTC
    loss on log-mel features `x` [N, mels, frames] and their transcripts over `vocab` (AdamW,
    one-cycle schedule, gradients clipped at 1); `on_epoch(epoch, mean loss, model)` after each
    epoch."""
    from tcc.passes.tasks import CTC
    task = CTC(tuple(vocab))
    torch.manual_seed(seed)
    model = SpeechTransformer(mels=x.shape[1], frames=x.shape[2], d_model=width, heads=width // 16, ffn=2 * width,
                              vocab=len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(x) // batch),
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for index in torch.randperm(len(x), generator=generator).split(batch):
            loss = task.loss(model(x[index]), [texts[i] for i in index])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        if on_epoch is not None:
            on_epoch(epoch, total / len(x), model)
    return model.eval()


def _token_inputs(batch: int, seq: int, vocab: int, with_mask: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator)}
    if with_mask:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[:, seq - seq // 4:] = 0
        inputs["attention_mask"] = mask
    return inputs


def _randn(*shape: int) -> torch.Tensor:
    """Standard normal values of `shape`, from a generator of their own seeded with 0."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# The small Hugging Face sizes, in one place: layers (hidden 32, FFN 64, 2 layers, 4 heads), text
# (vocabulary 128, 64 positions), vision (32x32 images of 8x8 patches), encoder-decoder models
# (their own names for the same sizes, one decoder layer) and Wav2Vec2's convolutions on raw audio.
_LAYERS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TEXT = dict(_LAYERS, vocab_size=128, max_position_embeddings=64)
_VISION = dict(_LAYERS, image_size=32, patch_size=8, num_channels=3)
_SEQ2SEQ = dict(vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4)
_WAV2VEC2 = dict(_LAYERS, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4, vocab_size=32)


def _text() -> dict[str, torch.Tensor]:
    """Token ids [2, 16] (none of them a padding id: RoBERTa and OPT count positions from it) and
    an attention mask masking the last quarter."""
    inputs = _token_inputs(2, 16, 128)
    inputs["input_ids"].clamp_(min=3)
    return inputs


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": _randn(2, 3, 32, 32)}


def _audio() -> dict[str, torch.Tensor]:
    """0.1 s of 16 kHz audio, two clips."""
    return {"input_values": _randn(2, 1600)}


def bert_style():
    model = BertStyleEncoder()
    inputs = _token_inputs(2, 16, 100)
    return model, (inputs["input_ids"], inputs["attention_mask"])


def transformer_encoder():
    model = DigitsTransformer()
    return model, (_randn(4, 8, 8),)


def llama_style():
    model = LlamaStyleDecoder()
    return model, (_token_inputs(2, 12, 100, with_mask=False)["input_ids"],)


def feature_encoder():
    model = FeatureEncoder()
    return model, (_randn(2, 6, 32),)


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
    return ViTModel(config, add_pooling_layer=True), _pixels()


def speech_transformer():
    """The speech Transformer of `examples/speech` (untrained), on 2 s of log-mel features."""
    return SpeechTransformer(), (_randn(2, 40, 200),)


def conformer():
    """A small Conformer-CTC with batch-norm statistics as if trained (not 0 and 1)."""
    model = ConformerCTC()
    generator = torch.Generator().manual_seed(1)
    for block in model.blocks:
        block.conv.batch_norm.running_mean.copy_(torch.randn(32, generator=generator) * 0.1)
        block.conv.batch_norm.running_var.copy_(torch.rand(32, generator=generator) + 0.5)
    return model, (_randn(2, 16, 48),)


class _Family(NamedTuple):
    config: Callable[[Any], Any]  # the transformers module -> a config
    model: str  # the model class in transformers
    inputs: Callable[[], dict[str, torch.Tensor]]
    encoder: bool = False  # the encoder (`get_encoder()`) of an encoder-decoder model


_FAMILIES: dict[str, _Family] = {
    # decoders
    "llama": _Family(lambda t: t.LlamaConfig(**_TEXT, num_key_value_heads=2), "LlamaModel", _text),
    "qwen2": _Family(lambda t: t.Qwen2Config(**_TEXT, num_key_value_heads=2), "Qwen2Model", _text),
    "mistral": _Family(lambda t: t.MistralConfig(**_TEXT, num_key_value_heads=2, sliding_window=8), "MistralModel",
                       _text),
    "phi": _Family(lambda t: t.PhiConfig(**_TEXT), "PhiModel", _text),
    "gpt2": _Family(lambda t: t.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0), "GPT2Model", _text),
    "opt": _Family(lambda t: t.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
                   "OPTModel", _text),
    # text encoders
    "t5-encoder": _Family(lambda t: t.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                          "T5EncoderModel", _text),
    "deberta-v2": _Family(lambda t: t.DebertaV2Config(**_TEXT), "DebertaV2Model", _text),
    "roberta": _Family(lambda t: t.RobertaConfig(**_TEXT), "RobertaModel", _text),
    "xlm-roberta": _Family(lambda t: t.XLMRobertaConfig(**_TEXT), "XLMRobertaModel", _text),
    "mobilebert": _Family(lambda t: t.MobileBertConfig(**_TEXT, embedding_size=16, intra_bottleneck_size=16),
                          "MobileBertModel", _text),
    # special ids inside the small vocabulary; eos 2 pools at the argmax of input_ids (CLIP's first rule)
    "clip-text": _Family(lambda t: t.CLIPTextConfig(**_TEXT, bos_token_id=0, eos_token_id=2), "CLIPTextModel", _text),
    "albert": _Family(lambda t: t.AlbertConfig(**_TEXT, embedding_size=16), "AlbertModel", _text),
    "electra": _Family(lambda t: t.ElectraConfig(**_TEXT, embedding_size=16), "ElectraModel", _text),
    "bart-encoder": _Family(lambda t: t.BartConfig(**_SEQ2SEQ, max_position_embeddings=64), "BartModel", _text,
                            encoder=True),
    "mpnet": _Family(lambda t: t.MPNetConfig(**_TEXT), "MPNetModel", _text),
    # vision encoders
    "beit": _Family(lambda t: t.BeitConfig(**_VISION, use_relative_position_bias=True), "BeitModel", _pixels),
    "deit": _Family(lambda t: t.DeiTConfig(**_VISION), "DeiTModel", _pixels),
    "clip-vision": _Family(lambda t: t.CLIPVisionConfig(**_VISION), "CLIPVisionModel", _pixels),
    # speech encoders
    "hubert": _Family(lambda t: t.HubertConfig(**_WAV2VEC2), "HubertModel", _audio),
    "speech2text-encoder": _Family(
        lambda t: t.Speech2TextConfig(**_SEQ2SEQ, max_source_positions=64, max_target_positions=64,
                                      input_feat_per_channel=16, conv_channels=32),
        "Speech2TextModel", lambda: {"input_features": _randn(2, 40, 16)}, encoder=True),
}
HF_FAMILIES = tuple(_FAMILIES)


def hf_family(family: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Hugging Face family (`HF_FAMILIES`) from a small config (random weights, no cache) and
    its inputs: token ids [2, 16] (none of them a padding id) and an attention mask for decoders
    and text encoders, `pixel_values` [2, 3, 32, 32] for vision, `input_values` [2, 1600] (raw
    audio) or `input_features` [2, 40, 16] (filter banks) for speech. Encoder-decoder models
    (BART, Speech2Text) give their encoder."""
    import transformers
    spec = _FAMILIES[family]
    config = spec.config(transformers)
    config.use_cache = False
    model = getattr(transformers, spec.model)(config)
    return (model.get_encoder() if spec.encoder else model), spec.inputs()


def llama():
    """Hugging Face Llama: grouped-query attention (2 kv heads for 4), RoPE, RMSNorm, SwiGLU."""
    model, inputs = hf_family("llama")
    return model, {"input_ids": inputs["input_ids"]}


def whisper_encoder():
    """Hugging Face Whisper's encoder: two conv1d layers (GELU, the second stride 2) over 16
    log-mel bins of 64 frames, sinusoidal positions, pre-norm layers."""
    import transformers
    config = transformers.WhisperConfig(**_SEQ2SEQ, num_mel_bins=16, max_source_positions=32, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel(config).get_encoder(), {"input_features": _randn(2, 16, 64)}


def wav2vec2():
    """Hugging Face Wav2Vec2 on raw 16 kHz audio: a conv1d feature extractor (group norm),
    a grouped convolutional position embedding, post-norm layers."""
    import transformers
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**_WAV2VEC2)), _audio()


def swin():
    """Hugging Face Swin: shifted windows (roll, window partition), patch merging, relative
    position bias, two stages."""
    import transformers
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                     window_size=4)
    return transformers.SwinModel(config), _pixels()


# causal LMs with their LM heads, for generation: transformers' config classes by family
_CAUSAL_LMS = {"llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
               "phi": ("PhiConfig", "PhiForCausalLM", {})}
CAUSAL_LMS = tuple(_CAUSAL_LMS)


def causal_lm(family: str = "llama", **config: Any) -> nn.Module:
    """A Hugging Face causal LM of `CAUSAL_LMS` (LM head included) from a small config (2 x 32,
    4 heads, vocabulary 128, random weights seeded with 0), in eval mode; `config` overrides
    fields. No end-of-sequence id: generation runs to its length."""
    import transformers
    config_class, model_class, extra = _CAUSAL_LMS[family]
    torch.manual_seed(0)
    settings = dict(_TEXT, **extra, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    settings.update(config)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()


def decode_step(model: nn.Module, max_cache: int = 32, batch: int = 1, width: int = 1) -> torch.export.ExportedProgram:
    """`model`'s decode step with a static KV cache of `max_cache` positions, exported as the
    ecosystem does for on-device runtimes (transformers' `TorchExportableModuleForDecoderOnlyLM`):
    `input_ids` [batch, width], `cache_position` [width] -> logits [batch, width, vocab], the
    cache as buffers written in place. `width` > 1: a prefill step of that many prompt tokens."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=max_cache,
                                               cache_config={"batch_size": batch, "max_cache_len": max_cache})
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=batch, max_cache_len=max_cache)
    with warnings.catch_warnings():  # dynamo lists transformers' global collectors as side effects
        warnings.simplefilter("ignore", UserWarning)
        return wrapper.export(input_ids=torch.zeros(batch, width, dtype=torch.long),
                              cache_position=torch.arange(width, dtype=torch.long))


def train_lm(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, epochs: int = 20, batch: int = 32,
             lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """A causal LM of `causal_lm` trained on token windows [examples, length] and their next
    tokens (e.g. `tcc.language.make_corpus`) with AdamW and the LM loss; in eval mode."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        for rows in torch.randperm(len(tokens)).split(batch):
            logits = model(input_ids=tokens[rows]).logits
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[rows].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


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
    ZooEntry("conformer", conformer, True, False),
    ZooEntry("speech-transformer", speech_transformer, True, False),
    ZooEntry("llama", llama, False, True),
    ZooEntry("gpt2", lambda: hf_family("gpt2"), False, True),
    ZooEntry("t5-encoder", lambda: hf_family("t5-encoder"), False, True),
    ZooEntry("roberta", lambda: hf_family("roberta"), False, True),
    ZooEntry("whisper-encoder", whisper_encoder, False, True),
    ZooEntry("wav2vec2", wav2vec2, False, True),
    ZooEntry("swin", swin, False, True),
)}
BENCHMARK_MODELS = {"bert-base": bert_base}


def build(name: str) -> tuple[nn.Module, Any]:
    """Build zoo model `name` in eval mode with a fixed seed."""
    torch.manual_seed(0)
    builder = ZOO[name].build if name in ZOO else BENCHMARK_MODELS[name]
    model, inputs = builder()
    return model.eval(), inputs
