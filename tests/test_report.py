"""The artifact's report.html: the model, its weights and their sparsity patterns, the predicted
cost on every device (measured/, unhashed), the accuracy on the evaluation data, the
accelerator's cycles per layer and unit (FPGA targets) and the device selection (--target
auto); byte for byte the same from two compiles; and in headless Chromium every figure and
every measured page loads."""

from __future__ import annotations

import html
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import tcc
from conftest import need
from tcc.cli import main
from tcc.targets.calibration import cost_devices
from tcc.passes import Dataset
from tcc.report import density_cells
from tcc.select import Point, choose
from tcc.targets import load_catalog
from tcc.zoo import DigitsTransformer, digits_data

PIPELINE = "hp-prune{block=8x8,sparsity=0.75},quantize"
BATCH = 16
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """An untrained DigitsTransformer (seed 0), its example batch and 64 labelled test images."""
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    _x_train, x_test, _y_train, y_test = digits_data()
    return model, x_test[:BATCH], Dataset((x_test[:64],), y_test[:64], "digits test")


@pytest.fixture(scope="module")
def calibrated() -> None:
    """This machine's figures measured (compiling only reads them, cached)."""
    cost_devices(load_catalog(), calibrate=True)


@pytest.fixture(scope="module")
def cpu_artifact(digits, calibrated, tmp_path_factory) -> Path:
    model, x, test = digits
    return tcc.compile(model, (x,), target="cpu", pipeline=PIPELINE, eval_data=test).save(
        tmp_path_factory.mktemp("report") / "cpu")


@pytest.fixture(scope="module")
def fpga_artifact(digits, calibrated, tmp_path_factory) -> Path:
    model, x, _test = digits
    return tcc.compile(model, (x,), target="fpga-small", pipeline=PIPELINE).save(
        tmp_path_factory.mktemp("report") / "fpga")


def _section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start:page.index("</section>", start)]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])


