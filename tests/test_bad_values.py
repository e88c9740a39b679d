"""Bad values in inputs and options: every read is bounded before it allocates, no value or
option gives silent garbage (NaN weights with exit 0), and nothing from a file reaches the
terminal raw. Each case exits with code 2 and one line naming the problem (or, in Python, a
TccError), and writes nothing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tcc
from test_bad_inputs import CORPUS, _write, assert_one_line_error, expect_refused, good  # noqa: F401 (a fixture)
from test_targets import USER
from tcc.cli import main
from tcc.ir import DType, GraphBuilder, VerifyError, verify
from tcc.ir.errors import printable
from tcc.ir.types import tensor
from tcc.passes import HPPrune, PassContext, parse_pipeline
from tcc.passes.base import Pass, PassResult, run_pipeline
from tcc.passes.data import Dataset
from tcc.passes.pipeline import describe_passes

T = str(CORPUS / "tiny.pt2")  # x: f32[1,8,8] -> relu(linear 8 -> 4)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _npy(path: Path, shape: tuple[int, ...], data_bytes: int) -> str:
    """A .npy whose header claims f32 `shape` and which holds `data_bytes` bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    path.write_bytes(header.getvalue() + bytes(data_bytes))
    return str(path)


def _saved(path: Path, value) -> str:
    torch.save(value, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. reads bounded before they allocate

def test_npy_headers_are_checked_against_the_file(good, tmp_path, capfd):
    huge = _npy(tmp_path / "huge.npy", (10**15,), 256)
    expect_refused(["run", str(good), "--input", huge],
                   "huge.npy: the header claims 1,000,000,000,000,000 elements; an array tcc reads holds at most "
                   "2,147,483,647", tmp_path, capfd)
    short = _npy(tmp_path / "short.npy", (1, 8, 8), 100)
    expect_refused(["run", str(good), "--input", short],
                   "short.npy: the header claims 256 bytes of data, the file holds 100 (truncated or edited)",
                   tmp_path, capfd)
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 8, 8), np.float32))
    assert main(["run", str(good), "--input", str(tmp_path / "in.npz")]) == 0  # the control: a good .npz runs
    capfd.readouterr()
    lying = tmp_path / "lying.npz"
    with zipfile.ZipFile(lying, "w") as z:
        z.writestr("x.npy", Path(_npy(tmp_path / "member.npy", (10**6,), 64)).read_bytes())
    expect_refused(["run", str(good), "--input", str(lying)],
                   "lying.npz: x.npy: the header claims 4,000,000 bytes of data, the file holds 64", tmp_path, capfd)


BROADCAST = torch.zeros(1, 1, 1).expand(10**4, 10**3, 10**3)  # 4 bytes stored, 40 GB materialised
VIEW_MESSAGE = ("tensor inputs holds 10,000,000,000 elements (a view of 1 stored: materialising it would allocate "
                "the rest); a tensor tcc reads holds at most 2,147,483,647")


@pytest.mark.parametrize("option, what", [("--train-data", "training data"), ("--calib-data", "calibration data")])
def test_broadcast_views_in_data_are_refused_before_use(option, what, tmp_path, capfd):
    data = _saved(tmp_path / "view.pt", {"inputs": BROADCAST})
    expect_refused(["compile", T, "--pipeline", "quantize", option, data, "-o", str(tmp_path / "o")],
                   f"view.pt ({what}): {VIEW_MESSAGE}", tmp_path, capfd)


def test_broadcast_views_are_refused_as_run_inputs_and_eval_data(good, tmp_path, capfd):
    view = _saved(tmp_path / "x.pt", torch.zeros(1).expand(10**10))
    expect_refused(["run", str(good), "--input", view], "x.pt (input): the tensor holds 10,000,000,000 elements",
                   tmp_path, capfd)
    data = _saved(tmp_path / "d.pt", {"inputs": BROADCAST})
    expect_refused(["eval", str(good), "--data", data], f"d.pt (data): {VIEW_MESSAGE}", tmp_path, capfd)


