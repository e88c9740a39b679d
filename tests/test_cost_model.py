"""The cost model: the roofline of CPUs and GPUs, the accelerator's cycles plus its host ops on
FPGAs, measured devices and their cache."""

from __future__ import annotations

import dataclasses
import json
import statistics

import numpy as np
import pytest
import torch

import tcc
from tcc.targets import calibration
from tcc.backends.accel.codegen import generate
from tcc.ir import DType, GraphBuilder, TensorType
from tcc.passes import PassContext, SelectFormat
from tcc.passes.cost_model import AccelRun, Cost, Device, accelerator, op_seconds, roofline
from tcc.runtime.accel_executor import AccelExecutor
from tcc.targets import cycle_model, load_catalog
from tcc.zoo import DigitsTransformer

UNIT = Device("unit", "cpu", price_usd=1, power_w=10, dram_gbps=1, onchip_mb=0, fp32_gflops=1, int8_gops=4,
              op_overhead_us=2)


def linear_graph(weight: np.ndarray, dtype: DType = DType.F32):
    g = GraphBuilder("one_linear")
    x = g.input("x", TensorType((4, weight.shape[1]), dtype))
    y = g.op("linear", x, g.constant("w", weight, dtype))
    return g.finish([g.op("reshape", y, shape=[4 * weight.shape[0]])])


def test_roofline_takes_the_longer_of_work_and_traffic_plus_the_fixed_cost():
    graph = linear_graph(np.ones((16, 8)))
    # linear: 2*4*16*8 = 1024 FLOPs at 1 GFLOP/s (1.024 us) vs 256 + 128 + 512 bytes at 1 GB/s
    # (0.896 us); the reshape is a view: its fixed cost only
    cost = roofline(graph, UNIT)
    assert cost.parts == pytest.approx({"linear": 3.024e-6, "reshape": 2e-6})
    assert cost.latency_s == pytest.approx(5.024e-6) and cost.energy_j == pytest.approx(10 * 5.024e-6)
    slow_memory = dataclasses.replace(UNIT, fp32_gflops=100)
    assert roofline(graph, slow_memory).parts["linear"] == pytest.approx(0.896e-6 + 2e-6)
    integer = roofline(linear_graph(np.ones((16, 8)), DType.I8), UNIT)  # products at int8_gops, 1-byte values
    assert integer.parts["linear"] == pytest.approx(max(1024 / 4e9, (64 * 4 + 32 + 128) / 1e9) + 2e-6)  # i32 out


def test_a_gather_reads_the_rows_it_gathers_not_its_whole_table():
    g = GraphBuilder("lookup")
    ids = g.input("ids", TensorType((4,), DType.I64))
    rows = g.op("embedding", g.constant("table", np.ones((1000, 8)), DType.F32), ids)
    # 4 rows of 8 floats read and written (128 bytes each way) and 4 i64 ids: 288 bytes at 1 GB/s,
    # not the table's 32,000 bytes
    assert roofline(g.finish([rows]), UNIT).parts["embedding"] == pytest.approx(0.288e-6 + 2e-6)


def test_measured_costs_per_kind_replace_the_defaults():
    """Per kind and operand dtype (else per kind, else the default): a fixed cost and a factor
    on the roofline time, one when the op's bytes fit on chip and one when they do not."""
    costs = (("linear:f32", 5.0, 2.0, 3.0), ("linear", 9.0, 9.0, 9.0), ("reshape", 0.5, 1.0, 1.0))
    off_chip = dataclasses.replace(UNIT, op_costs=costs)  # no cache figure: every op off chip
    graph = linear_graph(np.ones((16, 8)))
    assert roofline(graph, off_chip).parts == pytest.approx({"linear": 5e-6 + 3 * 1.024e-6, "reshape": 0.5e-6})
    on_chip = dataclasses.replace(off_chip, onchip_mb=1, cache_gbps=1)
    assert roofline(graph, on_chip).parts["linear"] == pytest.approx(5e-6 + 2 * 1.024e-6)
    integer = roofline(linear_graph(np.ones((16, 8)), DType.I8), off_chip)  # no linear:i8: the kind's
    assert integer.parts["linear"] == pytest.approx(9e-6 + 9 * 0.416e-6)


