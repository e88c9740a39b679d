"""examples/compress_digits.py --quick end to end: trains, compiles three artifacts through the
CLI, evaluates them and prints the accuracy table (about 25 s on two cores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # the example end to end, as the demo's test: its steps run in test_cli_compress
def test_compress_digits_quick(tmp_path):
    # one intra-op thread: on a busy 2-core machine two threads make the tiny model's training
    # many times slower (the example and its `tcc` subprocesses inherit this)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "compress_digits.py"), "--quick",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("artifact ") and "accuracy" in line)
    rows = {line[:20].strip(): line[20:].split() for line in lines[header + 1:] if not line.startswith("compress")}
    assert list(rows) == ["fp32", "int8", "hp-prune 75%"]
    accuracies = {name: float(values[0]) for name, values in rows.items()}
    assert accuracies["fp32"] > 0.9 and all(a > 0.8 for a in accuracies.values()), accuracies
    assert rows["hp-prune 75%"][-1].startswith("hp-prune{sparsity=0.75")
    assert lines[-1] == "compress_digits OK"
    assert (tmp_path / "out" / "hp75.tcc" / "manifest.json").is_file()
