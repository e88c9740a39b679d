"""Structured pruning: the exact structure recorded in the type, achieved sparsity, idempotence,
layer kinds, fine-tuning, and the verifier's check of structures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tcc
from tcc.ir import GraphBuilder, VerifyError, parse_graph, print_graph, tensor, verify
from tcc.ir.sparsity import NM, Blocks, Hierarchical, block_view, block_widths
from tcc.passes import BlockPrune, Dataset, HPPrune, PassContext, parse_pipeline, run_pipeline
from tcc.passes.base import OptionError
from tcc.passes.masks import row_mask
from tcc.runtime.torch_executor import TorchExecutor
from conftest import built


def linear_graph(weights: list[np.ndarray], batch: int = 3):
    """x -> linear(w0) -> relu -> linear(w1) ... (each weight's in = previous out)."""
    b = GraphBuilder("g")
    x = b.input("x", tensor((batch, weights[0].shape[1])))
    for i, w in enumerate(weights):
        x = b.op("linear", x, b.constant(f"layer{i}.weight", w.astype(np.float32)))
        if i < len(weights) - 1:
            x = b.op("relu", x)
    return b.finish([x])


def nonzero_weight(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.where(w == 0, 1.0, w).astype(np.float32)


def hp_structure_exact(w: np.ndarray, bh: int, bw: int, row_nnz: int) -> bool:
    counts = np.count_nonzero(block_view(w, bh, bw), axis=3)  # [R/bh, C/bw, bh]
    rows = block_widths(w.shape[0], bh)
    expected = np.minimum(row_nnz, block_widths(w.shape[1], bw))
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            real = counts[i, j, :rows[i]]
            if not (np.all(real == 0) or np.all(real == expected[j])):
                return False
    return True


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=80, deadline=None)
@given(shape=shapes, bh=st.integers(1, 8), bw=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
       sparsity=st.floats(0.0, 0.95), data=st.data())
def test_hp_prune_structure_sparsity_idempotence(shape, bh, bw, seed, sparsity, data):
    row_nnz = data.draw(st.one_of(st.none(), st.integers(1, bw)))
    w = nonzero_weight(np.random.default_rng(seed), *shape)
    graph = linear_graph([w])
    p = HPPrune(sparsity=sparsity, block=(bh, bw), row_nnz=row_nnz, keep_head=False, keep_input=False)
    ctx = PassContext()
    pruned = p(graph, ctx)
    (name, t), = pruned.constants
    k = t.sparsity.row_nnz
    assert t.sparsity == Hierarchical(bh, bw, k) and (row_nnz is None or k == row_nnz)
    out = np.asarray(pruned.weights[name])
    assert hp_structure_exact(out, bh, bw, k)
    kept = np.count_nonzero(out)
    # within one block of the target, unless every block survives (level 2 caps the density)
    one_block = bh * min(k, bw)
    capacity = np.count_nonzero(row_mask(w, bh, bw, k))
    assert abs(kept - (1 - sparsity) * w.size) <= one_block or kept == capacity
    np.testing.assert_array_equal(out[out != 0], w[out != 0])  # survivors keep their values
    assert "one-shot (no training data)" in ctx.log[-1]
    again = p.run(pruned, PassContext())
    assert not again.changed and again.graph.same_as(pruned)
    # the masks themselves are idempotent: re-pruning the pruned values keeps them
    reprune = HPPrune(sparsity=sparsity, block=(bh, bw), row_nnz=k, keep_head=False, keep_input=False)
    assert np.array_equal(reprune(graph.replace(weights={name: out}), PassContext()).weights[name], out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), sparsity=st.floats(0.1, 0.9),
       sizes=st.lists(st.integers(4, 24), min_size=3, max_size=4))
def test_hp_prune_global_scope_hits_total_target(seed, sparsity, sizes):
    rng = np.random.default_rng(seed)
    weights = [nonzero_weight(rng, sizes[i + 1], sizes[i]) * rng.uniform(0.1, 3) for i in range(len(sizes) - 1)]
    graph = linear_graph(weights)
    pruned = HPPrune(sparsity=sparsity, block=(4, 4), row_nnz=2, scope="global", keep_head=False,
                     keep_input=False)(graph)
    total = sum(w.size for w in weights)
    kept = sum(np.count_nonzero(pruned.weights[n]) for n in pruned.constant_names)
    assert abs(kept - (1 - sparsity) * total) <= 4 * 2 or kept == sum(
        np.count_nonzero(row_mask(w, 4, 4, 2)) for w in weights)
    per_layer = [np.count_nonzero(pruned.weights[n]) / pruned.weights[n].size for n in pruned.constant_names]
    assert all(hp_structure_exact(np.asarray(pruned.weights[n]), 4, 4, 2) for n in pruned.constant_names)
    assert len(per_layer) == len(weights)