@pytest.mark.parametrize("make, problem", [
    (lambda: torch.sparse_coo_tensor(torch.zeros(3, 0, dtype=torch.long), torch.zeros(0), (10**6, 8, 8)),
     "is a sparse_coo tensor; tcc reads dense ones only"),
    (lambda: torch.empty(10**12, 8, 8, device="meta"), "is on device 'meta', which holds no values to read"),
    (lambda: torch.nested.nested_tensor([torch.zeros(8, 8), torch.zeros(4, 8)]),
     "is a nested tensor; tcc reads dense ones only"),
])
def test_tensors_that_are_not_plain_dense_are_refused(make, problem, good, tmp_path, capfd):
    with warnings.catch_warnings():  # torch's notes on prototype layouts
        warnings.simplefilter("ignore")
        data = _saved(tmp_path / "data.pt", {"inputs": {"x": make()}})
        inputs = _saved(tmp_path / "x.pt", {"x": make()})
    expect_refused(["eval", str(good), "--data", data], f"data.pt (data): tensor inputs['x'] {problem}", tmp_path,
                   capfd)
    expect_refused(["run", str(good), "--input", inputs], f"x.pt (input): tensor x {problem}", tmp_path, capfd)


def test_tensor_subclasses_are_refused():
    from tcc.data import check_tensors

    class Tagged(torch.Tensor):
        pass

    check_tensors({"inputs": [torch.zeros(2), torch.nn.Parameter(torch.zeros(2))]}, "f.pt (data)")  # plain: fine
    with pytest.raises(tcc.TccError, match=r"^f.pt \(data\): tensor inputs\[1\] is a Tagged, a tensor subclass"):
        check_tensors({"inputs": [torch.zeros(2), torch.zeros(2).as_subclass(Tagged)]}, "f.pt (data)")


def test_targets_files_are_regular_and_bounded(tmp_path, capfd):
    fifo = tmp_path / "targets.fifo"
    os.mkfifo(fifo)  # opening it must not wait for a writer
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate((1 << 24) + 1)  # sparse: no disk, but more than a targets file may hold
    for path, message in ((Path("/dev/zero"), "/dev/zero: not a regular file (a directory, FIFO or device)"),
                          (fifo, "targets.fifo: not a regular file (a directory, FIFO or device)"),
                          (big, "big.json: larger than 16,777,216 bytes; not a targets file")):
        assert main(["targets", "--targets-file", str(path)]) == 2
        assert_one_line_error(capfd.readouterr().err, message)


# ---------------------------------------------------------------------------------------------
# 2. a graph that would allocate terabytes is refused before it runs

def _huge_full(text: bytes) -> bytes:
    return text.replace(b"  return %relu", b"  %huge = full() {shape = [1000000, 1000000], value = 0.0} : "
                                           b"f32[1000000,1000000]\n  return %relu")


