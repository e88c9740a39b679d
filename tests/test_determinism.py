"""Compiling is deterministic and saving is atomic: the same model compiled twice gives
artifact directories identical byte for byte (in one process, and in two with different hash
seeds); under two host measurements (as on two machines) the manifest and every hashed file
are identical and only the unhashed measured/ differs, which an artifact may lose or have
edited and still load and run; and an interrupted compile leaves no artifact and no staging
directory behind."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import io
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import tcc
from conftest import assert_tiers_agree, run_cli, start_cli
from tcc import report
from tcc.targets import calibration
from tcc.cli import main
from tcc.passes.cost_model import Device
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


def hashed(root: Path) -> dict[str, bytes]:
    """manifest.json and every file its hashes cover, with their bytes."""
    names = json.loads((root / "manifest.json").read_text())["files"]
    return {name: (root / name).read_bytes() for name in ["manifest.json", *names]}


def measured(root: Path) -> dict[str, bytes]:
    """The files under `root`'s measured/, with their bytes."""
    return {name: data for name, data in files(root).items() if name.startswith("measured/")}


def fake_measure(speed: float, template: Device, device: str = "cpu") -> Device:
    """A host measurement: the catalog's placeholder figures, `speed` times faster."""
    return dataclasses.replace(template, fp32_gflops=template.fp32_gflops * speed,
                               int8_gops=template.int8_gops * speed, dram_gbps=template.dram_gbps * speed,
                               op_overhead_us=template.op_overhead_us / speed)


@pytest.mark.parametrize("target, pipeline", [("cpu", "quantize"), ("auto", "quantize,select-device{lc=10s}")])
def test_two_host_measurements_give_the_same_hashed_artifact(digits, target, pipeline, tmp_path, monkeypatch):
    """Two compiles as on two machines: each with a fresh calibration cache, calibrated (by
    `tcc calibrate` before a plain compile, by select-device within one), another measured
    speed of the host and another thread count as the machine reports it. The manifest and
    every file it hashes are identical; the measured/ part (listed in the manifest, unhashed)
    differs; nothing else is written. With select-device, the latencies it logs go to measured/
    as well. (torch's own thread count stays: at another, BLAS may sum calibration's floats in
    another order, and floats are not promised bit for bit across that.)"""
    model, images, _ = digits
    machine = report.machine
    outs = []
    for i, (speed, count) in enumerate(((1.0, 1), (3.0, 2))):
        monkeypatch.setenv("TCC_CACHE", str(tmp_path / f"cache{i}"))
        monkeypatch.setattr(calibration, "measure", functools.partial(fake_measure, speed))
        monkeypatch.setattr(report, "machine", functools.partial(lambda threads: dict(machine(), threads=threads),
                                                                 count))
        if target != "auto":
            assert main(["calibrate", "-q"]) == 0
        outs.append(tcc.compile(model, (images,), target=target, pipeline=pipeline).save(tmp_path / str(i)))
    first, second = outs
    assert hashed(first) == hashed(second)
    listed = json.loads((first / "manifest.json").read_text())["measured"]["files"]
    assert sorted(measured(first)) == sorted(measured(second)) == listed
    assert sorted(files(first)) == sorted([*hashed(first), *listed])
    assert [name for name in listed if measured(first)[name] == measured(second)[name]] == []
    host = [json.loads((out / "measured/host.json").read_text()) for out in outs]
    assert [h["machine"]["threads"] for h in host] == [1, 2]
    assert host[1]["calibration"]["cpu"]["fp32_gflops"] == 3 * host[0]["calibration"]["cpu"]["fp32_gflops"]
    if target == "auto":
        log = json.loads((first / "manifest.json").read_text())["pass_log"]
        assert "select-device: no change; chose edge-cpu ($35, within lc=10000ms)" in log
        assert all(h["pass_log"][0].startswith("select-device: chose edge-cpu at ") for h in host)
        assert host[0]["pass_log"] != host[1]["pass_log"]  # the host cpu's latency, among others


def test_an_artifact_without_or_with_an_edited_measured_part_loads_and_runs(digits, tmp_path):
    """measured/ edited (host.json no longer JSON, a page with a script, a plot replaced by a
    link out of the artifact), then deleted: `tcc.load`, `tcc run` and `tcc inspect` verify
    the hashed files and run as before; what is there of measured/ is carried along as it is
    by a re-save (the link not followed), never read otherwise."""
    model, images, _ = digits
    out = tcc.compile(model, (images,), target="fpga-small", pipeline="quantize").save(tmp_path / "a")
    expected = tcc.load(out).run(on="sim")
    outside = tmp_path / "secret.txt"
    outside.write_text("not the artifact's")
    (out / "measured/host.json").write_text("{ edited")
    (out / "measured/devices.html").write_text("<script>alert(1)</script>")
    (out / "measured/devices.png").unlink()
    (out / "measured/devices.png").symlink_to(outside)
    for case in ("edited", "deleted"):
        loaded = tcc.load(out)
        assert torch.equal(loaded.run(on="sim"), expected)
        assert_tiers_agree(loaded.run(on="numpy").numpy(), expected.numpy())  # another executor
        assert main(["run", str(out), "--on", "numpy", "-q"]) == 0 and main(["inspect", str(out), "-q"]) == 0
        again = loaded.save(tmp_path / case)
        assert {k: v for k, v in hashed(again).items() if k != "manifest.json"} == {
            k: v for k, v in hashed(out).items() if k != "manifest.json"}
        if case == "edited":
            assert measured(again) == {"measured/host.json": b"{ edited",
                                       "measured/devices.html": b"<script>alert(1)</script>"}
            shutil.rmtree(out / "measured")
        else:
            assert measured(again) == {} and "measured" not in json.loads((again / "manifest.json").read_text())


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