def test_hp_per_level_ratios():
    w = nonzero_weight(np.random.default_rng(0), 64, 64)
    pruned = HPPrune(block_sparsity=0.5, row_nnz=4, block=(16, 16), keep_head=False, keep_input=False)(linear_graph([w]))
    out = np.asarray(pruned.weights["layer0.weight"])
    blocks = block_view(out, 16, 16)
    alive = np.count_nonzero(blocks, axis=(2, 3)) > 0
    assert alive.sum() == 8 and np.count_nonzero(out) == 8 * 16 * 4
    assert str(pruned.constants[0][1]) == "f32[64,64] ~hp(16, 16, 4)"


def test_hp_default_block_is_the_target_tile():
    w = nonzero_weight(np.random.default_rng(1), 32, 32)
    pruned = HPPrune(sparsity=0.5, keep_head=False, keep_input=False)(linear_graph([w]), PassContext(tile=(8, 4)))
    assert pruned.constants[0][1].sparsity.params()[:2] == (8, 4)


def test_head_and_input_projection_are_kept_dense_by_default():
    graph = tcc.compile(*built("transformer-encoder")).graph
    pruned = HPPrune(sparsity=0.5)(graph)
    types = dict(pruned.constants)
    assert types["head.weight"].sparsity is None and types["embed.weight"].sparsity is None
    assert dict(HPPrune(sparsity=0.5, keep_input=False)(graph).constants)["embed.weight"].sparsity is not None
    assert types["encoder.layers.0.linear1.weight"].sparsity is not None


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2 ** 16), m=st.integers(1, 8), data=st.data())
def test_nm_prune_structure(shape, seed, m, data):
    n = data.draw(st.integers(1, m))
    w = nonzero_weight(np.random.default_rng(seed), *shape)
    pruned = BlockPrune(nm=(n, m), keep_head=False, keep_input=False)(linear_graph([w]))
    out = np.asarray(pruned.weights["layer0.weight"])
    assert pruned.constants[0][1].sparsity == NM(n, m)
    groups = np.count_nonzero(block_view(out, 1, m)[:, :, 0, :], axis=2)
    widths = block_widths(shape[1], m)
    assert np.array_equal(groups, np.broadcast_to(np.minimum(n, widths), groups.shape))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2 ** 16), bh=st.integers(1, 8), bw=st.integers(1, 8),
       sparsity=st.floats(0.0, 0.95))
def test_block_prune_structure(shape, seed, bh, bw, sparsity):
    w = nonzero_weight(np.random.default_rng(seed), *shape)
    pruned = BlockPrune(sparsity=sparsity, block=(bh, bw), keep_head=False, keep_input=False)(linear_graph([w]))
    out = np.asarray(pruned.weights["layer0.weight"])
    assert pruned.constants[0][1].sparsity == Blocks(bh, bw)
    counts = np.count_nonzero(block_view(out, bh, bw), axis=(2, 3))
    sizes = np.outer(block_widths(shape[0], bh), block_widths(shape[1], bw))
    assert np.all((counts == 0) | (counts == sizes))  # kept blocks are whole
    assert abs(np.count_nonzero(out) - (1 - sparsity) * w.size) <= bh * bw


def test_block_prune_per_kind_sparsity():
    graph = tcc.compile(*built("transformer-encoder")).graph
    pruned = BlockPrune(sparsity=0.25, ffn1=0.75, ffn2=0.5, qkv=0.0, block=(8, 8))(graph)
    density = {n: np.count_nonzero(pruned.weights[n]) / pruned.weights[n].size for n in pruned.constant_names}
    assert density["encoder.layers.0.linear1.weight"] == pytest.approx(0.25, abs=0.02)
    assert density["encoder.layers.1.linear2.weight"] == pytest.approx(0.5, abs=0.02)
    assert density["encoder.layers.0.self_attn.in_proj_weight"] == 1.0
    assert density["encoder.layers.0.self_attn.out_proj.weight"] == pytest.approx(0.75, abs=0.02)
    assert density["head.weight"] == 1.0


def test_kinds_choose_the_layers_a_pass_compresses():
    graph = tcc.compile(*built("transformer-encoder")).graph
    pipeline = "hp-prune{sparsity=0.5,block=8x8,kinds=qkv+attn_out},hp-prune{sparsity=0.9,block=8x8,kinds=ffn1+ffn2}"
    pruned = run_pipeline(graph, parse_pipeline(pipeline), PassContext())
    types = dict(pruned.constants)
    for name, row_nnz in (("encoder.layers.0.self_attn.in_proj_weight", 4),
                          ("encoder.layers.1.self_attn.out_proj.weight", 4),
                          ("encoder.layers.0.linear1.weight", 1), ("encoder.layers.1.linear2.weight", 1)):
        assert types[name].sparsity.params()[:3] == (8, 8, row_nnz), name
    assert types["head.weight"].sparsity is None
    assert dict(BlockPrune(block=(8, 8), kinds="ffn2")(graph).constants)["encoder.layers.0.linear1.weight"].sparsity \
        is None
    with pytest.raises(OptionError, match="hp-prune: option 'kinds' unknown layer kind 'ffx'"):
        HPPrune(kinds="ffx")(graph)


