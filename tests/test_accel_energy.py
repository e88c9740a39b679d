"""The accelerator's energy from its activity: every instruction's work counted from its fields
alone, the codegen's counts equal to its programs', and the cost model's FPGA energy the
activity priced on the part plus its static power."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings

import tcc
from tcc.backends.accel import energy
from tcc.backends.accel.codegen import generate, timing
from tcc.backends.accel.codegen.layer import BUILT
from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.energy import Activity
from tcc.backends.accel.isa import FORMATS, Instruction, Opcode
from tcc.backends.accel.layout import AccelProgram
from tcc.targets import calibration, load_catalog
from tcc.zoo import DigitsTransformer

from test_accel_isa import instructions

CONFIG = AccelConfig()
ADDRESSES = {"addr", "dram", "a", "b", "dst", "param", "mask"}


@settings(max_examples=200, deadline=None)
@given(instructions())
def test_an_instructions_work_follows_from_its_fields_not_its_addresses(ins):
    work = energy.activity(ins.op, ins.__getitem__, CONFIG)
    counts = dataclasses.astuple(work)
    assert all(c >= 0 for c in counts)
    # every instruction but halt moves or computes something, unless it moves nothing (count 0)
    empty = ins.op is Opcode.HALT or any(ins[f] == 0 for f in ("count", "k", "n", "blocks", "nnz", "steps")
                                         if f in {x.name for x in FORMATS[ins.op]})
    assert any(counts) or empty
    moved = Instruction(ins.op, tuple((v + 7) % (1 << f.width) if f.name in ADDRESSES else v
                                      for f, v in zip(FORMATS[ins.op], ins.args)))
    assert energy.activity(moved.op, moved.__getitem__, CONFIG) == work


def test_the_counts_of_each_kind_of_instruction():
    """Golden counts on the default 16x16 config (128-bit DRAM words, 8-bit data, 32-bit accumulators)."""
    def work(op, **fields):
        return energy.activity(op, fields.__getitem__, CONFIG)
    assert work(Opcode.GEMM, k=5) == Activity(macs=5 * 256, buffer_bits=5 * (128 + 128))
    assert work(Opcode.BGEMM, k=2) == Activity(binary_macs=2 * 256 * 8, buffer_bits=2 * 256)
    # the sparse unit reads a window of bw activation words and a weight and an index word a step
    assert work(Opcode.SPGEMM, blocks=2, nnz=3, bw=4) == Activity(macs=6 * 256, buffer_bits=6 * (4 * 128 + 2 * 128))
    assert work(Opcode.LOAD, buf=0, count=3) == Activity(buffer_bits=3 * 128, dram_bits=3 * 128)
    assert work(Opcode.LOAD, buf=3, count=1) == Activity(buffer_bits=512, dram_bits=512)  # a PBUF word: 4 beats
    assert work(Opcode.TLOAD, buf=0, count=2) == Activity(buffer_bits=32 * 128, dram_bits=32 * 128)
    assert work(Opcode.SPLOAD, buf=1, count=5, steps=8) == Activity(buffer_bits=16 * 128, dram_bits=5 * 128)
    assert work(Opcode.REQUANT) == Activity(wide_ops=256, buffer_bits=3 * 512 + 16 * 128)
    assert work(Opcode.VADD, n=4) == Activity(narrow_adds=64, buffer_bits=12 * 128)
    assert work(Opcode.VSOFTMAX, n=2) == Activity(wide_ops=3 * 2 * 16, divider_steps=64,
                                                  buffer_bits=3 * 2 * 512 + 2 * 128)
    assert work(Opcode.VLAYERNORM, n=1).divider_steps == 2 * 64 + 31  # two divisions and the square root
    assert work(Opcode.HALT) == Activity()


def test_energy_prices_the_work_on_the_parts_process():
    work = Activity(macs=1000, binary_macs=8000, buffer_bits=10_000, wide_ops=100, dram_bits=64_000)
    at16, at28 = work.energy_j(CONFIG, 16), work.energy_j(CONFIG, 28)
    assert set(at16) == {"array", "buffers", "vector", "dram"}
    for part in ("array", "buffers", "vector"):  # the fabric's energy scales with the node, DRAM's does not
        assert at28[part] == pytest.approx(at16[part] * 28 / 16)
    assert at28["dram"] == at16["dram"] == pytest.approx(64_000 * 1.3e-9 / 64)
    # a PE's cycle of bgemm (8 binary MACs: XNOR and a popcount bit each) costs an 8-bit add, a
    # tenth of its int8 MAC (an 8-bit multiply and a 32-bit add)
    binary = Activity(binary_macs=8).energy_j(CONFIG, 16)["array"]
    int8 = Activity(macs=1).energy_j(CONFIG, 16)["array"]
    assert binary == pytest.approx(int8 * 0.03 / 0.3)
    assert (work + work).energy_j(CONFIG, 16)["array"] == pytest.approx(2 * at16["array"])


@pytest.fixture(scope="module")
def digits_graphs():
    torch.manual_seed(0)
    x = torch.rand(4, 8, 8)
    model = DigitsTransformer().eval()
    return {name: tcc.compile(model, (x,), pipeline=pipeline).graph for name, pipeline in (
        ("int8", "quantize,int-nonlinear"),
        ("hp90", "hp-prune{sparsity=0.9,block=16x16},quantize,int-nonlinear"))}


def test_the_codegens_counts_are_its_programs_and_its_timings(digits_graphs):
    for graph in digits_graphs.values():
        program = generate(graph, CONFIG)
        counted = sum((energy.total(s.program, CONFIG) for s in program.sections), Activity())
        assert counted == sum((s.activity for s in program.sections), Activity()) and counted.macs > 0
        BUILT.clear()
        assert timing(graph, CONFIG).activity == counted  # the layers built
        assert timing(graph, CONFIG).activity == counted  # the layers' sections reused
        loaded = AccelProgram.from_files(program.to_files())
        assert sum((s.activity for s in loaded.sections), Activity()) == counted


def test_fpga_energy_is_the_activity_priced_plus_static_and_host(digits_graphs):
    target = load_catalog()["fpga-medium"]
    devices = calibration.cost_devices({target.name: target, target.part.host: load_catalog()[target.part.host]})
    costs = {name: target.cost(graph, devices) for name, graph in digits_graphs.items()}
    for name, cost in costs.items():
        work = timing(digits_graphs[name], target.accel).activity.energy_j(target.accel, target.part.process_nm)
        assert {k: cost.energy_parts[k] for k in work} == pytest.approx(work)
        assert cost.energy_parts["static"] == pytest.approx(target.part.static_w * cost.latency_s)
        assert cost.energy_parts["host"] == pytest.approx(cost.parts["host"] * devices[target.part.host].power_w)
        assert cost.energy_j == pytest.approx(sum(cost.energy_parts.values()))
    # HP 90%: the array does about a tenth of the MACs, and its energy follows
    ratio = costs["hp90"].energy_parts["array"] / costs["int8"].energy_parts["array"]
    assert 0.1 < ratio < 0.5


def test_a_runs_stats_give_each_units_utilization(digits_graphs):
    from collections import Counter

    from tcc.runtime.accel_executor import AccelExecutor
    graph = digits_graphs["int8"]
    program = generate(graph, CONFIG)
    executor = AccelExecutor(graph, program)
    executor(torch.rand(4, 8, 8).numpy())
    stats = executor.stats
    assert stats.busy == sum((Counter(s.busy(CONFIG)) for s in program.sections), Counter())
    utilization = stats.to_json(CONFIG)["unit_utilization"]
    assert set(utilization) == {"array", "load", "store", "vector"}
    assert all(0 < u <= 1 for u in utilization.values()) and max(utilization.values()) > 0.5