def test_sparse_weights_count_their_nonzeros_at_the_sparse_kernels_rate():
    rng = np.random.default_rng(0)
    weight = np.where(rng.random((64, 64)) < 0.1, 1.0, 0.0)
    dense = linear_graph(weight)
    sparse = SelectFormat(format="csr")(dense, PassContext())
    assert str(sparse.types["w"].encoding) != str(dense.types["w"].encoding)
    fast = dataclasses.replace(UNIT, dram_gbps=1e6)  # compute-bound
    ratio = (roofline(sparse, fast).parts["linear"] - 2e-6) / (roofline(dense, fast).parts["linear"] - 2e-6)
    assert ratio == pytest.approx(np.count_nonzero(weight) / weight.size / 0.3)


def test_accelerator_latency_is_its_cycles_plus_the_host_ops_on_the_host_plus_the_calls_over_the_link():
    graph = linear_graph(np.ones((16, 8)))
    fpga = Device("f", "fpga", price_usd=100, power_w=5, dram_gbps=4, onchip_mb=1, fp32_gflops=0, int8_gops=10,
                  op_overhead_us=0, clock_mhz=100, host="unit", link_gbps=1, link_latency_us=5, static_w=0.5)
    reshape = [op for op in graph.ops if op.kind == "reshape"]
    dynamic = {"array": 3e-6, "dram": 4e-6}
    cost = accelerator(graph, fpga, lambda g: AccelRun(1000, reshape, calls=3, link_bytes=2000, energy=dynamic), UNIT)
    # 1,000 cycles at 100 MHz; the reshape's fixed 2 us on the host; 3 calls of 5 us and 2 kB at 1 GB/s
    assert cost.parts == pytest.approx({"accelerator": 10e-6, "host": 2e-6, "link": 17e-6})
    assert cost.latency_s == pytest.approx(29e-6)
    # the run's dynamic energy, the part's static power for the whole run, the host's while it computes
    assert cost.energy_parts == pytest.approx(dynamic | {"static": 29e-6 * 0.5, "host": 2e-6 * 10})
    assert cost.energy_j == pytest.approx(7e-6 + 29e-6 * 0.5 + 2e-6 * 10)
    with pytest.raises(ValueError, match="needs its cycle model"):
        roofline(graph, fpga)
    with pytest.raises(ValueError, match="link_gbps must be > 0 for an fpga"):
        dataclasses.replace(fpga, link_gbps=0)


@pytest.mark.parametrize("field, value, message", [
    ("price_usd", -1, "price_usd must be a finite number >= 0, got -1"),
    ("dram_gbps", 0, "dram_gbps must be > 0, got 0"),
    ("fp32_gflops", float("nan"), "fp32_gflops must be a finite number >= 0, got nan"),
    ("kind", "tpu", "kind must be one of cpu, gpu, fpga, got 'tpu'"),
])
def test_nonsensical_device_figures_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(UNIT, **{field: value})


def test_accelerator_cycles_are_the_isa_simulators():
    """The FPGA cycle model (the codegen's schedule, no data) equals what the ISA simulator
    counts running the program on real inputs."""
    torch.manual_seed(0)
    x = torch.rand(4, 8, 8)
    graph = tcc.compile(DigitsTransformer().eval(), (x,), pipeline="quantize").graph
    target = load_catalog()["fpga-small"]
    run = cycle_model(target.accel, target.part.process_nm)(graph)
    executor = AccelExecutor(graph, generate(graph, target.accel))
    executor(x.numpy())
    assert run.cycles == executor.stats.cycles > 0
    # the calls and bytes priced on the link are those the executor makes and moves
    assert (run.calls, run.link_bytes) == (executor.stats.calls, executor.stats.link_bytes) and run.calls > 1
    # the float edges' conversions run in the transfers' copy loops, the float ops as host ops
    assert {op.kind for op in run.converted} == {"quantize", "dequantize"}
    assert not {op.kind for op in run.host_ops} & {"quantize", "dequantize"} and run.host_ops
    devices = calibration.cost_devices(load_catalog())
    cost = target.cost(graph, devices)
    link = target.part.link_latency_us * 1e-6 * run.calls + run.link_bytes / (target.part.link_gbps * 1e9)
    assert isinstance(cost, Cost) and cost.parts["accelerator"] == pytest.approx(run.cycles / 100e6)
    assert cost.parts["link"] == pytest.approx(link)
    # host ops at the host's roofline with its fixed cost per op; conversions without one
    host = devices[target.part.host]
    converted = sum(seconds for _, seconds, _ in op_seconds(graph, host, run.converted))
    assert cost.parts["host"] == pytest.approx(roofline(graph, host, run.host_ops).latency_s + converted)
    assert 0 < converted < len(run.converted) * host.op_overhead_us * 1e-6


