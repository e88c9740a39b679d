"""select-format: the cheapest encoding per constant by the target's cost, forced formats,
idempotence, and artifacts that store (and check) weights in their encodings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.numpy
import torch

from tcc.ir import parse_graph, print_graph
from tcc.ir.errors import TccError
from tcc.passes import PassContext, PipelineError, parse_pipeline
from tcc.passes.select_format import SelectFormat

GRAPH = """graph @main(%x: f32[2,32]) {
  const @sparse : f32[32,32]
  const @dense : f32[32,32]
  const @hp : i8[32,32] ~hp(16, 16, 2)
  const @bias : f32[32]
  %a = linear(%x, @sparse, @bias) : f32[2,32]
  %b = linear(%a, @dense) : f32[2,32]
  return %b
}
"""


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sparse = rng.standard_normal((32, 32)).astype(np.float32)
    sparse[rng.random((32, 32)) < 0.9] = 0  # unstructured, ~10% dense
    hp = np.zeros((32, 32), np.int8)
    for r in range(32):
        for block in (0, 1):
            hp[r, block * 16 + rng.choice(16, 2, replace=False)] = rng.integers(1, 100, 2)
    return {"sparse": sparse, "dense": rng.standard_normal((32, 32)).astype(np.float32), "hp": hp,
            "bias": rng.standard_normal(32).astype(np.float32)}


def graph():
    return parse_graph(GRAPH, weights())


def encodings(g) -> dict[str, str]:
    return {name: str(t.encoding) for name, t in g.constants}


def test_memory_cost_golden():
    out = SelectFormat()(graph(), PassContext())
    # ~10% dense f32: CSR (5-bit columns, 11-bit pointers) beats COO and the bitmap; dense stays
    # dense; 2 of 16 per row in i8: HP's 4-bit local columns beat CSR's 5 bits and the bitmap
    assert encodings(out) == {"sparse": "#csr", "dense": "#dense", "hp": "#hp(16, 16, 2)", "bias": "#dense"}
    text = print_graph(out)
    assert "const @sparse : f32[32,32] #csr\n" in text and "const @hp : i8[32,32] #hp(16, 16, 2) ~hp(16, 16, 2)" in text
    assert parse_graph(text, out.weights) == out


def test_idempotent_and_logged():
    ctx = PassContext()
    once = SelectFormat()(graph(), ctx)
    twice = SelectFormat()(once, ctx)
    assert twice == once
    assert ctx.log[0].startswith("select-format: changed; 1 csr, 1 dense, 1 hp; ")
    assert ctx.log[1].startswith("select-format: no change")
    before, after = map(int, re.search(r"(\d+) -> (\d+) bytes", ctx.log[0]).groups())
    assert after < before == 4096 * 2 + 1024


def test_accelerator_targets_pay_decode_work_and_execute_their_formats():
    g = graph()
    widest = int(np.count_nonzero(g.weights["sparse"].reshape(32, 2, 16), axis=2).max())
    accel = PassContext(formats=("dense", "hp", "bsr", "packed1b"), work_cost=0.25)
    assert encodings(SelectFormat()(g, accel)) == {"sparse": f"#hp(16, 16, {widest})", "dense": "#dense",
                                                    "hp": "#hp(16, 16, 2)", "bias": "#dense"}
    # when decode work is dear, HP rows as wide as the widest row stop paying; 2 per row still do
    costly = PassContext(formats=("dense", "hp", "bsr", "packed1b"), work_cost=10)
    assert encodings(SelectFormat()(g, costly))["sparse"] == "#dense"
    assert encodings(SelectFormat()(g, costly))["hp"] == "#hp(16, 16, 2)"


def test_forced_formats_globally_and_per_pattern():
    out = SelectFormat(format="bitmap")(graph(), PassContext())
    assert encodings(out) == {"sparse": "#bitmap", "dense": "#bitmap", "hp": "#bitmap", "bias": "#dense"}
    out = SelectFormat(format="^s:coo;^d:bsr")(graph(), PassContext())
    assert encodings(out) == {"sparse": "#coo", "dense": "#bsr(16, 16)", "hp": "#hp(16, 16, 2)", "bias": "#dense"}
    out = SelectFormat(format="hp", block=(8, 8))(graph(), PassContext())
    assert encodings(out)["sparse"].startswith("#hp(8, 8, ") and encodings(out)["hp"] == "#hp(16, 16, 2)"
    [p] = parse_pipeline("select-format{format=.*:csr;hp:bitmap,block=8x8}")
    assert p.format == ".*:csr;hp:bitmap" and tuple(p.block) == (8, 8)


@pytest.mark.parametrize("spec, message", [
    ("select-format{format=cssr}", "option 'format' names unknown format 'cssr'"),
    ("select-format{format=csr;d:bsr}", "mixes a global format 'csr' with per-pattern ones"),
    ("select-format{format=[:csr}", "has a bad pattern '['"),
])
def test_bad_options(spec, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        parse_pipeline(spec)


def test_forcing_a_format_that_cannot_store_a_constant_names_it():
    with pytest.raises(TccError, match=re.escape("select-format: constant 'dense' (f32[32,32]) cannot be stored "
                                                 "as #packed1b: it stores b1 tensors, got f32")):
        SelectFormat(format="dense:packed1b")(graph(), PassContext())
    with pytest.raises(TccError, match="cannot be stored as #nm: it names no N:M structure"):
        SelectFormat(format="nm")(graph(), PassContext())


def test_verifier_rejects_a_weight_its_encoding_cannot_store():
    text = GRAPH.replace("const @dense : f32[32,32]", "const @dense : f32[32,32] #hp(16, 16, 1)")
    with pytest.raises(Exception, match="constant 'dense' cannot be stored as #hp\\(16, 16, 1\\)"):
        parse_graph(text, weights())


# ---------------------------------------------------------------------------------------------
# artifacts

class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def pruned_artifact(tmp_path_factory):
    import tcc
    torch.manual_seed(0)
    model = TwoLinears().eval()
    x = torch.randn(4, 64)
    path = tmp_path_factory.mktemp("art") / "hp"
    tcc.compile(model, (x,), pipeline="hp-prune{sparsity=0.9,keep_head=false,keep_input=false}").save(path)
    dense_path = tmp_path_factory.mktemp("art") / "dense"
    tcc.compile(model, (x,), pipeline="hp-prune{sparsity=0.9,keep_head=false,keep_input=false},select-format{format=dense}").save(
        dense_path)
    return path, dense_path, x


def test_artifact_stores_encodings_and_runs_on_them(pruned_artifact):
    import tcc
    path, dense_path, x = pruned_artifact
    art, dense = tcc.load(path), tcc.load(dense_path)
    assert {str(t.encoding) for n, t in art.graph.constants if t.rank == 2} == {"#hp(16, 16, 2)"}
    assert set(art.graph.stored) == set(art.graph.constant_names)  # the executors use the loaded forms
    for on in ("cpu", "numpy"):
        np.testing.assert_allclose(art.run(x, on=on).numpy(), dense.run(x, on=on).numpy(), rtol=1e-5, atol=1e-6)
    size, dense_size = ((p / "weights.safetensors").stat().st_size for p in (path, dense_path))
    assert size < 0.35 * dense_size  # 2 of 16 per row: 12.5% of the values, 4-bit local columns


def rewrite_weights(path, change) -> None:
    """Apply `change(tensors, metadata)` to the artifact's weights and re-hash it in the
    manifest, as a buggy writer would: only the buffer checks can catch what follows."""
    import hashlib
    file = path / "weights.safetensors"
    with safetensors.safe_open(str(file), framework="numpy") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, metadata)
    file.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = hashlib.sha256(file.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def weight_name(path) -> str:
    import tcc
    return next(n for n, t in tcc.load(path).graph.constants if t.rank == 2)


def set_first_column(tensors, metadata, name, value):
    columns = tensors[f"{name}/columns"].copy()
    columns[0] = value
    tensors[f"{name}/columns"] = columns


@pytest.mark.parametrize("change, message", [
    (lambda t, m, n: t.__setitem__(f"{n}/columns", t[f"{n}/columns"][:-1]), "buffer 'columns' holds"),
    (lambda t, m, n: set_first_column(t, m, n, 0x11), "buffer 'columns' repeats or reorders indices"),
    (lambda t, m, n: m.__setitem__(n, json.dumps({**json.loads(m[n]), "values": 3})),
     "buffer 'values' holds"),
    (lambda t, m, n: t.pop(f"{n}/values"), "buffer 'values' is missing"),
    (lambda t, m, n: m.pop(n), "missing from the weights"),
])
def test_corrupted_weight_buffers_are_named_on_load(pruned_artifact, tmp_path, cli, change, message):
    import shutil
    path = tmp_path / "copy"
    shutil.copytree(pruned_artifact[0], path)
    name = weight_name(path)
    rewrite_weights(path, lambda tensors, metadata: change(tensors, metadata, name))
    result = cli("run", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"constant '{name}'" in result.stderr and message in result.stderr, result.stderr


def test_inspect_shows_encoding_bytes_and_ratio_per_layer(pruned_artifact, cli):
    result = cli("inspect", pruned_artifact[0], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    weight = next(c for c in info["constants"] if c["name"] == "a.weight")
    assert weight["encoding"] == "hp(16, 16, 2)" and weight["structure"] == "hp(16, 16, 2)"
    assert weight["dense_bytes"] == 64 * 64 * 4 and 0.1 < weight["ratio"] < 0.12  # 2/16 x 36/32 bits
    assert info["bytes"] == sum(c["bytes"] for c in info["constants"]) and info["ratio"] < 0.2
    text = cli("inspect", pruned_artifact[0]).stdout
    assert re.search(r"a\.weight\s+64x64\s+f32\s+hp\(16, 16, 2\)\s+hp\(16, 16, 2\)\s+8\d\.\d%\s+[\d,]+\s+16,384\s+0\.1\d\d",
                     text), text
