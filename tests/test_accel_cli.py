"""`tcc compile --target fpga-*` end to end in a subprocess: the artifact holds the program, its
listing, the DRAM image and the hardware files; `tcc run --on sim --stats` agrees with the
quantized numpy reference (integers bit for bit, host-op floats within the tiers' tolerance); bad
accelerator input fails in one line."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from conftest import assert_tiers_agree, built, need, run_cli
from tcc.backends.accel.isa import Instruction, Opcode, from_binary, parse_assembly, to_assembly, to_binary
from tcc.backends.accel.layout import AccelProgram


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("fpga")
    model, (ids, mask) = built("bert-style")
    torch.export.save(torch.export.export(model, (ids, mask)), d / "model.pt2")
    result = run_cli("compile", d / "model.pt2", "--target", "fpga-small", "--accel", "rows=4,cols=4", "-o", d / "a")
    assert result.returncode == 0, result.stderr
    return d, result.stdout


def test_artifact_holds_program_and_hardware(compiled):
    d, stdout = compiled
    accel = d / "a" / "accel"
    program = from_binary((accel / "program.bin").read_bytes())
    assert parse_assembly((accel / "program.s").read_text()) == program
    manifest = json.loads((d / "a" / "manifest.json").read_text())
    assert manifest["target"]["accel"]["rows"] == 4 and manifest["accel"]["sections"] >= 1
    sections = AccelProgram.load(accel)  # the host's calls and what they move, as the manifest and the log say
    assert (manifest["accel"]["calls"], manifest["accel"]["link_bytes"]) == (len(sections.calls()), sections.link_bytes())
    assert f"sections in {len(sections.calls())} calls ({sections.link_bytes():,} bytes" in stdout
    assert "synthesis" not in manifest["accel"]  # an overridden config has no measured synthesis
    # every host op is listed with its reason and where it stands; the log counts those the host runs
    host = manifest["accel"]["host_ops"]
    assert all(h["why"] and h["where"] in ("edge", "between", "addressing") for h in host)
    runs = [h for h in host if h["where"] != "addressing"]
    between = sum(h["where"] == "between" for h in runs)
    assert f"{len(runs)} ops on the host ({len(runs) - between} at the model's edges, {between} between calls)" \
        in stdout


def test_run_on_sim_equals_numpy_and_writes_stats(compiled, tmp_path):
    d, _ = compiled
    result = run_cli("run", d / "a", "--on", "sim", "--stats", tmp_path / "stats.json", "-o", tmp_path / "sim.pt")
    assert result.returncode == 0, result.stderr
    assert run_cli("run", d / "a", "--on", "numpy", "-o", tmp_path / "ref.pt").returncode == 0
    sims, refs = torch.load(tmp_path / "sim.pt"), torch.load(tmp_path / "ref.pt")
    assert len(sims) == len(refs)
    for sim, ref in zip(sims, refs):  # two executors: integers bit for bit, host-op floats within the tiers
        assert_tiers_agree(sim.numpy(), ref.numpy())
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["cycles"] > 0 and stats["macs"] > 0 and 0 < stats["utilization"] <= 1
    assert stats["instructions"]["gemm"] >= 1 and stats["instructions"]["halt"] == len(stats["section_cycles"])


@pytest.mark.parametrize("argv, message", [
    (["compile", "{d}/model.pt2", "--target", "fpga-small", "--accel", "rowz=4", "-o", "{t}/o"],
     "--accel: unknown field 'rowz'; did you mean 'rows'?"),
    (["compile", "{d}/model.pt2", "--target", "fpga-small", "--accel", "rows=0", "-o", "{t}/o"],
     "--accel: rows must be at least 1, got 0"),
    (["compile", "{d}/model.pt2", "--target", "fpga-small", "--accel", "rows=32,cols=32", "-o", "{t}/o"],
     "the 32x32 accelerator does not fit xc7z020: it needs about 260,168 LUT (estimate), the part has 53,200"),
    (["compile", "{d}/model.pt2", "--target", "cpu", "--accel", "rows=4", "-o", "{t}/o"],
     "--accel: target 'cpu' has no accelerator"),
    (["run", "{d}/a", "--on", "numpy", "--stats", "{t}/s.json"], "--stats: cycle statistics come from --on sim"),
])
def test_bad_accelerator_input_is_one_line(compiled, tmp_path, argv, message):
    d, _ = compiled
    result = run_cli(*[a.format(d=d, t=tmp_path) for a in argv])
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"tcc: error: {message}")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.json").exists()


def test_sim_on_a_cpu_artifact_is_an_error(tmp_path):
    model, (ids, mask) = built("bert-style")
    torch.export.save(torch.export.export(model, (ids, mask)), tmp_path / "m.pt2")
    assert run_cli("compile", tmp_path / "m.pt2", "-o", tmp_path / "cpu").returncode == 0
    result = run_cli("run", tmp_path / "cpu", "--on", "sim")
    assert result.returncode == 2 and "target 'cpu' has no accelerator" in result.stderr


def test_corrupted_program_is_caught(compiled, tmp_path):
    d, _ = compiled
    copy = tmp_path / "a"
    shutil.copytree(d / "a", copy)
    program = copy / "accel" / "program.bin"
    data = bytearray(program.read_bytes())
    data[16] = 0xFF  # first instruction's opcode -> unknown
    program.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["accel/program.bin"] = hashlib.sha256(bytes(data)).hexdigest()  # only the decoder can catch it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("run", copy, "--on", "sim")
    assert result.returncode == 2 and "program.bin: instruction 0: unknown opcode 255" in result.stderr
    assert "Traceback" not in result.stderr


def test_program_reading_outside_dram_is_a_one_line_error(compiled, tmp_path):
    """A program edited to read past the DRAM (hashes updated) is caught on load, naming the section and instruction."""
    d, _ = compiled
    copy = tmp_path / "a"
    shutil.copytree(d / "a", copy)
    accel = copy / "accel"
    program = list(from_binary((accel / "program.bin").read_bytes()))
    first_load = next(i for i, instr in enumerate(program) if instr.mnemonic == "load")
    args = dict(zip(("buf", "addr", "count", "dram"), program[first_load].args))
    program[first_load] = Instruction.make(Opcode.LOAD, buf=args["buf"], addr=args["addr"], count=args["count"],
                                           dram=(1 << 32) - 1)
    (accel / "program.bin").write_bytes(to_binary(program))
    (accel / "program.s").write_text(to_assembly(program))
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("accel/program.bin", "accel/program.s"):
        manifest["files"][name] = hashlib.sha256((copy / name).read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("run", copy, "--on", "sim")
    assert result.returncode == 2, result.stderr
    assert "sections.json: sections[0]: instruction 0 (load " in result.stderr and "reads DRAM words" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_synth_records_resources(compiled, tmp_path):
    need("yosys")
    d, _ = compiled
    accel = "rows=2,cols=2,abuf_depth=64,bbuf_depth=64,obuf_depth=32,pbuf_depth=16,imem_depth=512"
    result = run_cli("compile", d / "model.pt2", "--target", "fpga-small", "--accel", accel, "--synth", "-o", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    synthesis = json.loads((tmp_path / "s" / "manifest.json").read_text())["accel"]["synthesis"]
    assert 0 < synthesis["LUT"] < 53200 and synthesis["DSP"] == 2 * 2 + 2 * 4  # PEs; requant (fpga-small: no nonlinear datapaths)
    assert "synthesized (yosys):" in result.stdout
