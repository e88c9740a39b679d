"""Compiling is deterministic and saving is atomic: the same model compiled twice gives
artifact directories identical byte for byte (in one process, and in two with different hash
seeds), and an interrupted compile leaves no artifact and no staging directory behind."""

from __future__ import annotations

import builtins
import io
import signal
import time
from pathlib import Path

import pytest
import torch

import tcc
from conftest import run_cli, start_cli
from tcc.zoo import DigitsTransformer

TINY = Path(__file__).resolve().parent / "bad_inputs" / "tiny.pt2"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    """A seeded DigitsTransformer, its example input (16 images) and its torch.export archive."""
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    images = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))
    archive = tmp_path_factory.mktemp("digits") / "digits.pt2"
    torch.export.save(torch.export.export(model, (images,)), archive)
    return model, images, archive


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_identical(a: Path, b: Path) -> None:
    """Artifact directories `a` and `b` hold the same files, byte for byte."""
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert [name for name in fa if fa[name] != fb[name]] == []


@pytest.mark.parametrize("target", ["cpu", "fpga-small"])
def test_compiling_twice_gives_identical_artifacts(digits, target, tmp_path):
    model, images, _ = digits
    first, second = (tcc.compile(model, (images,), target=target, pipeline="quantize", seed=0).save(tmp_path / name)
                     for name in ("first", "second"))
    assert_identical(first, second)


@pytest.mark.slow
def test_compiling_in_two_processes_gives_identical_artifacts(digits, tmp_path, monkeypatch):
    """Two `tcc compile` runs with different hash seeds (set and dict orders of str keys)."""
    for seed in ("0", "1"):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        result = run_cli("compile", digits[2], "--target", "fpga-small", "--pipeline", "quantize", "-q",
                         "-o", tmp_path / seed)
        assert result.returncode == 0, result.stderr
    assert_identical(tmp_path / "0", tmp_path / "1")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    """A KeyboardInterrupt while Artifact.save writes its third file: no artifact and no
    staging directory; an artifact already there stays as it was."""
    artifact = tcc.compile(TINY, target="fpga-small")  # an artifact of many files
    real_open = io.open
    opened: list[str] = []

    def interrupting_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and str(file).startswith(str(tmp_path)):
            opened.append(str(file))
            if len(opened) == 3:
                raise KeyboardInterrupt
        return real_open(file, mode, *args, **kwargs)

    def interrupted_save(out: Path) -> None:
        opened.clear()
        with monkeypatch.context() as patch:
            patch.setattr(io, "open", interrupting_open)
            patch.setattr(builtins, "open", interrupting_open)
            with pytest.raises(KeyboardInterrupt):
                artifact.save(out)
        assert len(opened) == 3  # the interrupt came mid-way, after two files

    interrupted_save(tmp_path / "out")
    assert not any(tmp_path.iterdir())
    previous = artifact.save(tmp_path / "out")
    before = files(previous)
    interrupted_save(previous)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and files(previous) == before


def test_sigint_during_a_compile_leaves_nothing(digits, tmp_path):
    """`tcc compile` fine-tuning, sent SIGINT: exit code 130, `tcc: interrupted`, no output
    directory and no staging directory."""
    data = tmp_path / "train.pt"
    torch.save({"inputs": torch.rand(512, 8, 8), "labels": torch.randint(0, 10, (512,))}, data)
    process = start_cli("compile", digits[2], "--pipeline", "hp-prune{sparsity=0.5,epochs=1000}", "--train-data", data,
                        "-v", "-o", tmp_path / "out", cwd=tmp_path)
    try:
        for line in process.stderr:  # -v logs each pass as it ends: the model is being lowered
            if line.startswith("tcc: pass "):
                break
        time.sleep(0.5)  # into the fine-tuning, which would take minutes
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "tcc: interrupted" and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["train.pt"]