def test_cpu_report_summarizes_the_model_weights_devices_and_accuracy(cpu_artifact, digits):
    page = (cpu_artifact / "report.html").read_text()
    manifest = json.loads((cpu_artifact / "manifest.json").read_text())
    heatmaps = [f"report/sparsity/{i}.png" for i in range(10)]
    assert {"report.html", *heatmaps} <= set(manifest["files"])  # hashed
    measured = ["measured/devices.html", "measured/devices.png", "measured/host.json"]
    assert manifest["measured"]["files"] == measured and not set(measured) & set(manifest["files"])
    on_disk = [p.relative_to(cpu_artifact).as_posix() for p in cpu_artifact.rglob("*") if p.is_file()]
    assert sorted(set(on_disk) - set(manifest["files"])) == ["manifest.json", *measured]
    tcc.load(cpu_artifact)  # the hashes hold

    assert "<h1>DigitsTransformer for cpu</h1>" in page
    summary = _section(page, "summary")
    assert "<tr><th>pipeline</th><td><code>hp-prune{sparsity=0.75,block=8x8},quantize,select-format</code>" in summary
    assert "<li>select-format: changed; 8 hp, 2 dense;" in summary  # the pass log
    assert '<tr><td>linear</td><td class="num">10</td></tr>' in summary  # ops by kind
    assert '<tr><td>scaled_dot_product_attention</td><td class="num">2</td></tr>' in summary
    assert "<tr><th>inputs</th><td>images <code>f32[16,8,8]</code></td></tr>" in summary
    assert "<tr><th>parameters</th><td>70,632 in 59 constants," in summary  # int8 weights, int32 biases, scales
    assert "eval: digits test (64 examples)" in summary

    weights = _section(page, "weights")
    # 75% HP sparsity in 8x8 blocks: 2 of every 8 weights of a row kept, stored as HP
    assert ("<tr><td>encoder.layers.0.linear1.weight_q</td><td>128x64</td><td>i8</td><td>hp(8, 8, 2)</td>"
            "<td>hp(8, 8, 2)</td>") in weights
    assert ('<td class="num">8,192</td><td class="num">0.346</td><td class="num">0.250</td></tr>') in weights
    assert "<tr><td>head.weight_q</td><td>10x64</td><td>i8</td><td>-</td><td>dense</td>" in weights  # kept whole

    sparsity = _section(page, "sparsity")
    assert "Non-zeros (dark) of 10 weight(s)" in sparsity and sparsity.count("<figure>") == 10
    # graph order: the first layer's linear1 (128x64, 75% HP in 8x8 blocks), a pixel per weight
    assert ('<img src="report/sparsity/3.png" alt="non-zero pattern of encoder.layers.0.linear1.weight_q">'
            '<figcaption><code>encoder.layers.0.linear1.weight_q</code><br>128x64, hp(8, 8, 2), density 0.250'
            in sparsity)
    png = Image.open(io.BytesIO((cpu_artifact / "report/sparsity/3.png").read_bytes()))
    weight = tcc.load(cpu_artifact).graph.weights["encoder.layers.0.linear1.weight_q"]
    assert png.mode == "L" and png.size == (64, 64)  # 64 columns; 128 rows, 2 to a cell
    assert np.array_equal(np.asarray(png) < 255, density_cells(weight != 0) > 0)

    section = _section(page, "devices")
    assert "Measured on the compiling machine" in section and '<img src="measured/devices.png"' in section
    assert '<iframe class="measured" sandbox src="measured/devices.html"' in section
    devices = (cpu_artifact / "measured/devices.html").read_text()
    priced = list(cost_devices(load_catalog()))
    assert devices.count("<tr") == len(priced) + 1 and devices.count('class="compiled"') == 1
    assert '<tr class="compiled"><td>cpu</td><td>cpu</td><td class="num">400</td>' in devices
    for name in priced:
        assert f"<td>{name}</td>" in devices
    assert '<td>fpga-small</td><td>fpga</td><td class="num">120</td>' in devices and "accelerator" in devices
    # the host cpu and the local gpu when there is one; the FPGAs' hosts are their boards' processors
    here = [name for name in ("cpu", "gpu") if name in priced]
    assert devices.count("<td>measured here</td>") == len(here) and "<td>edge-cpu</td>" in devices
    assert [row.endswith("<td>measured here</td></tr>") for row in devices.splitlines()
            if row.startswith(('<tr class="compiled"><td>cpu</td>', "<tr><td>edge-cpu</td>"))] == [True, False]
    host = json.loads((cpu_artifact / "measured/host.json").read_text())
    assert host["calibration"]["cpu"]["fp32_gflops"] > 0 and host["machine"]["threads"] >= 1
    assert [d["name"] for d in host["devices"]] == priced

    # top-1 on the 64 labelled images, measured here through the artifact's own executor
    model, _x, test = digits
    artifact = tcc.load(cpu_artifact)
    logits = torch.cat([artifact.run((test.inputs[0][i:i + BATCH],)) for i in range(0, 64, BATCH)])
    expected = float((logits.argmax(-1) == test.labels).double().mean())
    assert (f'<tr><td>digits test</td><td>classification</td><td class="num">64</td><td class="num">{expected:.4f}'
            f'</td></tr>' in _section(page, "accuracy"))
    assert "No device selection ran" in _section(page, "selection")
    assert 'id="accelerator"' not in page


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 300), st.integers(1, 300))), st.integers(1, 40))
def test_density_cells_are_the_share_of_non_zeros_of_each_block(mask, cells):
    """Against a direct count: blocks of ceil(n / cells) rows and columns, the last ones smaller;
    an all-non-zero mask takes the shortcut and agrees."""
    rows, cols = (-(-n // cells) for n in mask.shape)
    expected = np.array([[mask[i:i + rows, j:j + cols].mean() for j in range(0, mask.shape[1], cols)]
                         for i in range(0, mask.shape[0], rows)], np.float32)
    np.testing.assert_allclose(density_cells(mask, cells), expected, rtol=1e-6)
    assert np.array_equal(density_cells(np.ones_like(mask), cells), np.ones_like(expected))


def test_compile_and_save_never_measure_the_host(digits, tmp_path, monkeypatch):
    """On a machine not yet calibrated, compile prices the host with the catalog's placeholders
    (and says so) instead of measuring it; saving only writes."""
    from tcc.targets import calibration
    model, x, _test = digits
    monkeypatch.setenv("TCC_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(calibration, "measure", lambda *a, **k: pytest.fail("measured the host"))
    artifact = tcc.compile(model, (x,), target="cpu")
    devices = artifact.measured_files["measured/devices.html"].decode()
    assert "<td>placeholders (tcc calibrate measures them)</td>" in devices and "measured here" not in devices
    assert json.loads(artifact.measured_files["measured/host.json"])["calibration"] == {}
    from tcc import report
    monkeypatch.setattr(report, "render", lambda *a, **k: pytest.fail("saving rendered the report"))
    assert (artifact.save(tmp_path / "out") / "measured/devices.html").read_bytes() == devices.encode()


def test_fpga_report_shows_the_accelerator_its_resources_and_cycles(fpga_artifact):
    page = (fpga_artifact / "report.html").read_text()
    assert "<h1>DigitsTransformer for fpga-small</h1>" in page
    accel = _section(page, "accelerator")
    assert "<tr><th>rows</th><td>8</td></tr>" in accel and "<tr><th>clock_mhz</th><td>100.0</td></tr>" in accel
    # the shipped 8x8 config: the catalog's yosys record beside the estimate, against the xc7z020
    assert "<h3>Resources on xc7z020</h3>" in accel and "synthesis (catalog)" in accel
    assert '<tr><td>DSP</td><td class="num">96</td><td class="num">96</td><td class="num">220</td>' in accel
    assert '<tr><td>BRAM</td><td class="num">91</td><td class="num">93</td><td class="num">140</td>' in accel

    # per layer: the sections' cycles and MACs, and each unit's occupancy, summed here again
    program = tcc.load(fpga_artifact).accel_program()
    layers: dict[tuple[str, ...], list[int]] = {}
    for section in program.sections:
        row = layers.setdefault(section.ops, [0] * 7)
        busy = {unit: sum(i.occupancy(program.config) for i in section.program if i.unit.value == unit)
                for unit in ("load", "array", "vector", "store")}
        for k, value in enumerate([1, section.cycles, *busy.values(), section.macs]):
            row[k] += value
    assert len(layers) == 10  # the ten linears (the embedding, 2 x 4 in the encoder, the head)
    for ops, row in layers.items():
        cells = "".join(f'<td class="num">{v:,}</td>' for v in row)
        assert f"<tr><td>{html.escape(' -> '.join(ops))}</td>{cells}" in accel
    total = sum(s.cycles for s in program.sections)
    assert f"{len(program.sections)} section(s), {total:,} cycles ({total / 100:.1f} &micro;s at 100.0 MHz)" in accel
    assert ('<tr class="total"><td>total</td><td class="num">10</td>'
            f'<td class="num">{total:,}</td>') in accel
    # an HP layer on the sparse unit: 16 images x 8 rows through the 192x64 in-projection, a
    # quarter of its weights kept
    assert f'<td class="num">{128 * 64 * 192 // 4:,}</td>' in accel and "M=128 K=64 N=192, hp," in accel
    assert '<tr><td>quantize</td><td class="num">10</td>' in accel  # host ops by kind
    assert '<img src="report/cycles.png"' in accel and _png_size((fpga_artifact / "report/cycles.png").read_bytes())

    devices = (fpga_artifact / "measured/devices.html").read_text()
    assert '<tr class="compiled"><td>fpga-small</td><td>fpga</td>' in devices
    assert "No evaluation data was given" in _section(page, "accuracy")


def test_report_is_identical_from_two_compiles(digits, cpu_artifact, tmp_path):
    model, x, test = digits
    again = tcc.compile(model, (x,), target="cpu", pipeline=PIPELINE, eval_data=test).save(tmp_path / "again")
    files = ["report.html"] + sorted(p.relative_to(cpu_artifact).as_posix()
                                     for p in (cpu_artifact / "report").rglob("*") if p.is_file())
    assert len(files) == 11  # the page and 10 heatmaps
    for file in files:
        assert (again / file).read_bytes() == (cpu_artifact / file).read_bytes(), file


def test_report_shows_the_device_selection(digits, tmp_path, monkeypatch):
    """The selection that chose the target (`--target auto`): its reason, Pareto plot and every
    point."""
    from tcc import driver
    model, x, test = digits
    points = [Point("fp32", "cpu", 0.97, 2.0, 4.0, 400, {}), Point("int8", "cpu", 0.96, 1.0, 2.0, 400, {}),
              Point("int8", "edge-cpu", 0.96, 9.0, 9.0, 35, {})]
    selection = choose(points, 3.0, 0.95)
    monkeypatch.setattr(driver, "select", lambda *a, **k: selection)
    artifact = tcc.compile(model, (x,), target="auto", lc="3ms", ac=0.95, eval_data=test)
    assert artifact.manifest["target"]["name"] == "cpu" and "quantize" in artifact.manifest["passes"]
    assert artifact.notes[0] == f"--target auto: {selection.reason}"
    out = artifact.save(tmp_path / "a")
    section = _section((out / "report.html").read_text(), "selection")
    assert "Chosen: <b>cpu</b> with <b>int8</b>." in section and selection.reason not in section
    assert '<img src="measured/pareto.png"' in section and (out / "measured/pareto.png").read_bytes()[:8] == PNG
    assert '<iframe class="measured" sandbox src="measured/selection.html"' in section
    page = (out / "measured/selection.html").read_text()  # the latencies: the cost model's, measured here
    assert html.escape(selection.reason) in page
    assert page.count("<tr") == len(points) + 1 and page.count('class="chosen"') == 1


@pytest.fixture(scope="module")
def auto_artifact(digits, tmp_path_factory) -> Path:
    """`tcc compile --target auto` (fp32 only, any accuracy, 1 s) of the digits model."""
    model, x, test = digits
    d = tmp_path_factory.mktemp("auto")
    torch.export.save(torch.export.export(model, (x,)), d / "model.pt2")
    torch.save({"inputs": test.inputs[0], "labels": test.labels}, d / "test.pt")
    assert main(["compile", str(d / "model.pt2"), "--target", "auto", "--lc", "1s", "--ac", "0", "--data",
                 str(d / "test.pt"), "--settings", "fp32", "-q", "-o", str(d / "out")]) == 0
    return d / "out"


def test_target_auto_report_carries_the_selection_and_the_accuracy(auto_artifact):
    page = (auto_artifact / "report.html").read_text()
    chosen = json.loads((auto_artifact / "manifest.json").read_text())["target"]["name"]
    section = _section(page, "selection")
    assert f"Chosen: <b>{chosen}</b> with <b>fp32</b>." in section and '<img src="measured/pareto.png"' in section
    assert (auto_artifact / "measured/selection.html").read_text().count('class="chosen"') == 1
    # the data file by its name; its path, the machine's, in measured/host.json
    assert '<td>test.pt</td><td>classification</td><td class="num">64</td>' in _section(page, "accuracy")
    host = json.loads((auto_artifact / "measured/host.json").read_text())
    assert host["paths"]["eval"] == str(auto_artifact.parent / "test.pt") and host["selection"]["device"] == chosen


def _browser():
    """Headless Chromium driven by chromedriver, its console log kept."""
    need("chromium")
    need("chromedriver")
    from selenium import webdriver  # the dev extra: `make install`
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=options)


@pytest.mark.parametrize("which, images, frames", [("cpu_artifact", 2, 1), ("fpga_artifact", 3, 1),
                                                    ("auto_artifact", 3, 2)])
def test_report_renders_in_chromium_with_every_image(which, images, frames, request):
    """Every image loads, and every measured page shows its table in its frame (no scripts)."""
    artifact = request.getfixturevalue(which)
    browser = _browser()
    try:
        browser.get((artifact / "report.html").resolve().as_uri())
        loaded = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        tables = []
        for frame in browser.find_elements("css selector", "iframe.measured"):
            assert frame.get_attribute("sandbox") == ""
            browser.switch_to.frame(frame)
            tables.append(len(browser.find_elements("css selector", "table tr")))
            browser.switch_to.default_content()
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        title = browser.title
    finally:
        browser.quit()
    assert len(loaded) >= images and all(ok for _src, ok in loaded), loaded
    assert len(tables) == frames and all(rows > 1 for rows in tables), tables
    assert not severe, severe
    assert title.startswith("tcc artifact: ")
