"""The bad-input corpus (`tests/bad_inputs/`, listed in its README) through the CLI: every case
exits with code 2 and exactly one line `tcc: error: ...` naming the problem and where, with no
traceback, nothing written (no `-o` output, no staging directory, no change to the inputs) and
no code from the file run. Each case runs through `tcc.cli.main` in process (stderr captured at
the file descriptor, so that torch's own log handlers count too); a few run as the real command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

import tcc
from bad_inputs.make_corpus import MARKER
from conftest import run_cli
from tcc.cli import main

CORPUS = Path(__file__).resolve().parent / "bad_inputs"


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under `roots` with its contents (directories by their path alone)."""
    return {p: p.read_bytes() if p.is_file() else b"" for root in roots for p in sorted(root.rglob("*"))
            if "__pycache__" not in p.parts}


def assert_one_line_error(err: str, message: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcc: error: ") and message in lines[0], err
    assert "Traceback" not in err


def expect_refused(argv: list[str], message: str, work: Path, capfd) -> None:
    """`tcc ARGV` (in process, working directory `work`) exits with 2 and one line holding
    `message`, and leaves `work` and the corpus as they were."""
    before = snapshot(work, CORPUS)
    assert main(argv) == 2
    assert_one_line_error(capfd.readouterr().err, message)
    assert snapshot(work, CORPUS) == before  # no output, no staging, no marker of a payload that ran


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every case runs in its own empty directory: whatever it wrote would show there."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# model files, shapes and data files

S = str(CORPUS / "scripted.pt")  # TorchScript: takes --input-shape
T = str(CORPUS / "tiny.pt2")

MODEL_CASES = [
    ("random-bytes-pt2", ["random.pt2"], "random.pt2: not a PyTorch model file"),
    ("random-bytes-pt", ["random.pt", "--input-shape", "1x8x8"], "random.pt: not a PyTorch model file"),
    ("empty-file", ["empty.pt2"], "empty.pt2: an empty file, not a model"),
    ("truncated-archive", ["truncated.pt2"], "truncated.pt2: truncated or corrupt archive"),
    ("directory", ["."], "bad_inputs: is a directory, not a model file"),
    ("pickle-payload", ["pickle_payload.pt", "--input-shape", "1x8x8"],
     "pickle_payload.pt: a full pickle (torch.save(model)); loading it runs code from the file. Pass --trust-pickle"),
    ("nan-weights", ["nan_weights.pt2"], "parameter 'fc.weight' holds 1 non-finite value of 32 (nan at index [1, 2])"),
    ("inf-weights", ["inf_weights.pt2"], "parameter 'fc.weight' holds 1 non-finite value of 32 (inf at index [1, 2])"),
    ("unsupported-ops", ["unsupported_ops.pt2"], "2 unsupported ops: aten.sort.default at node 'sort' ("),
    ("zero-batch", [S, "--input-shape", "0x8x8"], "--input-shape '0x8x8': dimension 0 is 0"),
    ("zero-inner-dim", [S, "--input-shape", "1x0x8"], "--input-shape '1x0x8': dimension 1 is 0"),
    ("huge-dim", [S, "--input-shape", "99999999999x8"],
     "--input-shape '99999999999x8': 799,999,999,992 elements; an example input holds at most 2,147,483,647"),
    ("huge-product", [S, "--input-shape", "65536x65536x8"], "34,359,738,368 elements"),
    ("negative-dim", [S, "--input-shape=-1x8"], "--input-shape '-1x8': dimension 0 is -1"),
    ("i4-input", [S, "--input-shape", "1x8x8:i4"], "--input-shape '1x8x8:i4': a model input cannot be i4"),
    ("torchscript-untrusted", [S, "--input-shape", "1x8x8"],
     "scripted.pt: a TorchScript model is code, and loading it runs that code. Pass --trust-pickle"),
    ("int-input-to-float-linear", [S, "--trust-pickle", "--input-shape", "1x8x8:i64"],
     "linear: integer linear takes an i4, i8, i16 or b1 input, got i64 at node 'linear'"),
    ("calib-int-inputs", [T, "--pipeline", "quantize", "--calib-data", "data_int_inputs.pt"],
     "data_int_inputs.pt (calibration data): input 'x' is int64, the model expects f32"),
    ("calib-bool-inputs", [T, "--pipeline", "quantize", "--calib-data", "data_bool_inputs.pt"],
     "data_bool_inputs.pt (calibration data): input 'x' is bool, the model expects f32"),
    ("calib-float-labels", [T, "--pipeline", "quantize", "--calib-data", "data_float_labels.pt"],
     "data_float_labels.pt (calibration data): labels must be integer class indices"),
    ("calib-npy", [T, "--pipeline", "quantize", "--calib-data", "input_int32.npy"],
     "input_int32.npy: cannot read calibration data (a .npy array, not a torch.save file)"),
    ("calib-model-archive", [T, "--pipeline", "quantize", "--calib-data", "tiny.pt2"],
     "tiny.pt2: cannot read calibration data (a torch.export archive (a model), not a torch.save file)"),
    ("calib-empty", [T, "--pipeline", "quantize", "--calib-data", "empty.pt2"],
     "empty.pt2: cannot read calibration data (an empty file)"),
    ("calib-random", [T, "--pipeline", "quantize", "--calib-data", "random.pt"],
     "random.pt: cannot read calibration data (not a file torch.save writes)"),
    ("train-truncated", [T, "--pipeline", "hp-prune", "--train-data", "truncated.pt2"],
     "truncated.pt2: truncated or corrupt archive"),
    ("train-pickle-payload", [T, "--pipeline", "hp-prune", "--train-data", "pickle_payload.pt"],
     "pickle_payload.pt: cannot read training data (it holds objects other than tensors; loading them would run "
     "code from the file)"),
    ("auto-eval-data-dtype", [T, "--target", "auto", "--pipeline", "select-device{lc=10ms}", "--data",
                              "data_int_inputs.pt"],
     "data_int_inputs.pt (evaluation data): input 'x' is int64, the model expects f32"),
]


def _corpus_path(arg: str) -> str:
    """Corpus file names become paths; options and absolute paths stay."""
    return str(CORPUS / arg) if (CORPUS / arg).exists() and not arg.startswith("-") else arg


@pytest.mark.parametrize("args, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_compile_refuses(args, message, tmp_path, capfd):
    argv = ["compile", _corpus_path(args[0]), *map(_corpus_path, args[1:]), "-o", str(tmp_path / "o")]
    expect_refused(argv, message, tmp_path, capfd)


def test_select_refuses_data_of_the_wrong_dtype(tmp_path, capfd):
    argv = ["select", T, "--lc", "10ms", "--ac", "0.5", "--data", str(CORPUS / "data_int_inputs.pt"),
            "--executor", "inline", "--settings", "fp32"]
    expect_refused(argv, "data_int_inputs.pt (evaluation data): input 'x' is int64, the model expects f32", tmp_path,
                   capfd)


class _Masked(torch.nn.Module):
    """A linear layer, and an additive mask buffer whose -Inf entries are legitimate."""

    def __init__(self, poison: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.fc.weight[0, 0] = poison
        self.register_buffer("mask", torch.triu(torch.full((8, 8), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x) + self.mask, dim=-1)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_non_finite_parameters_are_refused_and_inf_masks_are_not(frontend):
    x = torch.randn(1, 8, 8)
    tcc.compile(_Masked(0.5), (x,), frontend=frontend)
    with pytest.raises(tcc.TccError, match=r"parameter 'fc.weight' holds 1 non-finite value of 64 \(-inf at index"):
        tcc.compile(_Masked(float("-inf")), (x,), frontend=frontend)


def test_the_pickle_payload_is_live(tmp_path, capfd):
    """The control of the pickle cases: trusted, loading it does run its code (so the cases
    above that find no marker show that nothing ran)."""
    assert main(["compile", str(CORPUS / "pickle_payload.pt"), "--trust-pickle", "--input-shape", "1x8x8",
                 "-o", str(tmp_path / "o")]) == 2
    assert_one_line_error(capfd.readouterr().err, "the pickle holds a TextIOWrapper, not an nn.Module")
    assert (tmp_path / MARKER).exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# artifacts: good ones refusing bad inputs, corrupted ones refused by run, eval and inspect

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """An artifact of tiny.pt2, and beside it `data.pt`: unlabelled evaluation data for it."""
    out = tmp_path_factory.mktemp("good") / "artifact"
    assert main(["compile", T, "-q", "-o", str(out)]) == 0
    torch.save({"inputs": torch.randn(4, 8, 8)}, out.parent / "data.pt")
    return out


ARTIFACT_INPUT_CASES = [
    ("run-npy-of-wrong-dtype", ["run", "{a}", "--input", "input_int32.npy", "-o", "{t}/y.pt"],
     "input 'x': expected f32[1,8,8], got int32[1, 8, 8]"),
    ("run-pickle-as-inputs", ["run", "{a}", "--input", "pickle_payload.pt", "-o", "{t}/y.pt"],
     "pickle_payload.pt: cannot read input (it holds objects other than tensors; loading them would run code"),
    ("eval-data-of-wrong-dtype", ["eval", "{a}", "--data", "data_int_inputs.pt"],
     "data_int_inputs.pt (data): input 'x' is int64, the model expects f32"),
    ("run-a-model-file", ["run", "tiny.pt2"], "tiny.pt2: a file, not an artifact directory"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in ARTIFACT_INPUT_CASES],
                         ids=[c[0] for c in ARTIFACT_INPUT_CASES])
def test_artifact_commands_refuse_bad_inputs(good, argv, message, tmp_path, capfd):
    argv = [_corpus_path(a.format(a=good, t=tmp_path)) for a in argv]
    before = snapshot(good)
    expect_refused(argv, message, tmp_path, capfd)
    assert snapshot(good) == before


def _rehash(artifact: Path, name: str) -> None:
    """Record file `name`'s current sha256 in the manifest (an edit that hides itself)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _set_manifest(**fields) -> Callable[[Path], None]:
    def edit(artifact: Path) -> None:
        manifest = json.loads((artifact / "manifest.json").read_text())
        (artifact / "manifest.json").write_text(json.dumps(dict(manifest, **fields)))
    return edit


def _write(name: str, data: bytes | Callable[[bytes], bytes], rehash: bool = False) -> Callable[[Path], None]:
    """Overwrite file `name` with `data` (or `data(old contents)`), then maybe rehash it."""
    def edit(artifact: Path) -> None:
        file = artifact / name
        file.write_bytes(data(file.read_bytes()) if callable(data) else data)
        if rehash:
            _rehash(artifact, name)
    return edit


def _misname_op(text: bytes) -> bytes:
    return text.replace(b"relu(", b"relu2(")


def _transpose_weight_type(text: bytes) -> bytes:
    return text.replace(b"const @fc.weight : f32[4,8]", b"const @fc.weight : f32[8,4]")


def _half(data: bytes) -> bytes:
    return data[:len(data) // 2]


CORRUPTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("manifest-missing", lambda a: (a / "manifest.json").unlink(), "not a tcc artifact (no manifest.json)"),
    ("manifest-not-json", _write("manifest.json", b"{not json"), "manifest.json: invalid JSON at line 1 column 2"),
    ("manifest-not-utf8", _write("manifest.json", b"\xff\xfe\x00"), "manifest.json: not UTF-8 text (byte 0)"),
    ("manifest-a-list", _write("manifest.json", b"[1, 2]"),
     "manifest.json: a JSON list, not a tcc artifact manifest"),
    ("manifest-version-1", _set_manifest(version=1),
     "manifest.json: artifact format version 1; this tcc reads version 3"),
    ("manifest-other-format", _set_manifest(format="onnx"), "manifest.json: 'format' is 'onnx', not 'tcc-artifact'"),
    ("manifest-files-missing", _set_manifest(files=None),
     "manifest.json: 'files' must map file names to sha256 digests"),
    ("manifest-files-escape", _set_manifest(files={"../../etc/passwd": "0" * 64}),
     "manifest.json: 'files' names '../../etc/passwd', outside the artifact directory"),
    ("manifest-files-without-graph", _set_manifest(files={"weights.safetensors": "0" * 64}),
     "manifest.json: 'files' does not list graph.tcc"),
    ("manifest-signature-wrong", _set_manifest(signature={"input_names": ["y"], "output_form": "tensor",
                                                          "output_keys": []}),
     "manifest.json: 'signature' names inputs ['y'], the graph takes ['x']"),
    ("manifest-signature-missing", _set_manifest(signature=None), "manifest.json: 'signature' must hold"),
    ("manifest-target-missing", _set_manifest(target=None),
     "manifest.json: 'target' must be an object with a 'name'"),
    ("graph-edited", _write("graph.tcc", _misname_op),
     "graph.tcc: contents do not match the manifest's hash (corrupted or edited)"),
    ("graph-edited-rehashed", _write("graph.tcc", _misname_op, rehash=True), "graph.tcc:5:11: unknown op 'relu2'"),
    ("graph-retyped-rehashed", _write("graph.tcc", _transpose_weight_type, rehash=True),
     "graph.tcc:4:13: linear: input features (8,) do not match weight [8, 4]"),
    ("graph-binary-rehashed", _write("graph.tcc", b"\xff\x00\x01", rehash=True), "graph.tcc: not UTF-8 text"),
    ("weights-truncated", _write("weights.safetensors", _half),
     "weights.safetensors: contents do not match the manifest's hash"),
    ("weights-truncated-rehashed", _write("weights.safetensors", _half, rehash=True),
     "weights.safetensors: cannot be read"),
    ("weights-deleted", lambda a: (a / "weights.safetensors").unlink(),
     "weights.safetensors: missing from the artifact"),
    ("example-inputs-garbage-rehashed", _write("example_inputs.npz", b"PK\x03\x04garbage", rehash=True),
     "example_inputs.npz: cannot be read"),
    ("example-inputs-hash-mismatch", _write("example_inputs.npz", b"x"),
     "example_inputs.npz: contents do not match the manifest's hash"),
]
COMMANDS = {"run": ["run", "{x}", "-o", "{t}/y.pt"], "eval": ["eval", "{x}", "--data", "{d}"],
            "inspect": ["inspect", "{x}"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corrupt, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_artifact_is_refused(good, corrupt, message, command, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    corrupt(broken)
    argv = [a.format(x=broken, t=tmp_path, d=good.parent / "data.pt") for a in COMMANDS[command]]
    expect_refused(argv, message, tmp_path, capfd)


# ---------------------------------------------------------------------------------------------
# the real command

def test_real_command_refuses_a_torchscript_model_given_the_wrong_dtype(tmp_path):
    """Converting TorchScript, torch logs notes of its own to stderr: the one line stays one."""
    result = run_cli("compile", S, "--trust-pickle", "--input-shape", "1x8x8:i64", "-o", tmp_path / "o", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "integer linear takes an i4, i8, i16 or b1 input, got i64 at node 'linear'")
    assert not result.stdout and not any(tmp_path.iterdir())


def test_real_command_never_runs_the_pickle(tmp_path):
    result = run_cli("compile", CORPUS / "pickle_payload.pt", "--input-shape", "1x8x8", "-o", tmp_path / "o",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--trust-pickle")
    assert not any(tmp_path.iterdir())  # neither the marker nor an output


def test_real_command_refuses_a_corrupted_artifact(good, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    _write("graph.tcc", _misname_op, rehash=True)(broken)
    result = run_cli("run", broken, "-o", tmp_path / "y.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "graph.tcc:5:11: unknown op 'relu2'")
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]
