"""The artifact's report: `report.html`, rendered with jinja2 from `templates/artifact.html.j2`,
and its figures in `report/`: a grayscale PNG per drawn weight (`report/sparsity/N.png`) and
matplotlib plots.

It shows the model (source, frontend, target, pipeline, ops by kind, parameters, bytes); per
constant its shape, dtype, sparsity structure, encoding, stored and dense bytes and density;
the sparsity patterns of the weights; for an FPGA target the accelerator's config and
resources and its cycles per layer and per unit; the accuracy on the evaluation data; and the
device selection that chose the target, when one ran. Every byte of these follows from the
compiled model (no timestamps, wall times or paths, fixed figure sizes and resolution, no
software tag in the PNGs): two compiles of one model, on any two machines, give identical
reports, hashed in the manifest.

What depends on the compiling machine goes to the artifact's unhashed `measured/` folder:
`devices.html` and `devices.png` (the predicted latency and energy of one run on every device
the cost model can price here, the host's figures measured here), `selection.html` and
`pareto.png` (the selection's points, whose latencies are such predictions) and `host.json`
(the machine, the cost model's measured figures, the predictions, the pass log's measured
notes, the data files' paths). report.html shows the pages in sandboxed frames (no scripts)
and the plots as images, at paths that do not depend on the measurement.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from tcc.backends.accel.isa import Unit
from tcc.backends.accel.layout import AccelProgram
from tcc.ir.analysis import describe, flops
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.passes import Dataset
from tcc.passes.cost_model import Cost, Device
from tcc.runtime.artifact import MEASURED_ABOUT, MEASURED_DIR, REPORT, REPORT_DIR

from .select import Selection, pareto
from .targets import Target
from .targets.calibration import machine, measured_here

if TYPE_CHECKING:
    from .explore import Exploration
    import jinja2
    from matplotlib.figure import Figure

MAX_HEATMAPS = 12  # sparsity patterns drawn: pruned weights first, then the largest
HEATMAP_CELLS = 96  # cells a side at most: a larger weight is pooled into blocks (their density)
DPI = 100
UNITS = tuple(u.value for u in Unit)  # load, array, vector, store


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("tcc", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["count"] = _count
    return env


def _count(value: float) -> str:
    """A count with thousands separators: 27,815; 90; 12.5 (one decimal when not whole)."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def render_template(name: str, **context: Any) -> str:
    """The package template `templates/NAME` rendered with `context` (HTML-escaped; an
    undefined name is an error)."""
    return _environment().get_template(name).render(**context)