@pytest.mark.parametrize("command", [["run", "{x}"], ["inspect", "{x}"], ["eval", "{x}", "--data", "{d}"]])
def test_an_edited_graph_allocating_terabytes_is_refused(command, good, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    _write("graph.tcc", _huge_full, rehash=True)(broken)
    argv = [a.format(x=broken, d=good.parent / "data.pt") for a in command]
    expect_refused(argv, "op %huge = full: needs 4,000,000,000,000 bytes at run time; a value may take at most "
                         "17,179,869,184 (16 GiB)", tmp_path, capfd)


def test_the_verifier_bounds_inputs_and_attention_scores():
    b = GraphBuilder()
    q, k, v = (b.input(n, tensor((1, 1, 400_000, 8))) for n in "qkv")  # 12.8 MB each; scores 640 GB
    out = b.op("scaled_dot_product_attention", q, k, v, name="attn")
    with pytest.raises(VerifyError, match=r"^op %attn = scaled_dot_product_attention: needs 640,000,000,000 bytes"):
        verify(b.finish([out]))
    b = GraphBuilder()
    x = b.input("x", tensor((1 << 20, 1 << 20), DType.BOOL))
    with pytest.raises(VerifyError, match=r"^input 'x': needs 1,099,511,627,776 bytes at run time"):
        verify(b.finish([b.op("relu", b.op("cast", x, dtype=DType.F32))]))


# ---------------------------------------------------------------------------------------------
# 3. float fields and options: finite and in range

@pytest.mark.parametrize("value, message", [
    ("nan", "--accel: clock_mhz must be a finite number, got nan"),
    ("inf", "--accel: clock_mhz must be a finite number, got inf"),
    ("0", "--accel: clock_mhz must lie in [1, 1000] (an FPGA fabric's clock), got 0.0"),
])
def test_accel_clock_is_finite_and_in_range(value, message, tmp_path, capfd):
    expect_refused(["compile", T, "--target", "fpga-small", "--accel", f"clock_mhz={value}", "-o",
                    str(tmp_path / "o")], message, tmp_path, capfd)


@pytest.mark.parametrize("spec, message", [
    ("hp-prune{lr=inf}", "hp-prune: option 'lr' must be in (0, 1], got inf"),
    ("hp-prune{lr=nan}", "hp-prune: option 'lr' must be in (0, 1], got nan"),
    ("block-prune{temperature=1e-300}", "block-prune: option 'temperature' must be in [0.1, 100], got 1e-300"),
    ("hp-prune{sparsity=nan}", "hp-prune: option 'sparsity' must be in [0, 1), got nan"),
    ("quantize{percentile=inf}", "quantize: option 'percentile' must be in (0, 100], got inf"),
    ("select-device{lc=10ms,ac=nan}", "select-device: option 'ac' must be in [0, 1], got nan"),
    ("binarize{attn_bits=9}", "binarize: option 'attn_bits' must be in [1, 8], got 9"),
    ("hp-prune{epochs=-1}", "hp-prune: option 'epochs' must be >= 0, got -1"),
])
def test_pass_options_are_finite_and_in_their_range(spec, message, tmp_path, capfd):
    with pytest.raises(tcc.TccError, match="^pipeline column 1: " + re.escape(message)):
        parse_pipeline(spec)
    expect_refused(["compile", T, "--pipeline", spec, "-o", str(tmp_path / "o")], message, tmp_path, capfd)


def test_ranges_hold_outside_pipelines_and_show_in_passes():
    assert HPPrune(lr=1.0).lr == 1.0
    with pytest.raises(tcc.TccError, match=r"hp-prune: option 'lr' must be in \(0, 1\], got inf"):
        HPPrune(lr=float("inf"))
    assert _Unranged(scale=-1e9).scale == -1e9  # a float option without a range: any finite value
    with pytest.raises(tcc.TccError, match=r"^unranged: option 'scale' must be a finite number, got nan"):
        _Unranged(scale=float("nan"))
    options = {o["name"]: o for o in next(p for p in describe_passes({"hp-prune": HPPrune}))["options"]}
    assert options["lr"]["range"] == "in (0, 1]" and options["epochs"]["range"] == ">= 0"
    assert options["scope"]["range"] is None


# ---------------------------------------------------------------------------------------------
# 4. no silent garbage: non-finite data, non-finite results of a pass, all-zero calibration

@pytest.mark.parametrize("option, what, pipeline", [("--train-data", "training data", "hp-prune{epochs=1}"),
                                                     ("--calib-data", "calibration data", "quantize")])
def test_data_holding_nan_is_refused(option, what, pipeline, tmp_path, capfd):
    x = torch.randn(16, 8, 8)
    x[3, 1, 2] = float("nan")
    data = _saved(tmp_path / "nan.pt", {"inputs": x})
    expect_refused(["compile", T, "--pipeline", pipeline, option, data, "-o", str(tmp_path / "o")],
                   f"nan.pt ({what}): input 'x' holds 1 non-finite value of 1,024 (nan at index [3, 1, 2]); "
                   "tcc reads finite data only", tmp_path, capfd)


def test_eval_data_holding_inf_is_refused(good, tmp_path, capfd):
    x = torch.randn(4, 8, 8, dtype=torch.float64)
    x[0, 0, 0] = 1e300  # finite in f64, +inf in the model's f32
    data = _saved(tmp_path / "big.pt", {"inputs": x})
    expect_refused(["eval", str(good), "--data", data],
                   "big.pt (data): input 'x' holds 1 non-finite value of 256 (inf at index [0, 0, 0])", tmp_path, capfd)


@dataclasses.dataclass(frozen=True)
class _Poison(Pass):
    """Test pass: sets `fc.weight[0, 1]` to `value` (a float's text: options are finite), or
    adds constant `mask` holding it."""

    name = "poison"
    summary = "test"
    value: str = "0"
    new: bool = False

    def run(self, graph, ctx):
        if self.new:
            mask = np.array([0, float(self.value)], np.float32)
            return PassResult(graph.replace(constants=graph.constants + (("mask", tensor((2,))),),
                                            weights={**graph.weights, "mask": mask}), True)
        w = np.array(graph.weights["fc.weight"])
        w[0, 1] = float(self.value)
        return PassResult(graph.replace(weights={**graph.weights, "fc.weight": w}), True)


@dataclasses.dataclass(frozen=True)
class _Unranged(Pass):
    name = "unranged"
    summary = "test"
    scale: float = 1.0


def _tiny_graph():
    return tcc.compile(T).graph


@pytest.mark.parametrize("poison, message", [
    (_Poison(value="nan"), "poison: produced non-finite weights: constant 'fc.weight' holds 1 non-finite value of 32 "
                           "(nan at index [0, 1])"),
    (_Poison(value="inf"), "poison: produced non-finite weights: constant 'fc.weight' holds 1 non-finite value of 32 "
                           "(inf at index [0, 1])"),
    (_Poison(value="nan", new=True), "poison: produced non-finite weights: constant 'mask' holds 1 non-finite value "
                                     "of 2 (nan at index [1])"),
])
def test_the_runner_fails_a_pass_that_leaves_non_finite_weights(poison, message):
    with pytest.raises(tcc.TccError, match="^" + re.escape(message)):
        run_pipeline(_tiny_graph(), [poison], PassContext())


def test_a_new_constant_may_hold_minus_inf():
    """Masks that fold to -inf are legitimate (as the frontend lets buffers hold them)."""
    graph = run_pipeline(_tiny_graph(), [_Poison(value="-inf", new=True)], PassContext())
    assert graph.weights["mask"][1] == -np.inf


def test_calibration_data_giving_an_all_zero_range_is_refused(tmp_path, capfd):
    data = _saved(tmp_path / "zeros.pt", {"inputs": torch.zeros(16, 8, 8)})
    expect_refused(["compile", T, "--pipeline", "quantize", "--calib-data", data, "-o", str(tmp_path / "o")],
                   "zeros.pt saw only zeros in %x: no range to take its scale from (calibrate on data that exercises "
                   "it: --calib-data)", tmp_path, capfd)


def test_datasets_from_python_are_checked_too():
    graph = _tiny_graph()
    x = torch.randn(4, 8, 8)
    Dataset((x,)).fit(graph)
    x[2, 0, 0] = float("-inf")
    with pytest.raises(tcc.TccError, match=r"^mine \(training data\): input 'x' holds 1 non-finite value of 256 "
                                           r"\(-inf at index \[2, 0, 0\]\)"):
        Dataset((x,), source="mine").fit(graph, "training data")


# ---------------------------------------------------------------------------------------------
# 5. output hygiene: nothing from a file reaches the terminal raw

EVIL = "a\x1b[2J\x1b]0;owned\x07\r\u202eb"


def test_printable_escapes_controls_and_bidi_and_keeps_text():
    assert printable(EVIL) == "a\\x1b[2J\\x1b]0;owned\\x07\\r\\u202eb"
    assert printable("naïve 日本 ok") == "naïve 日本 ok"
    assert printable("two\nlines") == "two\\nlines"


def _clean(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\r\u202e"), repr(text)


def test_the_error_line_escapes_names(tmp_path, capfd):
    assert main(["run", str(tmp_path / f"missing{EVIL}")]) == 2
    err = capfd.readouterr().err
    _clean(err)
    assert len(err.splitlines()) == 1 and "\\x1b[2J" in err and "\\u202e" in err


def test_the_pass_log_and_verbose_log_escape_names(tmp_path, capfd):
    data = _saved(tmp_path / f"calib{EVIL}.pt", {"inputs": torch.randn(8, 8, 8)})
    assert main(["compile", T, "-v", "--pipeline", "quantize", "--calib-data", data, "-o", str(tmp_path / "o")]) == 0
    out, err = capfd.readouterr()
    _clean(out)
    _clean(err)
    assert "calibrated on" in out and "\\x1b[2J" in out and "calibrated on" in err


def test_the_targets_table_escapes_descriptions(tmp_path, capfd):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"tiny-cpu": dict(USER["tiny-cpu"], description=f"evil {EVIL}")}))
    assert main(["targets", "--targets-file", str(path)]) == 0
    out = capfd.readouterr().out
    _clean(out)
    assert "evil a\\x1b[2J" in out
