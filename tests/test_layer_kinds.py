"""The roles of linear layers (`passes.layers`): heads, input projections and kinds, exactly, on
every zoo model (golden per model, on the lowered graph and after the canonical passes) and on
random residual networks built to a known ground truth (hypothesis); and the pass log of the
compression passes naming every linear weight they leave alone, with the reason."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcc
from conftest import built
from tcc import zoo
from tcc.frontend import from_module
from tcc.ir import DType, GraphBuilder, tensor
from tcc.passes import BlockPrune, DeadCodeElimination, FoldConstants, HPPrune, PassContext
from tcc.passes.canonicalize import Canonicalize
from tcc.passes.layers import LAYER_KINDS, choose_layers, convolutions, name_list

# -- golden roles of every zoo model -----------------------------------------------------------

BERT = {"attention.self.query.weight": "qkv", "attention.self.key.weight": "qkv",
        "attention.self.value.weight": "qkv", "attention.output.dense.weight": "attn_out",
        "intermediate.dense.weight": "ffn1", "output.dense.weight": "ffn2"}
TORCH_ENCODER = {"self_attn.in_proj_weight": "qkv", "self_attn.out_proj.weight": "attn_out",
                 "linear1.weight": "ffn1", "linear2.weight": "ffn2"}
LLAMA = {"q_proj.weight": "qkv", "k_proj.weight": "qkv", "v_proj.weight": "qkv", "o_proj.weight": "attn_out",
         "gate_proj.weight": "ffn1", "up_proj.weight": "ffn1", "down_proj.weight": "ffn2"}

# model -> (block weight prefix, number of blocks, block weight suffix -> kind, heads, input projections);
# heads and input projections are of kind `other`
BERT_STYLE = {"query.weight": "qkv", "key.weight": "qkv", "value.weight": "qkv", "attn_out.weight": "attn_out",
              "ffn_in.weight": "ffn1", "ffn_out.weight": "ffn2"}
GOLDEN = {
    "bert-style": ("layers.{}.", 2, BERT_STYLE, {"pooler.weight"}, set()),
    "speech-transformer": ("layers.{}.", 2, BERT_STYLE, {"ctc_head.weight"}, set()),
    "transformer-encoder": ("encoder.layers.{}.", 2, TORCH_ENCODER, {"head.weight"}, {"embed.weight"}),
    "llama-style": ("layers.{}.", 2, LLAMA, {"lm_head.weight"}, set()),
    "feature-encoder": ("encoder.layers.{}.", 2, TORCH_ENCODER, {"classifier.weight"}, set()),
    "hf-bert": ("encoder.layer.{}.", 2, BERT, {"pooler.dense.weight"}, set()),
    "tinybert4": ("encoder.layer.{}.", 4, BERT, {"pooler.dense.weight"}, set()),
    "hf-distilbert": ("transformer.layer.{}.", 2, {
        "attention.q_lin.weight": "qkv", "attention.k_lin.weight": "qkv", "attention.v_lin.weight": "qkv",
        "attention.out_lin.weight": "attn_out", "ffn.lin1.weight": "ffn1", "ffn.lin2.weight": "ffn2"}, set(), set()),
    "hf-vit": ("layers.{}.", 2, {
        "attention.q_proj.weight": "qkv", "attention.k_proj.weight": "qkv", "attention.v_proj.weight": "qkv",
        "attention.o_proj.weight": "attn_out", "mlp.fc1.weight": "ffn1", "mlp.fc2.weight": "ffn2"},
        {"pooler.dense.weight"}, set()),
    "conformer": ("blocks.{}.", 2, {
        "ffn_in.linear1.weight": "ffn1", "ffn_in.linear2.weight": "ffn2", "linear_q.weight": "qkv",
        "linear_k.weight": "qkv", "linear_v.weight": "qkv", "linear_out.weight": "attn_out",
        "ffn_out.linear1.weight": "ffn1", "ffn_out.linear2.weight": "ffn2"}, {"ctc_head.weight"}, set()),
    "llama": ("layers.{}.", 2, {f"self_attn.{k}": v for k, v in LLAMA.items() if "proj" in k and k[0] in "qkvo"}
              | {f"mlp.{k}": v for k, v in LLAMA.items() if k[0] in "gud"}, set(), set()),
    "gpt2": ("h.{}.", 2, {"attn.c_attn.weight.t": "qkv", "attn.c_proj.weight.t": "attn_out",  # fused qkv, split
                          "mlp.c_fc.weight.t": "ffn1", "mlp.c_proj.weight.t": "ffn2"}, set(), set()),
    "t5-encoder": ("encoder.block.{}.", 2, {
        "layer.0.SelfAttention.q.weight": "qkv", "layer.0.SelfAttention.k.weight": "qkv",
        "layer.0.SelfAttention.v.weight": "qkv", "layer.0.SelfAttention.o.weight": "attn_out",
        "layer.1.DenseReluDense.wi.weight": "ffn1", "layer.1.DenseReluDense.wo.weight": "ffn2"}, set(), set()),
    "roberta": ("encoder.layer.{}.", 2, BERT, {"pooler.dense.weight"}, set()),
    "whisper-encoder": ("layers.{}.", 2, {
        "self_attn.q_proj.weight": "qkv", "self_attn.k_proj.weight": "qkv", "self_attn.v_proj.weight": "qkv",
        "self_attn.out_proj.weight": "attn_out", "fc1.weight": "ffn1", "fc2.weight": "ffn2"}, set(), set()),
    "wav2vec2": ("encoder.layers.{}.", 2, {
        "attention.q_proj.weight": "qkv", "attention.k_proj.weight": "qkv", "attention.v_proj.weight": "qkv",
        "attention.out_proj.weight": "attn_out", "feed_forward.intermediate_dense.weight": "ffn1",
        "feed_forward.output_dense.weight": "ffn2"}, set(), set()),
    "swin": ("encoder.layers.{}.blocks.{}.", (2, 2), {
        "attention.q_proj.weight": "qkv", "attention.k_proj.weight": "qkv", "attention.v_proj.weight": "qkv",
        "attention.o_proj.weight": "attn_out", "mlp.fc1.weight": "ffn1", "mlp.fc2.weight": "ffn2"}, set(), set()),
}
# linears outside the blocks that are neither heads nor input projections: kind `other`
OTHERS = {"wav2vec2": {"feature_projection.projection.weight"},  # after the conv front end (a weighted op)
          "swin": {"encoder.layers.0.downsample.reduction.weight"}}  # patch merging between stages
# GPT-2's Conv1D is `addmm` by an [in, out] weight: linears (of `weight.t`) only after canonicalize
CANONICAL_ONLY: set[str] = set()
# convolution weights: whether each is in the front end (no linear or attention upstream)
CONVOLUTIONS = {
    "transformer-encoder": {}, "bert-style": {}, "llama-style": {}, "feature-encoder": {}, "hf-bert": {},
    "tinybert4": {}, "hf-distilbert": {}, "llama": {}, "gpt2": {}, "t5-encoder": {}, "roberta": {},
    "hf-vit": {"embeddings.patch_embeddings.projection.weight": True},
    "swin": {"embeddings.patch_embeddings.projection.weight": True},
    "whisper-encoder": {"conv1.weight": True, "conv2.weight": True},
    "wav2vec2": {"feature_extractor.conv_layers.0.conv.weight": True, "feature_extractor.conv_layers.1.conv.weight": True,
                 "encoder.pos_conv_embed.conv.parametrizations.weight.0._weight_norm": False},  # folded weight norm
    "speech-transformer": {"subsample1.weight": True, "subsample2.weight": True},
    "conformer": {"subsample1.weight": True, "subsample2.weight": True}
    | {f"blocks.{i}.conv.{c}.weight": False for i in range(2) for c in ("pointwise_in", "depthwise", "pointwise_out")},
}


def test_every_zoo_model_has_a_golden():
    assert set(GOLDEN) == set(zoo.ZOO) == set(CONVOLUTIONS)


def _expected(name: str) -> dict[str, tuple[str, bool, bool]]:
    prefix, blocks, kinds, heads, inputs = GOLDEN[name]
    indices = [(i, j) for i in range(blocks[0]) for j in range(blocks[1])] if isinstance(blocks, tuple) else \
        [(i,) for i in range(blocks)]
    table = {prefix.format(*i) + suffix: (kind, False, False) for i in indices for suffix, kind in kinds.items()}
    table.update({w: ("other", False, False) for w in OTHERS.get(name, ())})
    table.update({w: ("other", True, w in inputs) for w in heads})
    table.update({w: ("other", w in heads, True) for w in inputs})
    return table


def _roles(graph) -> dict[str, tuple[str, bool, bool]]:
    layers = choose_layers(graph, ".*", keep_head=False, keep_input=False, pass_name="t").layers
    assert len({layer.weight for layer in layers}) == len(layers)  # one entry, so one kind, per weight
    assert all(layer.kind in LAYER_KINDS for layer in layers)
    return {layer.weight: (layer.kind, layer.is_head, layer.is_input) for layer in layers}


@lru_cache(maxsize=None)
def _graph(name: str, frontend: str):
    model, inputs = built(name)
    return from_module(model, inputs, frontend=frontend)[0]


CASES = [(n, "export") for n in zoo.ZOO] + [(n, "fx") for n, e in zoo.ZOO.items() if e.symbolic_trace]


@pytest.mark.parametrize("name,frontend", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_zoo_roles_are_exact(name, frontend):
    graph = _graph(name, frontend)
    assert _roles(graph) == ({} if name in CANONICAL_ONLY else _expected(name))
    canonical = graph
    for p in (DeadCodeElimination(), FoldConstants(), Canonicalize()):
        canonical = p(canonical)
    assert _roles(canonical) == _expected(name)  # the graph the compression passes see
    found = {c.weight: c.front_end for c in convolutions(graph)}
    assert found == CONVOLUTIONS[name]  # and after canonicalize, a batch norm folded into its conv's weight
    assert {c.weight.removesuffix(".bn"): c.front_end for c in convolutions(canonical)} == found


@pytest.mark.parametrize("name,pruned", [
    ("llama-style", ["layers.0.o_proj.weight", "layers.1.o_proj.weight", "layers.0.down_proj.weight",
                     "layers.1.down_proj.weight", "layers.0.q_proj.weight", "layers.1.up_proj.weight"]),
    ("feature-encoder", ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.in_proj_weight",
                         "encoder.layers.1.linear2.weight"]),
])
def test_hp_prune_compresses_the_blocks_and_keeps_the_head(name, pruned):
    """RMSNorm models: o_proj/down_proj feed the residual stream, so they are no heads; an
    encoder fed straight from the input: the first in_proj is attention, no input projection."""
    graph = _graph(name, "export")
    ctx = PassContext()
    out = HPPrune(sparsity=0.5, block=(8, 8))(graph, ctx)
    types = dict(out.constants)
    for weight in pruned:
        assert types[weight].sparsity is not None, weight
        assert np.count_nonzero(out.weights[weight] == 0) >= 0.45 * out.weights[weight].size, weight
    (head,) = GOLDEN[name][3]
    assert types[head].sparsity is None and np.count_nonzero(out.weights[head] == 0) == 0
    n = len(_expected(name))
    assert ctx.log == [f"hp-prune: changed; one-shot (no training data); pruned {n - 1} of {n} linear weights "
                       f"({_share(graph, head):.1f}% of linear weight elements) to ~hp(8, 8, 4), sparsity 0.500; "
                       f"skipped {head} (the model's head, keep_head=true)"]


def _share(graph, *left: str) -> float:
    layers = choose_layers(graph, ".*", keep_head=False, keep_input=False, pass_name="t").layers
    sizes = {layer.weight: graph.types[layer.weight].numel for layer in layers}
    return 100 * sum(v for k, v in sizes.items() if k not in left) / sum(sizes.values())


def test_compile_prunes_llama_style_end_to_end():
    artifact = tcc.compile(*built("llama-style"), pipeline="hp-prune{sparsity=0.5,block=8x8}")
    types = dict(artifact.graph.constants)
    assert all(types[f"layers.{i}.{w}"].sparsity is not None for i in range(2) for w in LLAMA)
    assert types["lm_head.weight"].sparsity is None
    (line,) = [line for line in artifact.manifest["pass_log"] if line.startswith("hp-prune")]
    assert "pruned 14 of 15 linear weights" in line and "skipped lm_head.weight (the model's head" in line


# -- the pass log ------------------------------------------------------------------------------

def test_log_names_what_is_left_and_why_and_second_run_says_already():
    graph = _graph("transformer-encoder", "export")
    ctx = PassContext()
    once = HPPrune(block=(8, 8))(graph, ctx)
    twice = HPPrune(block=(8, 8))(once, ctx)
    assert twice.same_as(once)
    share = _share(graph, "head.weight", "embed.weight")
    assert ctx.log[0] == (f"hp-prune: changed; one-shot (no training data); pruned 8 of 10 linear weights "
                          f"({share:.1f}% of linear weight elements) to ~hp(8, 8, 2), sparsity 0.750; "
                          "skipped embed.weight (an input projection, keep_input=true); "
                          "skipped head.weight (the model's head, keep_head=true)")
    assert ctx.log[1] == ("hp-prune: no change; pruned 0 of 10 linear weights (0.0% of linear weight elements); "
                          "skipped embed.weight (an input projection, keep_input=true); "
                          "skipped 8 weights (already ~hp(8, 8, 2)): encoder.layers.0.self_attn.in_proj_weight, "
                          "encoder.layers.0.self_attn.out_proj.weight, encoder.layers.0.linear1.weight and 5 more; "
                          "skipped head.weight (the model's head, keep_head=true)")


def test_log_names_pattern_misses_and_too_small_weights():
    b = GraphBuilder("g")
    x = b.input("x", tensor((3, 2)))
    y = b.op("linear", x, b.constant("tiny.weight", np.ones((2, 2), np.float32)))
    y = b.op("relu", y)
    y = b.op("linear", y, b.constant("out.weight", np.ones((4, 2), np.float32)))
    graph = b.finish([y])
    ctx = PassContext()
    BlockPrune(sparsity=0.25, layers="tiny", block=(4, 4), keep_head=False, keep_input=False)(graph, ctx)
    assert ctx.log == ["block-prune: changed; one-shot (no training data); pruned 1 of 2 linear weights "
                       "(33.3% of linear weight elements) to ~blocks(4, 4) (other), sparsity 0.000; "
                       "skipped out.weight (not matched by layers=tiny); "
                       "nothing pruned in tiny.weight (too small for ~blocks(4, 4) at this sparsity)"]
    ctx = PassContext()
    BlockPrune(layers="tiny", block=(4, 4), keep_head=False, keep_input=False)(graph, ctx)  # one block, half of it:
    assert ctx.log[0].endswith("; nothing pruned in tiny.weight (too small for ~blocks(4, 4) at this sparsity)")  # kept
    ctx = PassContext()
    HPPrune()(graph, ctx)  # tiny: the input projection; out: the head
    assert ctx.log == ["hp-prune: no change; pruned 0 of 2 linear weights (0.0% of linear weight elements); "
                       "skipped tiny.weight (an input projection, keep_input=true); "
                       "skipped out.weight (the model's head, keep_head=true)"]


def test_name_list_stays_short():
    assert name_list(["a"]) == "a"
    assert name_list(["a", "b"]) == "a and b"
    assert name_list(list("abcd")) == "a, b, c and d"
    assert name_list(list("abcdefg")) == "a, b, c and 4 more"


# -- random residual networks with a known ground truth ----------------------------------------

D, S = 8, 4


class _Net:
    """Builds a residual network op by op and records the role each linear was built for."""

    def __init__(self, rng: np.random.Generator):
        self.b, self.rng = GraphBuilder("net"), rng
        self.truth: dict[str, tuple[str, bool, bool]] = {}
        self.residual_adds: set[str] = set()

    def const(self, name: str, value) -> str:
        return self.b.constant(name, np.asarray(value, np.float32))

    def linear(self, x: str, name: str, out: int, role: tuple[str, bool, bool]) -> str:
        w = self.const(f"{name}.weight", self.rng.standard_normal((out, self.b.type_of(x).shape[-1])))
        self.truth[w] = role
        return self.b.op("linear", x, w)

    def norm(self, x: str, kind: str, name: str) -> str:
        if kind == "layer":
            return self.b.op("layer_norm", x, self.const(f"{name}.w", np.ones(D)), self.const(f"{name}.b", np.zeros(D)),
                             normalized_shape=[D])
        ms = self.b.op("mean", self.b.op("pow", x, self.const(f"{name}.two", 2.0)), dims=[-1], keepdim=True)
        scale = self.b.op("rsqrt", self.b.op("add", ms, self.const(f"{name}.eps", 1e-6)))
        return self.b.op("mul", self.b.op("mul", x, scale), self.const(f"{name}.w", np.ones(D)))

    def residual(self, skip: str, branch: str) -> str:
        out = self.b.op("add", skip, branch)
        self.residual_adds.add(out)
        return out

    def attention(self, x: str, i: int, style: str) -> str:
        q, k, v = (self.linear(x, f"l{i}.{n}", D, ("qkv", False, False)) for n in "qkv")
        if style == "sdpa":
            heads = [self.b.op("reshape", t, shape=[1, 1, S, D]) for t in (q, k, v)]
            context = self.b.op("reshape", self.b.op("scaled_dot_product_attention", *heads), shape=[1, S, D])
        else:
            scores = self.b.op("matmul", q, self.b.op("transpose", k, dim0=-1, dim1=-2))
            probs = self.b.op("softmax", self.b.op("mul", scores, self.const(f"l{i}.scale", D ** -0.5)), dim=-1)
            context = self.b.op("matmul", probs, v)
        return self.linear(context, f"l{i}.o", D, ("attn_out", False, False))

    def ffn(self, x: str, i: int, style: str) -> str:
        up = self.linear(x, f"l{i}.up", 2 * D, ("ffn1", False, False))
        if style == "gated":
            gate = self.linear(x, f"l{i}.gate", 2 * D, ("ffn1", False, False))
            hidden = self.b.op("mul", self.b.op("mul", gate, self.b.op("sigmoid", gate)), up)
        else:
            hidden = self.b.op(style, up)
        return self.linear(hidden, f"l{i}.down", D, ("ffn2", False, False))


@st.composite
def residual_networks(draw):
    net = _Net(np.random.default_rng(draw(st.integers(0, 2 ** 16))))
    b = net.b
    source = draw(st.sampled_from(["features", "tokens", "projected"]))
    if source == "tokens":
        x = b.op("embedding", net.const("embed", np.ones((10, D))), b.input("ids", tensor((1, S), DType.I64)))
    elif source == "features":
        x = b.input("x", tensor((1, S, D)))
    else:  # an input projection, optionally behind a norm, then position embeddings
        x = b.input("x", tensor((1, S, 5)))
        x = net.linear(x, "in_proj", D, ("other", False, True))
        x = b.op("add", x, net.const("pos", np.zeros((S, D))))
    layers = draw(st.lists(st.tuples(st.sampled_from(["pre", "post"]), st.sampled_from(["layer", "rms"]),
                                     st.sampled_from(["sdpa", "matmul"]),
                                     st.sampled_from(["gelu", "relu", "gated"])), min_size=1, max_size=3))
    for i, (order, norm, attention, ffn) in enumerate(layers):
        if order == "pre":
            x = net.residual(x, net.attention(net.norm(x, norm, f"l{i}.n1"), i, attention))
            x = net.residual(x, net.ffn(net.norm(x, norm, f"l{i}.n2"), i, ffn))
        else:
            x = net.norm(net.residual(x, net.attention(x, i, attention)), norm, f"l{i}.n1")
            x = net.norm(net.residual(x, net.ffn(x, i, ffn)), norm, f"l{i}.n2")
    if draw(st.booleans()):
        x = net.norm(x, layers[-1][1], "final")
    hidden = draw(st.sampled_from(["no", "plain", "tanh"]))  # the stream itself as an output, or through tanh
    outputs = [] if hidden == "no" else [x] if hidden == "plain" else [b.op("tanh", x)]
    heads = draw(st.integers(0 if outputs else 1, 3))
    if heads:
        y = b.op("mean", x, dims=[1]) if draw(st.booleans()) else b.op("select", x, dim=1, index=0)
        for h in range(heads):
            y = net.linear(y, f"head{h}", D, ("other", True, False))
            if h < heads - 1:
                y = b.op(draw(st.sampled_from(["tanh", "relu", "gelu"])), y)
        outputs.append(y)
    return b.finish(outputs), net


def _feeds(graph, start: str, targets: set[str]) -> bool:
    users, seen, stack = graph.users(), set(), [start]
    while stack:
        v = stack.pop()
        if v in targets:
            return True
        if v not in seen:
            seen.add(v)
            stack.extend(op.result for op in users.get(v, []))
    return False


def _after(graph, value: str, kinds: set[str]) -> bool:
    """Whether an op of `kinds` (or attention) is upstream of `value`."""
    producer, seen, stack = graph.producer(), set(), [value]
    while stack:
        v = stack.pop()
        if v in seen or v not in producer:
            continue
        seen.add(v)
        if producer[v].kind in kinds | {"scaled_dot_product_attention"}:
            return True
        stack.extend(producer[v].operands)
    return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=residual_networks())
def test_random_residual_networks_get_their_built_roles(case):
    graph, net = case
    assert _roles(graph) == net.truth
    for layer in choose_layers(graph, ".*", keep_head=False, keep_input=False, pass_name="t").layers:
        for op in layer.ops:  # invariants, checked by walking the graph directly
            if layer.is_head:
                assert not _feeds(graph, op.result, net.residual_adds)
            if layer.is_input:
                assert layer.kind == "other" and not _after(graph, op.operands[0], {"linear", "matmul", "conv2d"})
    # hp-prune compresses exactly the block linears, and its log names every other one with its reason
    ctx = PassContext()
    out = HPPrune(block=(4, 4))(graph, ctx)
    types = dict(out.constants)
    for weight, (kind, head, inputs) in net.truth.items():
        assert (types[weight].sparsity is None) == (head or inputs), weight
        if head or inputs:
            assert re.search(rf"skipped (\d+ weights \([^)]*\): )?[^;]*\b{re.escape(weight)}\b", ctx.log[0]), weight
