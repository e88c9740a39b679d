"""The co-design explorer (`tcc explore`): the space file and its errors, the Pareto set and
the choice, faults for robustness, a study that resumes without repeating an evaluation and
refuses another model, workers sharing one study, and the report."""

from __future__ import annotations

import json
import time

import numpy as np
import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from tcc.cli import main
from tcc.explore import (FPGA, Outcome, describe, dominates, explored_target, flip_bits, load_space, open_study,
                         pareto_front, relevant, setting_name, setting_steps, storage_url, watch_study)
from tcc.ir.errors import TccError
from tcc.ir import DType, GraphBuilder, TensorType, verify
from tcc.passes import parse_pipeline
from tcc.targets import load_catalog
from tcc.zoo import digits_data, train_digits

SPACE = {"base": "fpga-medium", "hardware": {"array": [8, 16]},
         "compression": {"prune": ["none", "hp"], "sparsity": [0.5], "int_nonlinear": [False, True]},
         "devices": ["jetson"], "objectives": ["metric", "latency", "energy", "area", "robustness"],
         "robustness": {"flip_rate": 0.01, "noise": 0.2}}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A trained digits Transformer exported at batch 1, its test data and a space file."""
    x_train, x_test, y_train, y_test = digits_data()
    model = train_digits(x_train, y_train, epochs=10).eval()
    d = tmp_path_factory.mktemp("explore")
    torch.export.save(torch.export.export(model, (x_test[:1],)), d / "model.pt2")
    torch.save({"inputs": x_test[:200], "labels": y_test[:200]}, d / "test.pt")
    (d / "space.json").write_text(json.dumps(SPACE))
    return d


def _space(tmp_path, **changes) -> str:
    space = json.loads(json.dumps(SPACE))
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if not name and value is None:
            del space[section]
        elif not name:
            space[section] = value
        elif value is None:
            del space[section][name]
        else:
            space[section][name] = value
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def test_the_space_is_a_grid_of_points_with_settings_that_matter():
    space = load_space_from(SPACE)
    # settings: none x 2 int-nonlinear, hp 0.5 x 2 = 4; devices: 2 arrays + jetson
    assert space.grid_size() == 12 == len({json.dumps(p, sort_keys=True) for p in space.grid()})
    assert {p["device"] for p in space.grid()} == {FPGA, "jetson"}
    assert all("sparsity" not in p for p in space.grid() if p["prune"] == "none")
    assert not relevant("prune", {"binarize": "w1a1"}) and relevant("tws", {"binarize": "w1a8"})
    assert setting_steps({"prune": "hp", "sparsity": 0.5, "int_nonlinear": True}, (8, 8)) == (
        "hp-prune{sparsity=0.5,block=8x8}", "conv-as-gemm,pool-late,canonicalize,dce,quantize{bits=8}",
        "int-nonlinear")
    assert setting_steps({"binarize": "w1a1", "tws": True}, (16, 16)) == ("binarize{mode=w1a1,tws=true}",)
    assert setting_name({"prune": "blocks", "sparsity": 0.75, "int_nonlinear": True}) == "blocks75-int8-integer"
    assert setting_name({"binarize": "w1a1", "tws": True, "int_nonlinear": True}) == "w1a1-tws"
    assert "base" not in space.grid()[0] and space.to_json()["base"] == "fpga-medium"
    per_kind = load_space_from(SPACE | {"compression": {"prune": ["hp"], "sparsity": {"attention": [0.5, 0.75],
                                                                                      "ffn": [0.9]}}})
    assert per_kind.grid_size() == 3 * 2
    point = {"prune": "hp", "sparsity.attention": 0.5, "sparsity.ffn": 0.9}
    assert setting_steps(point, (16, 16))[:2] == ("hp-prune{sparsity=0.5,block=16x16,kinds=qkv+attn_out}",
                                                  "hp-prune{sparsity=0.9,block=16x16,kinds=ffn1+ffn2}")
    assert setting_name(point) == "hp-attention50-ffn90-int8"


def test_a_space_searches_several_parts_each_accelerator_on_its_own():
    space = load_space_from(SPACE | {"base": ["fpga-small", "fpga-medium"], "hardware": {"array": [8, 16]}})
    accelerators = [p for p in space.grid() if p["device"] == FPGA]
    assert len(accelerators) == 2 * 2 * 4 and {p["base"] for p in accelerators} == {"fpga-small", "fpga-medium"}
    catalog = load_catalog()

    def target(base, array):
        point = Outcome({"device": FPGA, "base": base, "array": array}, (), {}, 0.0, 0.0)
        return explored_target(point, space.to_json(), catalog)

    small = target("fpga-small", 8)
    assert (small.part.name, small.accel.rows, small.device.price_usd) == (
        "xc7z020", 8, catalog["fpga-small"].device.price_usd)
    assert target("fpga-medium", 16).part.name == "xczu7ev"
    with pytest.raises(TccError, match="does not fit xc7z020"):
        target("fpga-small", 16)  # the part's resources, not the other part's: a pruned trial
    assert describe(Outcome({"device": FPGA, "base": "fpga-small", "array": 8}, (), {"metric": 0.5}, 1.0, 0.0)
                    ).startswith("fpga on fpga-small (rows=8,cols=8) with int8")


def load_space_from(raw: dict, tmp_path=None):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "space.json"
        path.write_text(json.dumps(raw))
        return load_space(path, load_catalog())


@pytest.mark.parametrize("changes, message", [
    ({"hardware.rowz": [8]}, "hardware: unknown parameter 'rowz'; did you mean 'rows'?"),
    ({"compression.sparsity": {"low": 0.9, "high": 0.5, "step": 0.1}}, "compression.sparsity: empty range"),
    ({"compression.prune": []}, "compression.prune: empty list of values"),
    ({"hardware.data_bits": [7]}, "hardware.data_bits: the accelerator cannot be built with 7"),
    ({"hardware.array": [256]}, "no accelerator of the space fits"),
    ({"compression.bits": [3]}, "compression.bits: 3 is not one of 8, 4"),
    ({"devices": ["jetsun"]}, "devices: unknown parameter 'jetsun'; did you mean 'jetson'?"),
    ({"objectives": ["metric", "speed"]}, "objectives: unknown parameter 'speed'"),
    ({"base": "cpu"}, "base: \"cpu\" is not an FPGA target"),
    ({"base": ["fpga-medium", "cpu"]}, "base: \"cpu\" is not an FPGA target"),
    ({"base": []}, "base: empty list of values"),
    ({"base": ["fpga-small"], "hardware.array": [32]}, "no accelerator of the space fits xc7z020"),
    ({"compression.sparsity": {"atention": [0.5]}}, "compression.sparsity: unknown parameter 'atention'; did you mean "
                                                     "'attention'?"),
    ({"compression.sparsity": {"attention": [0.5], "qkv": [0.9]}}, "layer kind qkv is in two groups"),
    ({"compression.sparsity": {"ffn": [1.5]}}, "compression.sparsity.ffn: 1.5 is not one of a sparsity"),
    ({"robustness": {"flip_rate": 2}}, "robustness.flip_rate must be a number in [0, 1]"),
])
def test_bad_spaces_are_refused_naming_the_field(digits, tmp_path, capsys, changes, message):
    space = _space(tmp_path, **changes)
    study = tmp_path / "study"
    assert main(["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space", space,
                 "--budget", "2", "--study", str(study)]) == 2
    err = capsys.readouterr().err
    assert message in err and space in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not study.exists()  # nothing written


@pytest.mark.parametrize("budget, message", [("0", "--budget: at least 1 point"),
                                             ("13", "--budget 13 is more than the space's 12 points")])
def test_an_unreachable_budget_is_refused(digits, tmp_path, capsys, budget, message):
    study = tmp_path / "study"
    assert main(["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space",
                 str(digits / "space.json"), "--budget", budget, "--study", str(study)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not study.exists()


def _finished(study_dir) -> int:
    """Points evaluated so far, read from the store without opening it as a study (which would
    race the exploration creating its tables)."""
    import sqlite3
    try:
        with sqlite3.connect(f"file:{study_dir / 'study.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'outcome'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _completed(study_dir) -> list:
    study = optuna.load_study(study_name="tcc-explore", storage=storage_url(str(study_dir)))
    return [t for t in study.trials if "outcome" in t.user_attrs]


def test_explore_resumes_without_repeating_an_evaluation_and_reports(digits, tmp_path, capsys):
    study, report = tmp_path / "study", tmp_path / "report"
    args = ["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space",
            str(digits / "space.json"), "--study", str(study)]
    assert main(args + ["--budget", "3"]) == 0
    assert len(_completed(study)) == 3 and "3 of 12 points" in capsys.readouterr().out
    assert main(args + ["--budget", "8", "--lc", "1s", "--ac", "0.8", "--report", str(report), "--json"]) == 0
    trials = _completed(study)
    assert len(trials) == 8 == len({t.user_attrs["key"] for t in trials})  # 5 more, none twice
    result = json.loads(capsys.readouterr().out)
    assert result["evaluated"] == 8 and result["chosen"] is not None
    points = [Outcome(**(p | {"steps": tuple(p["steps"])})) for p in result["points"]]
    front = result["pareto"]
    objectives = SPACE["objectives"]
    for p in front:  # the Pareto set: no point dominates a member
        assert not any(dominates(q.values, p["values"], objectives) for q in points)
    # the metric and robustness are the setting's (its steps: the prune block is the array's tile),
    # whatever else the hardware is
    by_setting = {}
    for p in points:
        by_setting.setdefault(p.steps, set()).add((p.values["metric"], p.values["robustness"]))
    assert all(len(v) == 1 for v in by_setting.values()) and len(by_setting) >= 2
    assert {p.steps[0] for p in points if p.params.get("prune") == "hp" and p.params.get("array") == 8} <= {
        "hp-prune{sparsity=0.5,block=8x8}"}
    # throughput: a fixed device runs one run after another; a board's host, link and
    # accelerator each work on another run, so it is at least one run per latency
    for p in points:
        runs_per_s = 1e3 / p.latency_ms  # the model's batch is one example
        if p.params["device"] == FPGA:  # the link's transfers overlap the next run's accelerator time
            assert runs_per_s < p.values["throughput"] < 2 * runs_per_s
        else:
            assert p.values["throughput"] == pytest.approx(runs_per_s)
    # the fixed device's area is a whole chip; an accelerator's a fraction of the part
    assert {p.values["area"] for p in points if p.params["device"] == "jetson"} == {1.0}
    assert all(0 < p.values["area"] < 1 for p in points if p.params["device"] == FPGA)
    assert all(p.values["area"] == max(p.values[r] for r in ("lut", "ff", "dsp", "bram")) for p in points)
    assert (report / "report.html").is_file() and (report / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "explore.json").read_text())["evaluated"] == 8
    # tcc compile --target auto compiles the point the exploration chose under the same constraints
    out = tmp_path / "out"
    assert main(["compile", str(digits / "model.pt2"), "--target", "auto", "--study", str(study), "--lc", "1s",
                 "--ac", "0.8", "-o", str(out)]) == 0
    manifest, chosen = json.loads((out / "manifest.json").read_text()), result["chosen"]
    assert f"--study {study}: " in capsys.readouterr().out
    if chosen["params"]["device"] == FPGA:
        assert manifest["target"]["name"] == "fpga-medium"
        assert manifest["target"]["accel"]["rows"] == manifest["target"]["accel"]["cols"] == chosen["params"]["array"]
    else:
        assert manifest["target"]["name"] == chosen["params"]["device"]
    ran = [p.name for p in parse_pipeline(",".join(["fold-constants,canonicalize,dce", *chosen["steps"]]))]
    assert manifest["passes"][:len(ran)] == ran
    assert ("hp-prune" in ran) == (chosen["params"].get("prune") == "hp")


def test_synth_checks_each_accelerator_of_the_pareto_set_once(digits, tmp_path, capsys, monkeypatch):
    calls = []

    def yosys(target):  # yosys stand-in: the 16x16 accelerator needs ten times the part's LUTs
        calls.append(target.accel.rows)
        lut = 10 * target.part.lut if target.accel.rows == 16 else target.part.lut // 2
        return {"LUT": lut, "FF": 1, "DSP": 1, "BRAM": 1, "URAM": 0, "seconds": 0.0}

    monkeypatch.setattr("tcc.explore.synthesize_target", yosys)
    space = _space(tmp_path, compression={"int_nonlinear": [True]}, devices=None)  # 2 points: the arrays
    study = tmp_path / "study"
    args = ["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space", space,
            "--study", str(study), "--budget", "2", "--sampler", "grid", "--synth", "--lc", "1s", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(calls) == [8, 16]  # each config once; the 16x16 was on the estimate's front
    assert result["evaluated"] == 2  # the dropped point was evaluated all the same
    accelerators = [p for p in result["pareto"] if p["params"]["device"] == FPGA]
    assert accelerators and all(p["params"]["array"] == 8 and p["synthesized"]["LUT"] == 0.5 for p in accelerators)
    assert result["chosen"]["params"]["array"] == 8  # the 16x16, as cheap and faster, does not fit
    assert main(args) == 0 and sorted(calls) == [8, 16]  # resumed: the study keeps yosys' counts
    # tcc compile --study takes yosys' verdicts too
    out = tmp_path / "out"
    assert main(["compile", str(digits / "model.pt2"), "--target", "auto", "--study", str(study), "--lc", "1s",
                 "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["target"]["accel"]["rows"] == 8


def test_the_workers_progress_is_read_from_the_store(tmp_path, capsys):
    space, store = load_space_from(SPACE), str(tmp_path / "study")
    study = open_study(store, space, "model")
    with watch_study(store, space, "model", 4, True, every=0.05):
        for key in ("a", "b", "b"):  # a worker's repeat of a point is no new point
            study.add_trial(optuna.trial.create_trial(values=[0.5] * 5, user_attrs={"key": key}))
        time.sleep(0.5)
    assert "2/4" in capsys.readouterr().err


def test_compiling_a_fine_tuned_exploration_needs_its_training_data(digits, tmp_path, capsys):
    space = _space(tmp_path, base="", hardware=None, devices=["jetson"],
                   compression={"prune": ["hp"], "sparsity": [0.5]})  # one point, pruned and fine-tuned
    study = tmp_path / "study"
    test = torch.load(digits / "test.pt", weights_only=True)
    torch.save({"inputs": test["inputs"][:32], "labels": test["labels"][:32]}, tmp_path / "train.pt")  # quick to tune on
    assert main(["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--train-data",
                 str(tmp_path / "train.pt"), "--space", space, "--study", str(study), "--budget", "1"]) == 0
    capsys.readouterr()
    assert main(["compile", str(digits / "model.pt2"), "--target", "auto", "--study", str(study), "--lc", "1s",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the exploration fine-tuned hp50-int8 on its training data: give that file as --train-data" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_study_of_another_model_is_refused(digits, tmp_path, capsys):
    study = tmp_path / "study"
    args = ["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space",
            str(digits / "space.json"), "--study", str(study), "--budget", "1"]
    assert main(args) == 0
    capsys.readouterr()
    other = train_digits(*digits_data()[::2], epochs=1).eval()
    torch.export.save(torch.export.export(other, (torch.rand(1, 8, 8),)), tmp_path / "other.pt2")
    args[1] = str(tmp_path / "other.pt2")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the study explores another model" in err and err.count("\n") == 1, err
    for study_arg, message in ((study, "the study explores another model"),
                               (tmp_path / "none", "no exploration there")):
        assert main(["compile", str(tmp_path / "other.pt2"), "--target", "auto", "--study", str(study_arg),
                     "--lc", "1s", "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_workers_share_one_study(digits, tmp_path, executor):
    study = tmp_path / "study"
    result = run_cli("explore", digits / "model.pt2", "--data", digits / "test.pt", "--space",
                     digits / "space.json", "--study", study, "--budget", "6", "--executor", executor,
                     "--workers", "2")
    assert result.returncode == 0, result.stderr
    keys = [t.user_attrs["key"] for t in _completed(study)]
    assert len(keys) >= 6 and len(set(keys)) == len(keys)  # shared: no point evaluated twice


@pytest.mark.slow
def test_grid_sampler_walks_the_whole_grid(digits, tmp_path):
    study = tmp_path / "study"
    result = run_cli("explore", digits / "model.pt2", "--data", digits / "test.pt", "--space",
                     digits / "space.json", "--study", study, "--budget", "12", "--sampler", "grid")
    assert result.returncode == 0, result.stderr
    assert len({t.user_attrs["key"] for t in _completed(study)}) == 12


values = st.fixed_dictionaries({o: st.floats(0, 10, allow_nan=False) for o in ("metric", "latency", "energy")})


@settings(max_examples=60, deadline=None)
@given(st.lists(values, min_size=1, max_size=12))
def test_the_pareto_set_is_exactly_the_non_dominated_points(all_values):
    objectives = ("metric", "latency", "energy")
    points = [Outcome({"device": str(i)}, (), v, v["latency"], v["energy"]) for i, v in enumerate(all_values)]
    front = pareto_front(points, objectives)
    assert front
    for p in points:
        dominated = any(dominates(q.values, p.values, objectives) for q in points)
        assert (p in front) != dominated


def test_bit_flips_at_rate_one_invert_every_bit_and_are_seeded():
    b = GraphBuilder("g")
    x = b.input("x", TensorType((2, 4), DType.I8))
    w = b.constant("w", np.array([[1, -2, 3, -128], [0, 5, 127, -1]], np.int8), DType.I8)
    graph = verify(b.finish([b.op("linear", x, w)]))
    assert flip_bits(graph, 0.0, 0) is graph
    inverted = flip_bits(graph, 1.0, 0).weights["w"]
    np.testing.assert_array_equal(inverted, ~graph.weights["w"])  # two's complement: every bit flipped
    some = flip_bits(graph, 0.3, 7).weights["w"]
    np.testing.assert_array_equal(some, flip_bits(graph, 0.3, 7).weights["w"])
    assert not np.array_equal(some, graph.weights["w"])


@pytest.mark.slow
def test_an_interrupted_exploration_resumes(digits, tmp_path):
    """Ctrl-C in the middle of a study: exit 130, the finished points stay in the store, and the
    same command finishes the budget without evaluating any point twice."""
    import signal
    import time

    from conftest import start_cli
    study = tmp_path / "study"
    args = ["explore", digits / "model.pt2", "--data", digits / "test.pt", "--space", digits / "space.json",
            "--study", study, "--budget", "12"]
    process = start_cli(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and _finished(study) < 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (0, 130), err  # 0: it finished first
    before = len(_completed(study))
    assert before >= 2
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    keys = [t.user_attrs["key"] for t in _completed(study)]
    assert len(keys) == 12 == len(set(keys)) and "12 of 12 points" in again.stdout


def test_ternary_weight_splitting_without_training_data_is_refused(digits, tmp_path, capsys):
    space = _space(tmp_path, compression={"binarize": ["w1a8"], "tws": [True]})
    study = tmp_path / "study"
    assert main(["explore", str(digits / "model.pt2"), "--data", str(digits / "test.pt"), "--space", space,
                 "--budget", "1", "--study", str(study)]) == 2
    err = capsys.readouterr().err
    assert "compression.tws: ternary weight splitting trains: give --train-data" in err and err.count("\n") == 1
    assert not study.exists()
