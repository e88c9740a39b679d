"""benchmarks/formats.py on one BERT-base layer: every size target and encode check passes."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_formats_benchmark_passes_on_one_layer():
    result = subprocess.run([sys.executable, "benchmarks/formats.py", "--layers", "1"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if line.strip().startswith("PASS")]
    assert "FAIL" not in result.stdout
    assert any("CSR(int32) at 90%" in line for line in passed)
    assert sum("of the lower bound" in line for line in passed) == 4
    assert sum("HP encode" in line for line in passed) == 4
