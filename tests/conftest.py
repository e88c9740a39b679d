"""Shared fixtures: zoo models built once per session, and the CLI run in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from tcc import zoo

ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def built(name: str):
    """(model, example_inputs) of a zoo model, built once."""
    return zoo.build(name)


def eager_outputs(model, inputs) -> list[torch.Tensor]:
    from tcc.frontend import split_inputs
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        return list(torch.utils._pytree.tree_leaves(model(*args, **kwargs)))


# Float results of two executors (or of one on two memory layouts) may differ in the last bits:
# BLAS picks its kernels by CPU and sums in another order for another layout. Integer work is
# promised bit for bit; float work agrees within this tolerance (a few float32 ulps of sums).
FLOAT_TIERS = {"rtol": 1e-5, "atol": 1e-6}


def assert_tiers_agree(actual, expected, name: str = "") -> None:
    """`actual` equals `expected`: bit for bit for integers and booleans, within FLOAT_TIERS for
    floats; the dtypes and shapes must match exactly."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (name, actual.dtype, expected.dtype)
    if np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_allclose(actual, expected, **FLOAT_TIERS, err_msg=name)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = torch.as_tensor(actual).double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tcc ARGS` in a subprocess; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "tcc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_cli_env(), timeout=300)


def start_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """Start `python -m tcc ARGS` (as `run_cli` runs it) and return at once; stdout and stderr
    are pipes of text."""
    return subprocess.Popen([sys.executable, "-m", "tcc", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=_cli_env())


def _cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True, scope="session")
def rtl_cache(tmp_path_factory):
    """Compiled RTL simulators go to the test session's own cache directory, never ~/.cache
    (CLI subprocesses inherit it)."""
    from tcc.runtime.rtl import CACHE_ENV
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("rtl-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


def need(tool: str) -> None:
    """Skip without the program `tool`; under CI=true its absence is a failure."""
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is not installed (CI=true: the tools `make install` sets up are required)")
        pytest.skip(f"{tool} is not installed")


def has_cuda() -> bool:
    return torch.cuda.is_available()


# every executor a test body runs against; the GPU one only where a CUDA device exists
EXECUTORS = ["numpy", "cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not has_cuda(), reason="no CUDA device")])]
