"""Model files from strangers run no code: the malicious torch.export archives of
`tests/bad_inputs/` (made by `make_corpus.py`: pickled sample inputs, weights and constants,
opaque objects, legacy pickled weights, an output type naming a module, a symbolic shape that
`sympy.sympify` evaluates, a node calling `torch.ops.import_module`, stride-0 views of 10^10
elements) each exit with code 2 and one line, write nothing and leave the payload's marker
file unwritten. The controls show each payload is live: `torch.export.load` (or tcc with
`--trust-pickle`) does run it. Members that inflate far beyond what they declare are refused
before they are inflated. On valid archives tcc's reader gives what `torch.export.load` gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs.make_corpus import EVIL_ARCHIVES, MARKER, PAYLOAD_MODULE, rewrite_archive
import tcc
from conftest import built, run_cli
from test_bad_inputs import CORPUS, expect_refused
from tcc.cli import main
from tcc.export_archive import read_export_archive
from tcc.frontend import split_inputs
from tcc.ir.errors import TccError
from tcc.loader import MAX_INPUT_ELEMENTS

TINY = CORPUS / "tiny.pt2"
REFUSALS = {
    "payload_sample_inputs": "data/sample_inputs/model.pt: holds a io.open object, not tensors; tcc never runs code",
    "payload_pickled_weight": "data/weights/weight_0: weight 'fc.weight' is stored as a pickle; tcc never unpickles",
    "payload_pickled_constant": "data/constants/tensor_0: constant 'evil' is stored as a pickle",
    "payload_opaque_constant": "data/constants/opaque_obj_0: constant 'evil' is stored as a pickle",
    "payload_legacy_weights": "data/weights/model.pt: legacy pickled weights; tcc never unpickles a model file",
    "payload_pytree_module": None,  # compiles: the output type becomes a plain tuple, its module never imported
    "payload_symbolic_shape": "models/model.json: symbolic shapes at /graph_module/graph/tensor_values/x/sizes/0 "
                              "(as_expr); tcc compiles static shapes",
    "payload_call_import": "models/model.json: node at /graph_module/graph/nodes/0 calls 'torch.ops.import_module', "
                           "which is not an operator",
    "expanded_sample_input": "expanded_sample_input.pt2: stored example input 0 has shape [10000000000] "
                             "(10,000,000,000 elements); an example input holds at most 2,147,483,647",
    "expanded_weight": "weight 'fc.weight' of shape [100000, 100000] holds 10,000,000,000 elements",
}


def test_every_malicious_archive_has_a_case():
    assert set(REFUSALS) == set(EVIL_ARCHIVES)
    assert all((CORPUS / f"{name}.pt2").is_file() for name in EVIL_ARCHIVES)


@pytest.mark.parametrize("name", sorted(EVIL_ARCHIVES))
def test_malicious_archive_runs_nothing(name, tmp_path, monkeypatch, capfd):
    """In a directory holding the payload module (importable from it), tcc refuses the file and
    writes nothing, or (an output type naming the module) compiles it without importing it."""
    (tmp_path / f"{PAYLOAD_MODULE}.py").write_text((CORPUS / f"{PAYLOAD_MODULE}.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["compile", str(CORPUS / f"{name}.pt2"), "-q", "-o", str(tmp_path / "out")]
    if REFUSALS[name] is None:
        assert main(argv) == 0
        assert tcc.load(tmp_path / "out").signature["output_form"] == "tuple"
    else:
        expect_refused(argv, REFUSALS[name], tmp_path, capfd)
    assert not (tmp_path / MARKER).exists() and PAYLOAD_MODULE not in sys.modules


CONTROL = """
import json, os, sys, torch
ran = {}
for name in sys.argv[2:]:
    os.makedirs(name); os.chdir(name)
    try:
        torch.export.load(os.path.join(sys.argv[1], name + ".pt2"))
    except Exception:
        pass
    ran[name] = os.path.exists(%r)
    os.chdir("..")
