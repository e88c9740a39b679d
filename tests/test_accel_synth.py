"""Yosys `synth_xilinx` of every shipped FPGA config: the design fits its part, the counts
equal those the catalog records (and every compile for the target reports), and the config's
resource estimate (used to reject configs that cannot fit) tracks the synthesis."""

from __future__ import annotations

import pytest

from conftest import need
from tcc.backends.accel.verilog import synthesize
from tcc.targets import load_catalog

FPGA_TARGETS = [t for t in load_catalog().values() if t.accel is not None]


@pytest.mark.slow
@pytest.mark.parametrize("target", FPGA_TARGETS, ids=lambda t: t.name)
def test_shipped_config_fits_its_part(target):
    need("yosys")
    used = synthesize(target.accel, timeout=5400, part_family=target.part.family)  # fpga-large: ~50 min
    part = {"LUT": target.part.lut, "FF": target.part.ff, "DSP": target.part.dsp, "BRAM": target.part.bram36}
    estimate = target.accel.estimate_resources()
    for resource, have in part.items():
        assert used[resource] <= have, f"{target.name}: {used[resource]} {resource} > {have}"
    if target.synthesis is not None:  # what the catalog (and so every compile for the target) records
        assert {k: used[k] for k in part} == target.synthesis
    assert used["DSP"] == estimate["DSP"]
    for resource in ("LUT", "FF", "BRAM"):  # the estimate is fit to these: a generator change shows here
        assert abs(used[resource] - estimate[resource]) <= 0.1 * used[resource], (resource, used, estimate)
