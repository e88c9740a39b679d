"""The compression surface of the CLI: `tcc passes`, `tcc compile --pipeline/--train-data/
--calib-data`, `tcc eval`, and the bad inputs of each (exit 2, one line, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tcc
from conftest import run_cli
from tcc.cli import main
from tcc.zoo import DigitsTransformer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small digits-shaped Transformer (batch 16) with train/test data files."""
    d = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x = torch.rand(64, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the model gets right: accuracy 1.0 for the fp32 artifact
    torch.export.save(torch.export.export(model, (x[:16],)), d / "model.pt2")
    torch.save({"inputs": x, "labels": y}, d / "data.pt")
    torch.save({"inputs": x[:40]}, d / "unlabelled.pt")
    torch.save({"inputs": torch.rand(10, 8, 7), "labels": torch.zeros(10, dtype=torch.long)}, d / "bad_shape.pt")
    torch.save({"inputs": x[:10], "labels": torch.full((10,), 12)}, d / "bad_labels.pt")
    torch.save({"inputs": x[:10], "labels": torch.zeros(9, dtype=torch.long)}, d / "short_labels.pt")
    torch.save({"images": x}, d / "bad_keys.pt")
    (d / "garbage.pt").write_bytes(b"\x00garbage")
    result = run_cli("compile", d / "model.pt2", "-o", d / "fp32", "-q")
    assert result.returncode == 0, result.stderr
    return d


def test_passes_lists_every_pass_with_options():
    result = run_cli("passes")
    assert result.returncode == 0
    for name in tcc.passes.PASSES:
        assert f"\n{name}: " in "\n" + result.stdout
    assert "block=RxC | none  (default none)" in result.stdout
    info = json.loads(run_cli("passes", "--json").stdout)
    hp = next(p for p in info if p["name"] == "hp-prune")
    assert {o["name"] for o in hp["options"]} >= {"sparsity", "block", "row_nnz", "block_sparsity", "scope", "epochs"}


def test_pipeline_with_training_data_and_eval(files, tmp_path):
    out = tmp_path / "hp"
    result = run_cli("compile", files / "model.pt2", "-o", out, "--train-data", files / "data.pt",
                     "--pipeline", "fold-constants,dce,hp-prune{block=16x16,sparsity=0.75,epochs=2},quantize{bits=8}")
    assert result.returncode == 0, result.stderr
    assert "hp-prune: changed; gradual pruning with fine-tuning on" in result.stdout
    assert "quantize: changed; calibrated on" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"] == ["fold-constants", "dce", "hp-prune", "quantize", "select-format"]
    assert manifest["pipeline"] == ("fold-constants,dce,hp-prune{sparsity=0.75,block=16x16,epochs=2},quantize,"
                                    "select-format")
    assert manifest["data"]["train"]["examples"] == 64
    graph = (out / "graph.tcc").read_text()
    # at 4 of 16 per row a bitmap (1 + 8/4 bits per element) is as small as HP (12/4 bits + level 1)
    assert "#bitmap ~hp(16, 16, 4)" in graph and "requantize(" in graph
    report = json.loads(run_cli("eval", out, "--data", files / "data.pt", "--baseline", files / "fp32",
                                "--json").stdout)
    assert report["examples"] == 64 and report["baseline_accuracy"] == 1.0
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["agreement"] <= 1 and report["max_abs_error"] > 0
    text = run_cli("eval", out, "--data", files / "data.pt", "--on", "numpy")
    assert text.returncode == 0 and "accuracy" in text.stdout


def test_eval_of_the_uncompressed_model_is_exact(files):
    report = json.loads(run_cli("eval", files / "fp32", "--data", files / "data.pt", "--baseline", files / "fp32",
                                "--json").stdout)
    assert report["accuracy"] == 1.0 and report["agreement"] == 1.0 and report["max_abs_error"] == 0.0


def test_one_shot_without_data_says_so(files, tmp_path):
    result = run_cli("compile", files / "model.pt2", "-o", tmp_path / "a", "--pipeline", "block-prune{nm=2:4}")
    assert result.returncode == 0, result.stderr
    assert "block-prune: changed; one-shot (no training data)" in result.stdout


def test_calibration_data_is_used(files, tmp_path):
    result = run_cli("compile", files / "model.pt2", "-o", tmp_path / "q", "--pipeline",
                     "quantize{calibration=percentile}", "--calib-data", files / "unlabelled.pt")
    assert result.returncode == 0, result.stderr
    assert "calibrated on unlabelled.pt (40 examples, percentile 99.99)" in result.stdout  # by name: the log is hashed


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "hp-prune{sparsity=1.5}"], "hp-prune: option 'sparsity' must be in [0, 1), got 1.5"),
    (["--pipeline", "hp-prune{sparsity=lots}"], "option 'sparsity' is 'lots' but expects a number"),
    (["--pipeline", "hp-prune{row_nnz=0.5}"], "option 'row_nnz' is '0.5' but expects an integer"),
    (["--pipeline", "hp-prune{blok=4x4}"], "unknown option 'blok'; did you mean 'block'?"),
    (["--pipeline", "hp-prun"], "unknown pass 'hp-prun'; did you mean 'hp-prune'?"),
    (["--pipeline", "hp-prune{block=16x16,row_nnz=20}"], "option 'row_nnz' 20 exceeds the block width 16"),
    (["--pipeline", "hp-prune{layers=(}"], "option 'layers' is not a valid regular expression"),
    (["--pipeline", "binarize{tws=true}"], "binarize: option 'tws' needs training data (--train-data)"),
    (["--train-data", "bad_shape.pt", "--pipeline", "hp-prune"],
     "bad_shape.pt (training data): input 'images' examples have shape [8, 7], the model expects [8, 8]"),
    (["--train-data", "bad_labels.pt", "--pipeline", "hp-prune"],
     "example 0: label 12 outside the model's 10 classes"),
    (["--train-data", "short_labels.pt"], "labels must be one integer per example (10), got shape [9]"),
    (["--train-data", "bad_keys.pt"],
     "unknown key 'images' in training data (expected 'inputs', 'labels', 'task', 'vocab')"),
    (["--train-data", "garbage.pt"], "garbage.pt: cannot read training data"),
    (["--train-data", "missing.pt"], "missing.pt: no such training data file"),
    (["--calib-data", "bad_shape.pt"], "bad_shape.pt (calibration data): input 'images' examples have shape"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(files, tmp_path, args, message, capsys):
    args = [str(files / a) if a.endswith(".pt") else a for a in args]
    out = tmp_path / "out"
    assert main(["compile", str(files / "model.pt2"), "-o", str(out), *args]) == 2  # in process: the CLI's main
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("data, message", [
    ("bad_shape.pt", "input 'images' examples have shape [8, 7]"),
    ("bad_labels.pt", "example 0: label 12 outside"),
    ("garbage.pt", "cannot read data"),
])
def test_eval_bad_data(files, data, message, capsys):
    assert main(["eval", str(files / "fp32"), "--data", str(files / data)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_target_lowering_passes_run_after_the_users_pipeline(monkeypatch):
    import dataclasses

    from tcc import driver
    from tcc.targets import load_catalog
    catalog = load_catalog()
    integer_target = dataclasses.replace(catalog["cpu"], name="int-cpu", lowering="quantize")
    monkeypatch.setattr(driver, "load_catalog", lambda targets_file=None: {**catalog, "int-cpu": integer_target})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    artifact = tcc.compile(model, (torch.randn(4, 8),), target="int-cpu",
                           pipeline="hp-prune{block=4x4,sparsity=0.5,keep_head=false}")
    assert artifact.manifest["passes"] == ["hp-prune", "quantize"]
    assert any(line.startswith("quantize: changed") for line in artifact.manifest["pass_log"])
    assert np.isfinite(artifact.run(torch.randn(4, 8)).numpy()).all()