def test_layer_kinds_on_zoo_models():
    from tcc.passes.layers import select_layers
    for name in ("transformer-encoder", "hf-bert", "hf-distilbert"):
        graph = tcc.compile(*built(name)).graph
        kinds = [layer.kind for layer in select_layers(graph, ".*", keep_head=True, pass_name="t")]
        assert {"qkv", "attn_out", "ffn1", "ffn2"} <= set(kinds), name


def test_sparsity_text_round_trip_and_verifier():
    w = nonzero_weight(np.random.default_rng(2), 8, 8)
    pruned = HPPrune(sparsity=0.5, block=(4, 4), row_nnz=2, keep_head=False, keep_input=False)(linear_graph([w]))
    text = print_graph(pruned)
    assert "~hp(4, 4, 2)" in text
    assert parse_graph(text, dict(pruned.weights)).same_as(pruned)
    broken = pruned.replace(weights={"layer0.weight": w})  # dense values under an ~hp type
    with pytest.raises(VerifyError, match=r"constant 'layer0.weight' breaks its sparsity structure ~hp\(4, 4, 2\): row"):
        verify(broken)
    with pytest.raises(Exception, match="row_nnz 5 exceeds the block width 4"):
        parse_graph(text.replace("~hp(4, 4, 2)", "~hp(4, 4, 5)"), dict(pruned.weights))


def test_gradual_pruning_with_data_recovers_accuracy():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    data = Dataset((x,), y, "toy")
    graph = tcc.compile(model.eval(), (x[:32],)).graph

    def accuracy(g):
        logits = torch.cat([TorchExecutor(g).run([b.inputs[0]])[0][:b.valid] for b in data.batches(32)])
        return float((logits.argmax(1) == y).float().mean())

    spec = "hp-prune{block_sparsity=0.5,row_nnz=3,block=8x8,epochs=8,lr=0.005,keep_input=false}"
    one_shot = parse_pipeline(spec)[0](graph, PassContext(torch_module=TorchExecutor))
    ctx = PassContext(torch_module=TorchExecutor, data={"train": data})
    tuned = parse_pipeline(spec)[0](graph, ctx)
    assert "gradual pruning with fine-tuning on toy" in ctx.log[-1]
    for g in (one_shot, tuned):
        for n, t in g.constants:
            if t.sparsity is not None:
                assert hp_structure_exact(np.asarray(g.weights[n]), 8, 8, t.sparsity.row_nnz)
    assert accuracy(tuned) > accuracy(one_shot) + 0.05
    assert accuracy(tuned) >= accuracy(graph) - 0.1


def test_training_after_pruning_keeps_the_pruned_weights_zeros():
    """A second pruning pass (other layer kinds, fine-tuned) trains every float weight: the
    first pass's weights keep their structure (they failed the verifier before)."""
    torch.manual_seed(0)
    model, inputs = built("transformer-encoder")
    graph = tcc.compile(model, inputs).graph
    x = inputs[0].repeat(4, *([1] * (inputs[0].dim() - 1)))
    data = Dataset((x,), torch.randint(0, 10, (x.shape[0],)), "toy")
    pipeline = ("hp-prune{sparsity=0.5,block=8x8,kinds=qkv+attn_out,epochs=1},"
                "hp-prune{sparsity=0.9,block=8x8,kinds=ffn1+ffn2,epochs=1}")
    pruned = run_pipeline(graph, parse_pipeline(pipeline), PassContext(torch_module=TorchExecutor,
                                                                       data={"train": data}))
    for n, t in verify(pruned).constants:
        if t.sparsity is not None:
            assert hp_structure_exact(np.asarray(pruned.weights[n]), 8, 8, t.sparsity.row_nnz), n


def test_bad_training_data_is_a_clear_error():
    graph = tcc.compile(*built("transformer-encoder")).graph
    batch = graph.inputs[0][1].shape
    ctx = PassContext(torch_module=TorchExecutor,
                      data={"train": Dataset((torch.zeros(10, *batch[1:]),), torch.full((10,), 99), "t.pt")})
    with pytest.raises(tcc.TccError, match=r"t.pt \(training data\): example 0: label 99 outside the model's "
                                           r"10 classes"):
        HPPrune(sparsity=0.5)(graph, ctx)
    ctx.data["train"] = Dataset((torch.zeros(10, 3),), torch.zeros(10, dtype=torch.long), "t.pt")
    with pytest.raises(tcc.TccError, match=r"input 'images' examples have shape \[3\], the model expects"):
        HPPrune(sparsity=0.5)(graph, ctx)