print(json.dumps(ran))
""" % MARKER


def test_the_payloads_are_live_in_torch_export_load(tmp_path):
    """The control: torch.export.load runs each payload marked live (so the refusals above that
    leave no marker show tcc ran nothing)."""
    live = sorted(name for name, (_, is_live) in EVIL_ARCHIVES.items() if is_live)
    result = subprocess.run([sys.executable, "-c", CONTROL, str(CORPUS), *live], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert json.loads(result.stdout.splitlines()[-1]) == {name: True for name in live}, result.stderr[-2000:]


def test_module_named_by_the_archive_is_imported_only_when_trusted(tmp_path):
    """The real command (the working directory on its path), from a directory holding the
    module the archive names: untrusted, it compiles without importing it; with --trust-pickle
    tcc lets torch.export.load deserialize the type, importing its module (the payload runs)."""
    (tmp_path / f"{PAYLOAD_MODULE}.py").write_text((CORPUS / f"{PAYLOAD_MODULE}.py").read_text())
    archive = CORPUS / "payload_pytree_module.pt2"
    result = run_cli("compile", archive, "-q", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / MARKER).exists()
    run_cli("compile", archive, "--trust-pickle", "-o", tmp_path / "trusted", cwd=tmp_path)
    assert (tmp_path / MARKER).exists()


def test_output_types_of_unimported_libraries_become_plain_dicts(tmp_path):
    """A Hugging Face model's ModelOutput, its module never imported by the command: the artifact
    returns a dict of the same keys, matching eager."""
    module, inputs = built("hf-bert")
    args, kwargs = split_inputs(inputs)
    torch.export.save(torch.export.export(module, args, kwargs), tmp_path / "bert.pt2")
    result = run_cli("compile", tmp_path / "bert.pt2", "-q", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = tcc.load(tmp_path / "out").run(inputs)
    with torch.no_grad():
        expected = module(*args, **kwargs)
    assert list(outputs) == list(expected.keys())
    for key, value in outputs.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)


def test_torchscript_is_never_loaded_untrusted(tmp_path, monkeypatch, capfd):
    def loaded(*args, **kwargs):
        raise AssertionError("torch.jit.load ran on an untrusted file")
    monkeypatch.setattr(torch.jit, "load", loaded)
    monkeypatch.chdir(tmp_path)
    expect_refused(["compile", str(CORPUS / "scripted.pt"), "--input-shape", "1x8x8", "-o", str(tmp_path / "o")],
                   "scripted.pt: a TorchScript model is code, and loading it runs that code. Pass --trust-pickle",
                   tmp_path, capfd)


def _bomb(source: Path, target: Path, member: str, size: int) -> None:
    """`source` with `member` replaced by `size` zero bytes, deflated (about size / 1000 bytes
    in the file), streamed in without ever holding them in memory."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/" + member):
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(deflated, "w") as f:
                    for _ in range(size >> 20):
                        f.write(bytes(1 << 20))
            else:
                zout.writestr(info, zin.read(info))