def test_measured_figures_are_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TCC_CACHE", str(tmp_path))
    calls = []

    def fake_measure(template, device="cpu", repeats=3, rounds=3):
        calls.append(device)
        return dataclasses.replace(template, fp32_gflops=12.5, int8_gops=20.0, dram_gbps=3.0, cache_gbps=30.0,
                                   op_overhead_us=4.0, op_costs=(("linear", 6.0, 1.5, 2.5),))

    monkeypatch.setattr(calibration, "measure", fake_measure)
    first = calibration.measured(UNIT)
    second = calibration.measured(UNIT)
    assert calls == ["cpu"] and first == second and second.op_costs == (("linear", 6.0, 1.5, 2.5),)
    (tmp_path / "devices.json").write_text("not json")  # a broken cache is measured again, not an error
    assert calibration.measured(UNIT) == first and calls == ["cpu", "cpu"]


def test_tcc_calibrate_measures_once_and_says_where_it_keeps_the_figures(tmp_path, monkeypatch, capsys):
    from tcc.cli import main
    monkeypatch.setenv("TCC_CACHE", str(tmp_path))
    calls = []

    def fake_measure(template, device="cpu", repeats=3, rounds=3):
        calls.append(device)
        return dataclasses.replace(template, fp32_gflops=12.5, op_costs=(("linear", 6.0, 1.5, 2.5),))

    monkeypatch.setattr(calibration, "measure", fake_measure)
    assert calibration.cost_devices(load_catalog(), calibrate=False)["cpu"].measured is False
    assert main(["calibrate"]) == 0
    out, err = capsys.readouterr()
    assert "calibrating this machine's cpu for the cost model" in err and "cpu: fp32 12.5 GFLOP/s" in out
    assert f"cached in {tmp_path / 'devices.json'}" in out and calls == ["cpu"]
    assert main(["calibrate", "--json"]) == 0 and calls == ["cpu"]  # cached: not measured again
    assert json.loads(capsys.readouterr().out)["cpu"]["measured"] is True
    assert calibration.cost_devices(load_catalog(), calibrate=False)["cpu"].fp32_gflops == 12.5
    assert main(["calibrate", "--again", "-q"]) == 0 and calls == ["cpu", "cpu"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # timings: on a quiet machine (`make test-all`); benchmarks/cost_model.py prints the figures
def test_host_latency_predictions_are_within_a_quarter_of_the_measured(tmp_path, monkeypatch, one_thread):
    """The measured host's roofline against the torch executor on models and batch sizes the
    calibration did not see (fresh measurement; one thread, which a shared machine's other
    load disturbs least: the benchmark shows both)."""
    monkeypatch.setenv("TCC_CACHE", str(tmp_path))
    catalog = load_catalog()
    host = calibration.cost_devices(catalog)["cpu"]
    torch.manual_seed(0)
    from tcc.runtime.torch_executor import TorchExecutor
    from tcc.zoo import build
    encoder, encoder_inputs = build("transformer-encoder")
    cases = [(encoder, encoder_inputs, spec) for spec in (None, "quantize")]
    cases += [(DigitsTransformer().eval(), (torch.rand(32, 8, 8),), spec)
              for spec in (None, "quantize", "quantize,int-nonlinear")]
    runs = []
    for model, inputs, spec in cases:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        graph = tcc.compile(model, inputs, pipeline=spec).graph
        runs.append((spec, graph, TorchExecutor(graph), list(inputs)))
    rounds = [[calibration.run_seconds(executor, inputs, 9) for *_, executor, inputs in runs] for _ in range(5)]
    for (spec, graph, *_), seconds in zip(runs, zip(*rounds)):
        ratio = roofline(graph, host).latency_s / statistics.median(seconds)
        assert 0.75 <= ratio <= 1.25, (graph.name, spec, ratio)