def figure(width: float, height: float, margins: tuple[float, float, float, float] = (0.8, 0.2, 0.5, 0.2),
           **spacing: float) -> Figure:
    """A matplotlib figure of `width` x `height` inches, on no GUI backend and outside pyplot's
    global state (nothing to close), with fixed `margins` (left, right, bottom, top, inches)
    and `spacing` between subplots (`wspace`, `hspace`): no layout engine, which would draw
    the figure once more."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    left, right, bottom, top = margins
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        **spacing)
    return fig


def figure_png(fig: Figure) -> bytes:
    """`fig` rendered as PNG bytes, identical for identical figures (fixed resolution, no
    software tag)."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def render(graph: Graph, manifest: dict, *, target: Target, catalog: dict[str, Target],
           devices: Mapping[str, Device], costs: Mapping[str, Cost], program: AccelProgram | None = None,
           eval_data: Dataset | None = None, selection: Selection | None = None,
           measured: dict[str, Any] | None = None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The report's files by their path in the artifact: `report.html` and its PNGs under
    `report/` (machine-independent), and apart, under `measured/`, the pages, plots and
    `host.json` of what this machine's measurements decide (see the module's doc). `target` is
    the target compiled for (with its effective accelerator config); `catalog` the devices,
    `target` among them; `devices` their cost-model figures and `costs` the prices of one run of
    `graph` on each (`price_all`); `program` the accelerator program of an FPGA target;
    `eval_data` labelled data to measure its task's metrics on; `selection` the device selection
    that chose the target (`tcc compile --target auto`); `measured` more facts of this compile
    for `host.json` (the pass log's measured notes, the data files' paths). Nothing is measured
    here."""
    info = describe(graph)
    heatmaps = _heatmaps(graph, info)
    rows = _devices(catalog, devices, costs, target.name, flops(graph))
    accel = _accel(manifest, target, program) if program is not None else None
    figures = {"cycles": _cycles_png(accel["layers"]) if accel and accel["layers"] else None}
    plots = {name: f"{REPORT_DIR}/{name}.png" if png is not None else None for name, png in figures.items()}
    files = {plots[name]: png for name, png in figures.items() if png is not None}
    files |= {h["src"]: _heatmap_png(graph.weights[h["name"]]) for h in heatmaps}
    measured_figures = {"devices": _devices_png(rows) if rows else None,
                        "pareto": pareto_png(selection) if selection is not None else None}
    measured_files = {f"{MEASURED_DIR}/{name}.png": png for name, png in measured_figures.items() if png is not None}
    host = machine()
    pages = {"devices": render_template("measured.html.j2", page="devices", machine=host, devices=rows)}
    if selection is not None:
        pages["selection"] = render_template("measured.html.j2", page="selection", machine=host,
                                             selection=selection)
    measured_files |= {f"{MEASURED_DIR}/{name}.html": page.encode() for name, page in pages.items()}
    measured_files[f"{MEASURED_DIR}/host.json"] = _host_json(host, catalog, devices, rows, selection, measured or {})
    html = render_template("artifact.html.j2", manifest=manifest, target=target, info=info,
                           summary=_summary(graph, info), heatmaps=heatmaps, cells=HEATMAP_CELLS, accel=accel,
                           accuracy=_accuracy(graph, eval_data), selection=selection, plots=plots,
                           measured=MEASURED_DIR, device_rows=len(catalog))
    return {REPORT: html.encode(), **files}, measured_files


def _host_json(host: dict, catalog: dict[str, Target], devices: Mapping[str, Device], rows: list[dict],
               selection: Selection | None, facts: dict[str, Any]) -> bytes:
    """`measured/host.json`: the machine, the cost model's figures measured on it, the devices'
    predictions, the selection and `facts`."""
    calibration = {name: device.to_json() for name, device in devices.items()
                   if catalog[name].measured and measured_here(catalog[name], catalog, devices)}
    out = {"about": MEASURED_ABOUT, "machine": host, "calibration": calibration, "devices": rows, **facts}
    if selection is not None:
        out["selection"] = selection.to_json()
    return (json.dumps(out, indent=1) + "\n").encode()


def _summary(graph: Graph, info: dict) -> dict[str, float]:
    """Constants, their elements and the share of those that are zeros."""
    elements = sum(t.numel for _, t in graph.constants)
    zeros = sum(c["sparsity"] * t.numel for c, (_, t) in zip(info["constants"], graph.constants))
    return {"constants": len(graph.constants), "elements": elements, "zeros": zeros / elements if elements else 0.0}


def _heatmaps(graph: Graph, info: dict) -> list[dict[str, Any]]:
    """The rank-2 constants whose sparsity patterns are drawn, in graph order: up to
    `MAX_HEATMAPS`, those with a sparsity structure first, then the largest; each with its PNG's
    path in the artifact and the facts its caption shows."""
    rank2 = [(i, name, t) for i, (name, t) in enumerate(graph.constants) if len(t.shape) == 2 and t.numel]
    chosen = sorted(sorted(rank2, key=lambda e: (e[2].sparsity is None, -e[2].numel, e[0]))[:MAX_HEATMAPS])
    return [{"name": name, "src": f"{REPORT_DIR}/sparsity/{n}.png", "shape": "x".join(map(str, t.shape)),
             "structure": str(t.sparsity).lstrip("~") if t.sparsity else "unstructured",
             "density": 1 - info["constants"][i]["sparsity"]}
            for n, (i, name, t) in enumerate(chosen)]


def density_cells(mask: np.ndarray, cells: int = HEATMAP_CELLS) -> np.ndarray:
    """`mask` (rank 2, bool) pooled into at most `cells` x `cells` blocks: each the share of
    non-zeros among the elements it covers (edge blocks cover fewer)."""
    starts = [np.arange(0, n, -(-n // cells)) for n in mask.shape]
    if mask.all():  # an unpruned weight: no need to count
        return np.ones([len(s) for s in starts], np.float32)
    step = -(-mask.shape[0] // cells)  # rows a block sums: a 16-bit count holds them, and is faster to add
    rows = np.add.reduceat(mask.view(np.uint8), starts[0], axis=0, dtype=np.uint16 if step < 1 << 16 else np.int64)
    counts = np.add.reduceat(rows, starts[1], axis=1, dtype=np.int64)
    sizes = [np.diff(np.append(s, n)) for s, n in zip(starts, mask.shape)]
    return (counts / np.outer(*sizes)).astype(np.float32)


def _heatmap_png(weight: np.ndarray) -> bytes:
    """`weight`'s non-zero pattern as a grayscale PNG, a pixel per cell of `density_cells` (dark:
    non-zero); the page scales it up, pixelated. PIL writes no time or software chunk."""
    from PIL import Image
    shade = np.round(255 * (1 - density_cells(weight != 0))).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(shade).save(out, format="PNG")
    return out.getvalue()


def _devices(catalog: dict[str, Target], devices: Mapping[str, Device], costs: Mapping[str, Cost],
             compiled_for: str, ops: int) -> list[dict]:
    """Per device priced (`costs`): the predicted latency and energy of one run, the graph's
    `ops` (dense-equivalent) per joule (GOP/s/W), where the time and (on an FPGA, from its
    activity) the energy go, and whether the figures behind it are measured on this machine."""
    rows = []
    for name, cost in costs.items():
        device = devices[name]
        rows.append({"name": name, "kind": catalog[name].kind, "price_usd": device.price_usd,
                     "power_w": device.power_w, "latency_ms": cost.latency_s * 1e3, "energy_mj": cost.energy_j * 1e3,
                     "gops_per_w": cost.gops_per_w(ops),
                     "breakdown": _shares(cost.parts, cost.latency_s),
                     "energy_breakdown": _shares(cost.energy_parts, cost.energy_j),
                     "compiled": name == compiled_for, "figures": _figures(catalog[name], catalog, devices)})
    return rows


def _shares(parts: Mapping[str, float], whole: float) -> str:
    """The three largest of `parts` as percentages of `whole`."""
    largest = sorted(parts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return ", ".join(f"{k} {100 * v / whole:.0f}%" for k, v in largest) if whole > 0 else ""


def _figures(target: Target, catalog: dict[str, Target], devices: Mapping[str, Device]) -> str:
    """Where the figures pricing `target` come from: measured here, the catalog's, or the
    catalog's placeholders of a device this machine has not measured yet."""
    if measured_here(target, catalog, devices):
        return "measured here"
    host = catalog.get(target.device.host or "", target) if target.kind == "fpga" else target
    return "placeholders (tcc calibrate measures them)" if host.measured else "catalog"


