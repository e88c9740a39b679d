"""The target catalog: every shipped target has the cost model's `Device`; `tcc targets` lists
them (table and JSON); a user targets file adds targets `tcc compile` can use; every bad
targets file fails in one line naming the file, the target and the field; accelerator configs
derived from a part fit it and agree with the shipped ones (where they do not, the test says
why)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import run_cli
from tcc.cli import main
from tcc.ir.errors import TccError
from tcc.passes.cost_model import Device
from tcc.targets import MARGIN, Part, derive_accel_config, fits, get_target, load_catalog, scaled_config

NEW_TARGETS = {"edge-cpu": "cpu", "jetson": "gpu", "a100": "gpu"}
SHIPPED_FPGAS = ("fpga-small", "fpga-medium", "fpga-large")

# a user targets file: a cpu and a 4x4-array FPGA on a small part whose host is a shipped target
USER = {
    "tiny-cpu": {
        "kind": "cpu", "backend": "reference", "executor": "cpu", "description": "a microcontroller-class core",
        "tile": [8, 8], "pipeline": "fold-constants,dce", "lowering": "select-format",
        "device": {"price_usd": 5, "power_w": 0.5, "dram_gbps": 0.4, "onchip_mb": 0.25, "fp32_gflops": 0.2,
                   "int8_gops": 0.8, "op_overhead_us": 50, "clock_mhz": 240},
    },
    "tiny-fpga": {
        "kind": "fpga", "backend": "accel", "executor": "sim", "description": "a Zynq-7020 with a 4x4 array",
        "tile": [4, 4], "pipeline": "fold-constants,canonicalize,dce,quantize", "lowering": "select-format",
        "formats": ["dense"],
        "part": {"name": "xc7z020", "family": "xc7", "lut": 53200, "ff": 106400, "dsp": 220, "bram36": 140, "uram": 0,
                 "dram_gbps": 4.2, "price_usd": 80, "power_w": 2.0, "static_w": 0.1, "process_nm": 28, "link_gbps": 1.0,
                 "link_latency_us": 20, "host": "edge-cpu"},
        "accel": {"rows": 4, "cols": 4, "abuf_depth": 4096, "bbuf_depth": 2048, "obuf_depth": 512,
                  "pbuf_depth": 128, "dram_bits": 64, "dram_latency": 20, "imem_depth": 2048, "clock_mhz": 100.0,
                  "nonlinear_unit": False},
    },
}


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return str(path)


# ----------------------------------------------------------------------------------------------
# the shipped catalog


def test_every_shipped_target_has_a_valid_device():
    catalog = load_catalog()
    assert set(catalog) >= {"cpu", "gpu", *SHIPPED_FPGAS, *NEW_TARGETS}
    for target in catalog.values():
        device = target.device
        assert isinstance(device, Device) and device.name == target.name and device.kind == target.kind
        assert device.price_usd > 0 and device.power_w > 0 and device.dram_gbps > 0 and device.int8_gops > 0
        if target.kind == "fpga":
            accel = target.accel
            assert device.int8_gops == pytest.approx(2 * accel.rows * accel.cols * accel.clock_mhz / 1000)
            assert device.fp32_gflops == 0 and device.op_overhead_us == 0 and device.clock_mhz == accel.clock_mhz
            assert device.onchip_mb == pytest.approx(accel.memory_bits() / 8e6)
            assert catalog[device.host].kind in ("cpu", "gpu")
        else:
            assert device.fp32_gflops > 0 and device.host is None
    # each board's own processor and link, never the machine tcc runs on
    hosts = {name: (t.device.host, t.device.link_gbps, t.device.link_latency_us)
             for name, t in catalog.items() if t.kind == "fpga"}
    assert hosts == {"fpga-small": ("zynq-a9", 1.2, 20.0), "fpga-medium": ("edge-cpu", 4.0, 10.0),
                     "fpga-large": ("xeon-server", 12.0, 30.0)}
    assert not any(catalog[host].measured for host, _, _ in hosts.values())
    assert catalog["cpu"].measured and catalog["gpu"].measured
    assert not any(catalog[name].measured for name in (*NEW_TARGETS, *SHIPPED_FPGAS))


def test_new_targets_have_their_kind_and_class_figures():
    catalog = load_catalog()
    for name, kind in NEW_TARGETS.items():
        t = catalog[name]
        assert (t.kind, t.backend, t.executor, t.tile) == (kind, "reference", kind, (16, 16))
        assert t.pipeline == "fold-constants,canonicalize,dce" and t.lowering == "select-format" and t.description
    edge, jetson, a100 = (catalog[n].device for n in NEW_TARGETS)
    # the ordering the cost model relies on: cheaper and slower down the line
    assert edge.price_usd < jetson.price_usd < a100.price_usd and edge.power_w < jetson.power_w < a100.power_w
    assert edge.fp32_gflops < jetson.fp32_gflops < a100.fp32_gflops
    assert edge.dram_gbps < jetson.dram_gbps < a100.dram_gbps
    assert edge.op_overhead_us > jetson.op_overhead_us > a100.op_overhead_us


def test_the_shipped_catalog_is_parsed_once():
    first, second = load_catalog(), load_catalog()
    assert first == second and first is not second  # callers may change their copy
    assert all(first[name] is second[name] for name in first)


def test_targets_table_and_json(capsys):
    assert main(["targets"]) == 0
    table = capsys.readouterr().out
    for name in load_catalog():
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    assert "xc7z020" in table and "16x16" in table and "fits" in table and "$10,000" in table
    assert main(["targets", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    by_name = {e["name"]: e for e in entries}
    assert set(by_name) == set(load_catalog())
    assert by_name["jetson"]["device"]["fp32_gflops"] == 1000 and by_name["fpga-large"]["part"]["host"] == "xeon-server"
    assert by_name["fpga-small"]["device"]["int8_gops"] == pytest.approx(12.8)


def test_targets_help_has_examples():
    result = run_cli("targets", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "tcc targets --targets-file" in result.stdout


# ----------------------------------------------------------------------------------------------
# user targets


def test_user_targets_join_the_catalog_and_replace_shipped_ones(tmp_path, capsys):
    user = copy.deepcopy(USER)
    user["jetson"] = copy.deepcopy(user["tiny-cpu"]) | {"kind": "gpu", "executor": "gpu"}
    file = write(tmp_path / "my.json", user)
    catalog = load_catalog(file)
    assert {"tiny-cpu", "tiny-fpga", "cpu", "fpga-large"} <= set(catalog)
    assert catalog["jetson"].device.price_usd == 5  # replaced
    device = catalog["tiny-fpga"].device
    assert device.host == "edge-cpu" and device.int8_gops == pytest.approx(2 * 4 * 4 * 100 / 1000)
    assert get_target("tiny-cpu", file).device.op_overhead_us == 50
    with pytest.raises(TccError, match="unknown target 'tiny-cpu'"):
        get_target("tiny-cpu")  # not in the shipped catalog
    assert load_catalog()["jetson"].device.price_usd == 499  # the shipped parse is untouched
    assert main(["targets", "--targets-file", file]) == 0
    assert "tiny-fpga" in capsys.readouterr().out


def test_compile_for_a_user_target(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 16),)), tmp_path / "model.pt2")
    file = write(tmp_path / "my.json", USER)
    result = run_cli("compile", tmp_path / "model.pt2", "--target", "tiny-fpga", "--targets-file", file,
                     "-q", "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "tiny-fpga" and manifest["target"]["part"]["name"] == "xc7z020"
    assert manifest["target"]["accel"]["rows"] == 4 and manifest["accel"]["sections"] >= 1
    result = run_cli("compile", tmp_path / "model.pt2", "--target", "tiny-fpga", "-o", tmp_path / "b")
    assert result.returncode == 2 and "unknown target 'tiny-fpga'" in result.stderr and not (tmp_path / "b").exists()


def _mutate(path: tuple, value=None, delete=False):
    """A copy of USER with the field at `path` set to `value` (or deleted)."""
    def apply():
        data = copy.deepcopy(USER)
        obj = data
        for key in path[:-1]:
            obj = obj[key]
        if delete:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return data
    return apply


# (what the file holds, the target and field the one-line error must name, and a phrase of it)
BAD = {
    "missing-field": (_mutate(("tiny-cpu", "device", "dram_gbps"), delete=True), "tiny-cpu",
                      "missing field 'device.dram_gbps'"),
    "missing-top-field": (_mutate(("tiny-fpga", "accel"), delete=True), "tiny-fpga", "missing field 'accel'"),
    "unknown-field": (_mutate(("tiny-cpu", "device", "dram_gpbs"), 4.0), "tiny-cpu",
                      "unknown field 'device.dram_gpbs'; did you mean 'dram_gbps'?"),
    "negative-price": (_mutate(("tiny-cpu", "device", "price_usd"), -5), "tiny-cpu",
                       "device.price_usd must be a positive number, got -5"),
    "zero-bandwidth": (_mutate(("tiny-fpga", "part", "dram_gbps"), 0), "tiny-fpga",
                       "part.dram_gbps must be a positive number, got 0"),
    "nan": (_mutate(("tiny-cpu", "device", "fp32_gflops"), math.nan), "tiny-cpu",
            "device.fp32_gflops must be a positive number, got NaN"),
    "infinite": (lambda: json.dumps(USER).replace('"power_w": 0.5', '"power_w": 1e999'), "tiny-cpu",
                 "device.power_w must be a positive number, got Infinity"),
    "wrong-type": (_mutate(("tiny-cpu", "device", "clock_mhz"), "240"), "tiny-cpu",
                   'device.clock_mhz must be a positive number, got "240"'),
    "unknown-kind": (_mutate(("tiny-cpu", "kind"), "tpu"), "tiny-cpu", 'kind must be one of cpu, gpu, fpga, got "tpu"'),
    "bad-executor": (_mutate(("tiny-cpu", "executor"), "sim"), "tiny-cpu", "executor must be cpu or numpy"),
    "bad-backend": (_mutate(("tiny-fpga", "backend"), "reference"), "tiny-fpga", "backend must be accel"),
    "bad-tile": (_mutate(("tiny-cpu", "tile"), [8]), "tiny-cpu", "tile must be two positive integers"),
    "bad-pipeline": (_mutate(("tiny-cpu", "pipeline"), "fold-constants,dcee"), "tiny-cpu",
                     "pipeline column 16: unknown pass 'dcee'"),
    "bad-accel-field": (_mutate(("tiny-fpga", "accel", "rows"), 0), "tiny-fpga", "accel.rows must be at least 1, got 0"),
    "unknown-accel-field": (_mutate(("tiny-fpga", "accel", "rowz"), 4), "tiny-fpga",
                            "unknown field 'accel.rowz'; did you mean 'rows'?"),
    "accel-too-big": (_mutate(("tiny-fpga", "accel", "rows"), 64), "tiny-fpga",
                      "accel: the 64x4 accelerator does not fit xc7z020"),
    "dma-faster-than-dram": (_mutate(("tiny-fpga", "part", "dram_gbps"), 0.5), "tiny-fpga",
                             "accel: the accelerator's DMA moves 0.8 GB/s (64-bit words at 100 MHz), more than the "
                             "DRAM of xc7z020 (0.5 GB/s)"),
    "no-link": (_mutate(("tiny-fpga", "part", "link_gbps"), delete=True), "tiny-fpga",
                "missing field 'part.link_gbps'"),
    "bad-part-field": (_mutate(("tiny-fpga", "part", "lut"), -5), "tiny-fpga",
                       "part.lut must be a positive integer, got -5"),
    "bad-part-family": (_mutate(("tiny-fpga", "part", "family"), "stratix"), "tiny-fpga", "part.family must be"),
    "unknown-host": (_mutate(("tiny-fpga", "part", "host"), "raspi"), "tiny-fpga",
                     "part.host names unknown target 'raspi'"),
    "fpga-host": (_mutate(("tiny-fpga", "part", "host"), "fpga-small"), "tiny-fpga",
                  "part.host must name a cpu or gpu target"),
    "device-on-fpga": (_mutate(("tiny-fpga", "device"), USER["tiny-cpu"]["device"]), "tiny-fpga",
                       "field 'device' is not for fpga targets"),
    "target-not-object": (lambda: {"tiny-cpu": [1, 2]}, "tiny-cpu", "must be an object of fields, got a list"),
    "not-json": (lambda: "{tiny-cpu: }", None, "not valid JSON"),
    "top-level-list": (lambda: "[]", None, "the top level must be a JSON object of targets by name, got a list"),
    "empty-file": (lambda: "", None, "empty file"),
    "duplicate-target": (lambda: '{"a": {}, "a": {}}', None, "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_targets_file_is_one_line(tmp_path, capsys, case):
    make, target, phrase = BAD[case]
    file = write(tmp_path / "my.json", make())
    assert main(["targets", "--targets-file", file]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    prefix = f"tcc: error: {file}" + (f": target '{target}': " if target else "")
    assert err.startswith(prefix) and phrase in err, err


def test_missing_targets_file(tmp_path, capsys):
    assert main(["targets", "--targets-file", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip() == f"tcc: error: {tmp_path / 'none.json'}: no such targets file"


@pytest.mark.parametrize("case", ["bad-part-field", "not-json"])
def test_bad_targets_file_in_a_subprocess(tmp_path, case):
    make, target, phrase = BAD[case]
    file = write(tmp_path / "my.json", make())
    result = run_cli("targets", "--targets-file", file)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and phrase in result.stderr and file in result.stderr


# ----------------------------------------------------------------------------------------------
# accelerator configs derived from a part


@pytest.mark.parametrize("name", SHIPPED_FPGAS)
def test_derived_config_fits_its_part(name):
    target = get_target(name)
    derived = derive_accel_config(target.part, template=target.accel)
    have = target.part.resources()
    for resource, need in derived.estimate_resources().items():
        assert need <= MARGIN * have[resource], (name, resource, need, have[resource])
    assert derived.rows == derived.cols and derived.rows in (4, 8, 16, 32, 64)
    # the next size up does not fit, with or without the nonlinearities
    if derived.rows < 64:
        for nonlinear in (True, False):
            assert not fits(scaled_config(2 * derived.rows, nonlinear_unit=nonlinear), target.part)


def test_derived_configs_against_the_shipped_ones():
    """fpga-small and fpga-large: the derived config is the shipped one (array, buffers, units).
    fpga-medium: the shipped 16x16 array uses more than 80% of the ZU7EV's BRAM36 (estimate 298,
    yosys 296 of 312; the ZU7EV's 96 URAM are not used by the mapping), so the derivation, held
    to 80% of each resource, stops at 8x8 (with the nonlinearities); the shipped config stays."""
    for name in ("fpga-small", "fpga-large"):
        target = get_target(name)
        assert derive_accel_config(target.part, template=target.accel) == target.accel, name
    medium = get_target("fpga-medium")
    derived = derive_accel_config(medium.part, template=medium.accel)
    assert (derived.rows, derived.nonlinear_unit) == (8, True) and medium.accel.rows == 16
    shipped = medium.accel.estimate_resources()
    assert shipped["BRAM"] > MARGIN * medium.part.bram36 and medium.synthesis["BRAM"] > MARGIN * medium.part.bram36
    assert all(shipped[k] <= MARGIN * have for k, have in medium.part.resources().items() if k != "BRAM")
    # without the template, the family's clock and DRAM port: the array is the same
    assert derive_accel_config(medium.part).rows == 8 and derive_accel_config(medium.part).clock_mhz == 200


def test_a_part_too_small_for_any_array():
    part = Part(name="xc7s6", family="xc7", lut=3750, ff=7500, dsp=10, bram36=5, uram=0, dram_gbps=1.0,
                price_usd=10, power_w=0.5, static_w=0.05, process_nm=28, link_gbps=1.0, link_latency_us=20,
                host="edge-cpu")
    with pytest.raises(TccError, match="part xc7s6: not even a 4x4 array fits 80% of its LUT"):
        derive_accel_config(part)


def test_an_accel_override_whose_dma_outruns_the_parts_dram_is_refused():
    small = load_catalog()["fpga-small"]
    assert small.with_accel("dram_bits=256").accel.dram_bits == 256  # 3.2 GB/s of the part's 4.2
    with pytest.raises(TccError, match=r"DMA moves 6\.4 GB/s \(512-bit words at 100 MHz\), more than the DRAM "
                                       r"of xc7z020 \(4\.2 GB/s\)"):
        small.with_accel("dram_bits=512")


def test_the_tile_follows_an_accel_override():
    """The tile (the prune passes' default block) is the array's: an override that resizes the
    array resizes it, one that does not keeps the catalog's."""
    medium = load_catalog()["fpga-medium"]
    assert medium.tile == (16, 16) and medium.with_accel("rows=8,cols=4").tile == (8, 4)
    assert medium.with_accel("clock_mhz=150").tile == (16, 16)
