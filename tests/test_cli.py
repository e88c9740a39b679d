"""The CLI end to end in a subprocess, every model-file kind, and every bad-input case:
exit code 2, one line naming the problem, no traceback, nothing written."""

from __future__ import annotations

import json

import numpy as np
import safetensors
import pytest
import torch

import tcc

from conftest import built, eager_outputs, max_relative_error, run_cli
from tcc.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model and input files of every kind, from the bert-style zoo model."""
    d = tmp_path_factory.mktemp("models")
    model, (ids, mask) = built("bert-style")
    torch.export.save(torch.export.export(model, (ids, mask)), d / "model.pt2")
    torch.jit.trace(model, (ids, mask)).save(d / "scripted.pt")
    torch.save(model.state_dict(), d / "weights.pt")
    torch.save(model, d / "pickled.pt")
    torch.save({"input_ids": ids, "attention_mask": mask}, d / "inputs.pt")
    torch.save((ids, mask), d / "inputs_tuple.pt")
    np.savez(d / "inputs.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    np.save(d / "wrong.npy", np.zeros((2, 16), np.float32))
    (d / "text.pt").write_text("not a model")
    (d / "truncated.pt2").write_bytes((d / "model.pt2").read_bytes()[:5000])
    return d


@pytest.fixture(scope="module")
def artifact(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "bert"
    result = run_cli("compile", files / "model.pt2", "--target", "cpu", "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def _expected():
    model, inputs = built("bert-style")
    return eager_outputs(model, inputs)


@pytest.mark.parametrize("inputs_file", ["inputs.pt", "inputs_tuple.pt", "inputs.npz"])
@pytest.mark.parametrize("on", ["cpu", "numpy"])
def test_run_matches_eager(files, artifact, tmp_path, inputs_file, on):
    out = tmp_path / "y.pt"
    result = run_cli("run", artifact, "--input", files / inputs_file, "--on", on, "-o", out)
    assert result.returncode == 0, result.stderr
    outputs = torch.load(out, weights_only=True)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    for actual, expected in zip(outputs, _expected()):
        assert max_relative_error(actual, expected) < 1e-5


def test_artifact_contents_and_no_pickles(artifact):
    names = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert {"manifest.json", "graph.tcc", "weights.safetensors", "example_inputs.npz",
            "report.html"} <= names
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == "cpu"
    assert manifest["passes"] == ["fold-constants", "canonicalize", "dce", "select-format"]
    measured = set(manifest["measured"]["files"])  # the machine's figures: beside the hashes, not in them
    assert measured and all(name.startswith("measured/") for name in measured)
    assert set(manifest["files"]) == names - {"manifest.json"} - measured
    with safetensors.safe_open(str(artifact / "weights.safetensors"), framework="numpy") as weights:
        assert "tokens.weight/values" in weights.keys()
        assert json.loads(weights.metadata()["tokens.weight"]) == {"values": 100 * 32}
    assert not any(p.suffix in (".pkl", ".pt") for p in artifact.rglob("*"))


def test_inspect_json(artifact):
    result = run_cli("inspect", artifact, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    model, _ = built("bert-style")
    # the position embedding (64 x 32) is folded into the 16 x 32 rows the model looks up
    assert info["params"] == sum(p.numel() for p in model.parameters()) - 64 * 32 + 16 * 32
    assert info["ops"]["linear"] == 13 and info["flops"] > 0
    const = {c["name"]: c for c in info["constants"]}["layers.0.query.weight"]
    assert const == {"name": "layers.0.query.weight", "shape": [32, 32], "dtype": "f32", "encoding": "dense",
                     "structure": "-", "sparsity": 0.0, "bytes": 32 * 32 * 4, "dense_bytes": 32 * 32 * 4,
                     "ratio": 1.0}
    text = run_cli("inspect", artifact)
    assert "layers.0.query.weight" in text.stdout and "parameters" in text.stdout


def test_inspect_reports_what_the_accelerator_reads_of_each_hp_weight(tmp_path):
    """HP on the wire: each weight's bytes in the DRAM image beside its `#hp` bytes. spload's
    stream stores each kept slot's 8-bit value and its 3-bit local index, and a skip per block:
    within 1.1x of `#hp` (which stores the kept blocks' positions instead of skips)."""
    from tcc.backends.accel.isa import sparse_stream
    from tcc.ir.encoding import HP
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    artifact = tcc.compile(model, (torch.randn(8, 64),), target="fpga-small", pipeline=(
        "hp-prune{sparsity=0.75,block=8x8,keep_head=false,keep_input=false},quantize")).save(tmp_path / "a")
    info = json.loads(run_cli("inspect", artifact, "--json").stdout)
    graph = tcc.load(artifact).graph
    # fpga-small: 8 column tiles of 8 channels, each 8 kept blocks of 2 steps in one spload
    dram = 8 * len(sparse_stream(16, 2, 8, 8, 8)) * 8
    for c in info["constants"]:
        if c["name"].endswith("weight_q"):
            encoded = -(-HP(8, 8, 2).footprint(graph.weights[c["name"]], graph.types[c["name"]].dtype)[0] // 8)
            assert c["accel"] == {"dram_bytes": dram, "encoded": "hp(8, 8, 2)", "encoded_bytes": encoded,
                                  "ratio": round(dram / encoded, 4), "on_chip": "fits BBUF"}
            assert dram <= 1.1 * encoded
        else:
            assert "accel" not in c
    assert "accel DRAM" in run_cli("inspect", artifact).stdout


def test_targets(cli):
    result = cli("targets", "--json")
    assert {t["name"] for t in json.loads(result.stdout)} >= {"cpu", "gpu"}


@pytest.mark.parametrize("kind,args", [
    ("state_dict", ["weights.pt", "--arch", "tcc.zoo:BertStyleEncoder"]),
    ("pickle", ["pickled.pt", "--trust-pickle"]),
    ("torchscript", ["scripted.pt", "--trust-pickle"]),  # TorchScript is code
])
def test_other_model_kinds(files, tmp_path, kind, args):
    out = tmp_path / "a"
    file, *rest = args
    result = run_cli("compile", files / file, *rest, "--input-shape", "2x16:i64", "--input-shape", "2x16:i64",
                     "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"({kind})" in result.stdout
    y = tmp_path / "y.pt"
    assert run_cli("run", out, "--input", files / "inputs_tuple.pt", "-o", y).returncode == 0
    for actual, expected in zip(torch.load(y, weights_only=True), _expected()):
        assert max_relative_error(actual, expected) < 1e-5


BAD = [
    (["compile", "{d}/missing.pt", "-o", "{t}/o"], "missing.pt: no such file"),
    (["compile", "{d}/text.pt", "-o", "{t}/o"], "not a PyTorch model file"),
    (["compile", "{d}/truncated.pt2", "-o", "{t}/o"], "truncated or corrupt archive"),
    (["compile", "{d}/model.pt2", "--target", "fpga-smal", "-o", "{t}/o"], "unknown target 'fpga-smal'"),
    (["compile", "{d}/pickled.pt", "--input-shape", "2x16:i64", "-o", "{t}/o"], "--trust-pickle"),
    (["compile", "{d}/weights.pt", "--input-shape", "2x16:i64", "-o", "{t}/o"], "pass --arch module:Class"),
    (["compile", "{d}/scripted.pt", "-o", "{t}/o"], "pass --input-shape"),
    (["compile", "{d}/scripted.pt", "--input-shape", "2x16:i64", "-o", "{t}/o"], "TorchScript model is code"),
    (["compile", "{d}/model.pt2", "--input-shape", "2x16:q7", "-o", "{t}/o"], "unknown dtype 'q7'"),
    (["run", "{a}", "--input", "{d}/wrong.npy"], "the model takes 2 inputs"),
    (["run", "{a}", "--input", "{d}/text.pt"], "cannot read input"),
    (["run", "{t}/nothing"], "no such artifact directory"),
    (["run", "{a}", "--on", "gpu"] if not torch.cuda.is_available() else ["run", "{t}/nothing"], "no"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2(files, artifact, tmp_path, argv, message, capsys):
    argv = [a.format(d=files, t=tmp_path, a=artifact) for a in argv]
    assert main(argv) == 2  # the CLI's main in process (test_unsupported_op_from_file runs the real command)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcc: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no staging left behind


def test_wrong_input_shape_and_dtype(files, artifact, tmp_path):
    model, (ids, mask) = built("bert-style")
    torch.save({"input_ids": ids.float(), "attention_mask": mask}, tmp_path / "f.pt")
    result = run_cli("run", artifact, "--input", tmp_path / "f.pt")
    assert result.returncode == 2
    assert "input 'input_ids': expected i64[2,16], got float32[2, 16]" in result.stderr
    torch.save((ids[:, :8], mask[:, :8]), tmp_path / "s.pt")
    result = run_cli("run", artifact, "--input", tmp_path / "s.pt")
    assert result.returncode == 2 and "expected i64[2,16], got int64[2, 8]" in result.stderr


def test_unsupported_op_from_file(tmp_path):
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values

    torch.export.save(torch.export.export(Sorts(), (torch.randn(2, 3),)), tmp_path / "s.pt2")
    result = run_cli("compile", tmp_path / "s.pt2", "-o", tmp_path / "o")
    assert result.returncode == 2
    assert "unsupported op aten.sort" in result.stderr and "node 'sort'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_corrupted_artifact_is_caught(artifact, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "weights.safetensors").write_bytes(bytes(data))
    result = run_cli("run", copy)
    assert result.returncode == 2 and "weights.safetensors: contents do not match" in result.stderr


def test_recompile_replaces_artifact_and_refuses_foreign_dirs(files, tmp_path):
    out = tmp_path / "art"
    assert run_cli("compile", files / "model.pt2", "-o", out).returncode == 0
    assert run_cli("compile", files / "model.pt2", "-o", out).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = run_cli("compile", files / "model.pt2", "-o", foreign)
    assert result.returncode == 2 and "refusing to overwrite" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