def _devices_png(devices: list[dict]) -> bytes:
    """Predicted latency and energy per device, side by side (log scales); the device compiled
    for in red."""
    from matplotlib.ticker import NullLocator
    fig = figure(10, 0.8 + 0.3 * len(devices), (1.1, 0.2, 0.5, 0.1), wspace=0.06)
    names = [d["name"] for d in devices]
    colors = ["C3" if d["compiled"] else "C0" for d in devices]
    for i, (key, label) in enumerate((("latency_ms", "predicted latency per run (ms)"),
                                      ("energy_mj", "predicted energy per run (mJ)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.barh(range(len(devices)), [max(d[key], 1e-9) for d in devices], color=colors)
        ax.set_yticks(range(len(devices)), names if i == 0 else [""] * len(devices), fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # minor ticks would double the drawing time
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    return figure_png(fig)


def _accuracy(graph: Graph, data: Dataset | None) -> dict | None:
    """The metrics of `data`'s task (top-1 accuracy; WER and CER; ...) of the graph's first
    output (torch executor, CPU), by name in words; None without data, `metrics` None when the
    data has no labels."""
    if data is None:
        return None
    from tcc.passes.data import task_metrics
    from tcc.passes.tasks import METRIC_NAMES
    from tcc.runtime.torch_executor import TorchExecutor
    metrics = None
    if data.labels is not None:
        executor = TorchExecutor(graph, "cpu")
        found = task_metrics(graph, data, executor.run, "evaluation data")
        metrics = {METRIC_NAMES[k]: v for k, v in found.items()}
    return {"source": data.source, "examples": len(data), "task": data.task.name, "metrics": metrics}


def _accel(manifest: dict, target: Target, program: AccelProgram) -> dict:
    """The accelerator's config, resources (estimate, synthesis, the part) and, per layer (the
    IR ops its sections implement), sections, cycles, MACs, array utilization and the cycles
    each unit is busy (the ISA's occupancy of its instructions), with totals; the host ops by
    kind."""
    config = program.config
    layers: dict[tuple[str, ...], dict] = {}
    for section in program.sections:
        label = " -> ".join(section.ops)
        row = layers.setdefault(section.ops, {"layer": label, "note": section.note.removeprefix(label + ": "),
                                              "sections": 0, "cycles": 0, "macs": 0} | dict.fromkeys(UNITS, 0))
        row["sections"] += 1
        row["cycles"] += section.cycles
        row["macs"] += section.macs
        for unit, cycles in section.busy(config).items():
            row[unit] += cycles
    rows = list(layers.values())
    total = {"layer": "total", "note": "", **{k: sum(r[k] for r in rows) for k in ("sections", "cycles", "macs")},
             **{u: sum(r[u] for r in rows) for u in UNITS}}
    for row in rows + [total]:
        row["utilization"] = row["macs"] / (row["cycles"] * config.rows * config.cols) if row["cycles"] else 0.0
    info = manifest["accel"]
    resources = [{"name": k, "estimate": info["resources_estimate"][k],
                  "synthesis": info["synthesis"][k] if "synthesis" in info else None, "part": have}
                 for k, have in target.part.resources().items()]
    host: dict[str, dict] = {}
    for h in program.host_ops:
        host.setdefault(h.kind, {"kind": h.kind, "count": 0, "why": h.reason})["count"] += 1
    return {"config": config.to_json(), "resources": resources,
            "synthesis_source": info["synthesis"].get("source", "yosys") if "synthesis" in info else None,
            "part": target.part.name, "layers": rows, "total": total, "units": UNITS,
            "time_us": total["cycles"] / config.clock_mhz, "host": list(host.values())}


def _cycles_png(layers: list[dict]) -> bytes:
    """Per layer the cycles each unit is busy (grouped bars) and the layer's cycles (marks)."""
    n = len(layers)
    fig = figure(10, 4.2, (0.8, 0.2, 1.1, 0.1))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(UNITS)
    x = np.arange(n)
    for i, unit in enumerate(UNITS):
        ax.bar(x + (i - (len(UNITS) - 1) / 2) * width, [r[unit] for r in layers], width, label=f"{unit} busy",
               color=f"C{i}")
    ax.scatter(x, [r["cycles"] for r in layers], marker="_", s=300 if n <= 24 else 40, color="black",
               label="cycles", zorder=3)
    labels = [r["layer"].split(" -> ")[0] for r in layers] if n <= 24 else [str(i) for i in range(n)]
    ax.set_xticks(x, labels, rotation=60 if n <= 24 else 90, ha="right" if n <= 24 else "center",
                  fontsize=7 if n <= 24 else max(3, 7 - math.log2(n / 24)))
    ax.set_ylim(0, 1.2 * max(r["cycles"] for r in layers))  # room for the legend
    ax.set_ylabel("cycles", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncols=len(UNITS) + 1, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    return figure_png(fig)


def check_report_dir(directory: str | os.PathLike, option: str = "") -> Path:
    """`directory` as a Path; a TccError when it exists and is not an empty directory (a report
    never overwrites)."""
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TccError(f"{option}{out}: exists and is not an empty directory")
    return out


def pareto_png(selection: Selection) -> bytes:
    """The PNG of accuracy against predicted latency: every point, each device's Pareto front,
    the constraints and the choice (deterministic bytes)."""
    fig = figure(9, 5.5, (0.8, 0.2, 0.6, 0.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (device, front) in enumerate(pareto(selection.points).items()):
        color = f"C{i % 10}"
        mine = [p for p in selection.points if p.device == device]
        ax.scatter([p.latency_ms for p in mine], [p.accuracy for p in mine], s=12, color=color, alpha=0.35)
        ax.plot([p.latency_ms for p in front], [p.accuracy for p in front], "o-", color=color, label=device)
    ax.axvline(selection.lc_ms, color="grey", linestyle="--", linewidth=1)
    ax.axhline(selection.ac, color="grey", linestyle="--", linewidth=1)
    if selection.chosen:
        ax.scatter([selection.chosen.latency_ms], [selection.chosen.accuracy], marker="*", s=260, color="black",
                   zorder=5, label=f"chosen: {selection.chosen.device}, {selection.chosen.setting}")
    ax.set_xscale("log")
    ax.set_xlabel("predicted latency per run (ms)")
    ax.set_ylabel(selection.score)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return figure_png(fig)


def _write_report(directory: str | os.PathLike, files: Mapping[str, bytes | str]) -> Path:
    """`files` (name -> bytes or text) written into `directory` atomically: a temporary
    directory renamed into place (`check_report_dir`: never over another one)."""
    out = check_report_dir(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_selection_report(selection: Selection, directory: str | os.PathLike, *, model: str, data: str) -> Path:
    """`report.html` (every point, the choice and the reason), `pareto.png` (`pareto_png`) and
    `selection.json`, written into `directory` atomically (a temporary directory renamed into
    place)."""
    check_report_dir(directory)
    html = render_template(
        "select.html.j2", model=model, data=data, lc_ms=selection.lc_ms, ac=selection.ac, score=selection.score,
        points=selection.points, chosen=selection.chosen, meets=selection.meets, reason=selection.reason,
        seconds=selection.seconds,
        plot="pareto.png", settings=len({p.setting for p in selection.points}),
        devices=len({p.device for p in selection.points}))
    return _write_report(directory, {"pareto.png": pareto_png(selection), "report.html": html,
                                     "selection.json": json.dumps(selection.to_json(), indent=1) + "\n"})


def explore_png(exploration: "Exploration") -> bytes:
    """The PNG of an exploration's fronts: the metric against latency, energy and area, and
    the metric under faults against the metric; every point grey, the Pareto set by device,
    the chosen point a star (deterministic bytes)."""
    fig = figure(12, 8, (0.8, 0.2, 0.6, 0.2), wspace=0.25, hspace=0.3)
    points, front, chosen = exploration.points, exploration.front, exploration.chosen
    from .explore import device_label
    devices = list(dict.fromkeys(device_label(p.params) for p in front))
    panels = (("latency_ms", "metric", "latency per run (ms)", True), ("energy_mj", "metric", "energy per run (mJ)", True),
              ("area", "metric", "area (largest fraction of the part)", False),
              ("metric", "robustness", exploration.score, False))

    def value(p, key):
        return getattr(p, key) if key.endswith("_ms") or key.endswith("_mj") else p.values[key]

    for i, (x, y, label, log) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        live = [p for p in points if not p.skipped]
        ax.scatter([value(p, x) for p in live], [value(p, y) for p in live], s=10, color="lightgrey")
        for j, device in enumerate(devices):
            mine = [p for p in front if device_label(p.params) == device]
            ax.scatter([value(p, x) for p in mine], [value(p, y) for p in mine], s=28, color=f"C{j % 10}",
                       label=device)
        if chosen is not None:
            ax.scatter([value(chosen, x)], [value(chosen, y)], marker="*", s=220, color="black", zorder=5,
                       label="chosen")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(exploration.score if y == "metric" else f"{exploration.score} under faults")
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="lower right")
    return figure_png(fig)


def write_explore_report(exploration: "Exploration", directory: str | os.PathLike, *, model: str, data: str) -> Path:
    """`report.html` (the Pareto set, the choice), `pareto.png` (`explore_png`) and
    `explore.json`, written into `directory` atomically."""
    from .explore import describe, setting_name
    check_report_dir(directory)
    html = render_template(
        "explore.html.j2", model=model, data=data, evaluated=exploration.evaluated,
        grid=exploration.space.grid_size(), seconds=exploration.seconds, objectives=exploration.space.objectives,
        front=exploration.front, chosen=exploration.chosen, reason=exploration.reason, score=exploration.score,
        plot="pareto.png", device=lambda p: describe(p).split(" with ")[0], setting=lambda p: setting_name(p.params))
    return _write_report(directory, {"pareto.png": explore_png(exploration), "report.html": html,
                                     "explore.json": json.dumps(exploration.to_json(), indent=1) + "\n"})


__all__ = ["render", "render_template", "figure", "figure_png", "density_cells", "check_report_dir", "pareto_png",
           "write_selection_report", "explore_png", "write_explore_report"]