@pytest.mark.parametrize("member, size, message", [
    ("data/weights/weight_0", 256 << 20, "data/weights/weight_0 declares 268,435,456 bytes; its contents need at "
                                         "most 65,792"),
    ("models/model.json", 300 << 20, "models/model.json declares 314,572,800 bytes; its contents need at most "
                                     "268,435,456"),
])
def test_members_inflating_beyond_their_contents_are_refused_uninflated(member, size, message, tmp_path):
    bomb = tmp_path / "bomb.pt2"
    _bomb(TINY, bomb, member, size)
    assert bomb.stat().st_size < size // 500
    tracemalloc.start()
    try:
        with pytest.raises(TccError, match=message):
            read_export_archive(bomb, MAX_INPUT_ELEMENTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("model", ["bert-style", "hf-distilbert"])
def test_reader_gives_what_torch_export_load_gives(model, tmp_path):
    """On archives torch writes (parameters, buffers, constants, dict inputs), the same graph,
    weights and example inputs as torch.export.load."""
    module, inputs = built(model)
    args, kwargs = split_inputs(inputs)
    torch.export.save(torch.export.export(module, args, kwargs), tmp_path / "m.pt2")
    _assert_same(read_export_archive(tmp_path / "m.pt2", MAX_INPUT_ELEMENTS), torch.export.load(tmp_path / "m.pt2"))


def _assert_same(ours: torch.export.ExportedProgram, theirs: torch.export.ExportedProgram) -> None:
    assert str(ours.graph) == str(theirs.graph)
    assert ours.graph_signature == theirs.graph_signature
    for mine, other in ((ours.state_dict, theirs.state_dict), (ours.constants, theirs.constants)):
        assert list(mine) == list(other)
        for key in other:
            assert type(mine[key]) is type(other[key]) and torch.equal(mine[key], other[key]), key
    mine, other = (torch.utils._pytree.tree_flatten(p.example_inputs) for p in (ours, theirs))
    assert mine[1] == other[1] and all(torch.equal(a, b) for a, b in zip(mine[0], other[0]))


class _Shared(torch.nn.Module):
    """Tied weights (one storage, two names) and a buffer that is a view of a larger tensor."""

    def __init__(self, features: int, rows: int, transposed: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features, features)
        self.tied = self.fc.weight
        table = torch.randn(rows + 3, features)
        self.register_buffer("window", (table.t() if transposed else table)[..., 1:].contiguous()[1:rows + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.fc(x), self.tied) + self.window.sum()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=st.integers(2, 6), rows=st.integers(1, 4), batch=st.integers(1, 3), transposed=st.booleans())
def test_reader_round_trips_what_torch_saves(features, rows, batch, transposed, tmp_path):
    """Property: for any small model with tied weights and views as buffers, tcc's reader and
    torch.export.load agree."""
    model = _Shared(features, rows, transposed).eval()
    path = tmp_path / f"m{features}{rows}{batch}{transposed}.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(batch, features),)), path)
    _assert_same(read_export_archive(path, MAX_INPUT_ELEMENTS), torch.export.load(path))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_edited_archive_json_gives_only_tcc_errors(data, tmp_path_factory):
    """Any edit of a value in the program's or weights' JSON: the archive loads, or a TccError."""
    member = data.draw(st.sampled_from(["models/model.json", "data/weights/model_weights_config.json"]))
    with zipfile.ZipFile(TINY) as z:
        value = json.loads(z.read(f"tiny/{member}"))
    paths = []
    stack = [((), value)]
    while stack:
        trail, item = stack.pop()
        paths.append(trail)
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack += [((*trail, key), child) for key, child in children]
    trail = data.draw(st.sampled_from(paths[1:]))
    replacement = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                      st.text(max_size=8), st.just([]), st.just({}), st.just({"as_int": -1})))
    parent = value
    for key in trail[:-1]:
        parent = parent[key]
    parent[trail[-1]] = replacement
    path = tmp_path_factory.mktemp("edited") / "m.pt2"
    rewrite_archive(TINY, path, {member: json.dumps(value).encode()})
    try:
        read_export_archive(path, MAX_INPUT_ELEMENTS)
    except TccError as e:
        assert "\n" not in str(e)


def test_an_archive_exported_with_dynamic_shapes_is_refused_with_the_remedy(tmp_path):
    """Symbolic shapes reach sympy's eval in torch's reader: tcc refuses them (it compiles
    static shapes) and says how to re-export."""
    model = torch.nn.Linear(8, 4)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "dynamic.pt2")
    with pytest.raises(TccError, match=r"dynamic.pt2: member dynamic/models/model.json: (symbolic shapes|range "
                                       r"constraints).*re-export without dynamic_shapes"):
        read_export_archive(tmp_path / "dynamic.pt2", MAX_INPUT_ELEMENTS)
