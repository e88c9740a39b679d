"""The compiler driver, one straight line:

    resolve the target -> load and lower the model -> the pipeline, then the target's lowering
    -> the target's backend -> prices and report -> the Artifact

`resolve_target` is the one place `--target` (named, or `auto`) is decided, for the CLI and the
Python API alike."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tcc.ir.errors import TccError
from tcc.passes import Pass, PassContext, format_pipeline, parse_pipeline, run_pipeline
from tcc.runtime.artifact import Artifact, WeightsFile
from tcc.runtime.torch_executor import TorchExecutor

from ._version import __version__
from .model import DataSpec, adopt_weights, example_arrays, example_dataset, fitted_dataset, lower, source_paths
from .report import render as render_report
from .select import (PREFIX, Selection, Setting, TokenRate, canonical, default_settings, parse_accuracy,
                     parse_latency, select)
from .targets import Target, candidates, load_catalog, price_all
from .targets.backends import BACKENDS
from .targets.calibration import cost_devices

_log = logging.getLogger("tcc.driver")

PipelineSpec = str | Sequence[Pass] | None


@dataclass(frozen=True)
class Resolved:
    """What `--target` resolves to: the target compiled for, `--accel` applied (None while
    `select-device` in the pipeline is to choose it among `offered`), the passes to run, and the
    selection that chose target and passes (`--target auto` without a pipeline), and why
    `--target auto` chose them (`reason`)."""

    target: Target | None
    passes: tuple[Pass, ...]
    offered: dict[str, Target]
    accel: str | None = None
    synth: bool = False
    selection: Selection | None = None
    reason: str | None = None

    @property
    def choosing(self) -> bool:
        return any(p.name == "select-device" for p in self.passes)

    def chosen(self, ctx: PassContext) -> Target:
        """The target compiled for: the resolved one, or select-device's choice."""
        return self.target or _fitted(self.offered[ctx.chosen_device], self.accel, self.synth)


def _fitted(target: Target, accel: str | None, synth: bool) -> Target:
    """`target` with `--accel` applied (an error when it no longer fits the part); `--synth`
    needs an accelerator."""
    if synth and target.accel is None:
        raise TccError(f"--synth: target '{target.name}' has no accelerator to synthesize")
    return target.with_accel(accel)


def resolve_target(target: str, catalog: dict[str, Target], pipeline: PipelineSpec, *, model: Any = None,
                   example_inputs: Any = None, lower_kw: dict | None = None, accel: str | None = None,
                   synth: bool = False, lc: str | float | None = None, ac: str | float | None = None,
                   settings: str | Sequence[Setting] | None = None, eval_data: DataSpec = None,
                   train_data: DataSpec = None, seed: int = 0, progress: bool = False,
                   study: str | None = None) -> Resolved:
    """Decide the target and the passes:

    - a named target runs `pipeline` (default: its own passes); with `select-device` in the
      pipeline it is the one candidate, so the pass checks the constraints;
    - `auto` with `select-device{lc=...,ac=...}` in `pipeline`: the pass chooses among the catalog;
    - `auto` without a pipeline: `tcc select` explores the compression `settings` (default all) on
      every device under `lc` and `ac` on `eval_data` and compiles the cheapest device meeting both
      with its fastest setting;
    - `auto` with `study` (a `tcc explore` study: its directory or database URL): the point of the
      exploration `explore.choose` takes under `lc` and/or `ac`, on its device (the searched
      accelerator's config, or a catalog device) with its compression setting."""
    passes = tuple(parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline or ())
    choosing = any(p.name == "select-device" for p in passes)
    exploring = target == "auto" and pipeline is None
    if (lc is not None or ac is not None or settings is not None or study is not None) and not exploring:
        raise TccError("--lc, --ac, --settings and --study go with --target auto without --pipeline "
                       "(in a pipeline, select-device takes lc and ac as options)")
    if target != "auto":
        named = catalog.get(target) or _unknown_target(target, catalog)
        return Resolved(_fitted(named, accel, synth), passes if pipeline is not None else named.passes,
                        {named.name: named})
    if not exploring:
        if not choosing:
            raise TccError("--target auto with --pipeline needs select-device{lc=...,ac=...} in it; without a "
                           "pipeline, --lc, --ac and --data explore the compression settings too")
        return Resolved(None, passes, catalog, accel, synth)
    bound = None if lc is None else parse_latency(lc) if isinstance(lc, str) else lc
    ac_value = None if ac is None else parse_accuracy(ac) if isinstance(ac, str) else float(ac)
    if study is not None:
        return _explored(study, catalog, model, example_inputs, lower_kw or {}, bound, ac_value, accel, synth,
                         settings, train_data)
    if lc is None or ac is None or eval_data is None:
        raise TccError("--target auto needs --lc, --ac and --data (as for `tcc select`), or --study and --lc or "
                       "--ac (an exploration's points)")
    chosen_settings = settings_named(settings)
    selection = select(model, fitted_dataset(eval_data, None, "evaluation data"), catalog, lc=bound, ac=ac_value,
                       example_inputs=example_inputs, train=fitted_dataset(train_data, None, "training data"),
                       settings=chosen_settings, seed=seed, progress=progress, **(lower_kw or {}))
    if selection.chosen is None:
        raise TccError(selection.reason)
    setting = next(s for s in chosen_settings if s.name == selection.chosen.setting)
    named = catalog[selection.chosen.device]
    return Resolved(_fitted(named, accel, synth), setting.passes, {named.name: named}, selection=selection,
                    reason=selection.reason)


def _explored(study: str, catalog: dict[str, Target], model: Any, example_inputs: Any, lower_kw: dict,
              lc: float | TokenRate | None, ac: float | None, accel: str | None, synth: bool, settings,
              train_data: DataSpec) -> Resolved:
    """`--target auto --study`: the exploration's point under the constraints, its target and passes."""
    from tcc.passes.finetune import TrainingOptions

    from .explore import explored_choice, setting_name
    if settings is not None:
        raise TccError("--settings goes with --target auto without --study (the study's points are its settings)")
    if accel is not None:
        raise TccError("--accel goes with a named target (with --study, the explored point gives the accelerator)")
    point, named, reason, trained = explored_choice(study, canonical(lower(model, example_inputs, **lower_kw)[0]),
                                                    catalog, lc, ac)
    passes = tuple(parse_pipeline(",".join((PREFIX,) + point.steps)))
    if trained and train_data is None and any(isinstance(p, TrainingOptions) for p in passes):
        raise TccError(f"--study {study}: the exploration fine-tuned {setting_name(point.params)} on its training "
                       "data: give that file as --train-data to compile the point as it was explored")
    return Resolved(_fitted(named, None, synth), passes, {named.name: named}, reason=f"--study {study}: {reason}")


def _unknown_target(name: str, catalog: dict[str, Target]) -> Target:
    import difflib
    close = difflib.get_close_matches(name, catalog, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(catalog)})"
    raise TccError(f"unknown target '{name}'{hint}")


def settings_named(spec: str | Sequence[Setting] | None) -> tuple[Setting, ...]:
    """The compression settings `spec` names (`NAME,...`; default: all)."""
    known = {s.name: s for s in default_settings()}
    if spec is None:
        return tuple(known.values())
    if not isinstance(spec, str):
        return tuple(spec)
    chosen = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise TccError(f"--settings: unknown setting '{unknown[0] if unknown else spec}' (known: {', '.join(known)})")
    return tuple(known[n] for n in chosen)


def compile(model: Any, example_inputs: Any = None, *, target: str = "cpu", pipeline: PipelineSpec = None,
            frontend: str = "export", input_shapes: Sequence[str] = (), arch: str | None = None,
            trust_pickle: bool = False, train_data: DataSpec = None, calib_data: DataSpec = None,
            eval_data: DataSpec = None, progress: bool = False, seed: int = 0, accel: str | None = None,
            synth: bool = False, targets_file: str | Path | None = None, lc: str | float | None = None,
            ac: str | float | None = None, settings: str | Sequence[Setting] | None = None,
            study: str | None = None, weights_from: Any = None) -> Artifact:
    """Compile `model` (an nn.Module, fx.GraphModule, ExportedProgram, or a model file path)
    for `target`; returns an `Artifact` (`.save(path)` writes it, `.run(inputs, on=...)`).

    `pipeline` (a text spec such as `"hp-prune{sparsity=0.75},quantize"` or a list of passes)
    replaces the target's default optimisation passes; the target's lowering passes still run
    after it, except those the pipeline already names (so `select-format{format=csr}` in a
    pipeline is not re-chosen by the target's own `select-format`). `train_data` / `calib_data`
    (data files or `Dataset`s) feed fine-tuning and calibration; without them, passes prune
    one-shot and calibrate on the example inputs. `weights_from` (an artifact or its directory)
    gives the model's float weights the values another compile of it left them before the
    pipeline runs (`adopt_weights`): a decoder's decode step takes the weights pruned and
    fine-tuned through its prefill step, so that both steps run one model.

    `target="auto"`: with `select-device{lc=...,ac=...}` in `pipeline`, the pass chooses among the
    catalog's devices (accuracy on the labelled `eval_data`); without a pipeline, `lc` (`"10ms"`
    or milliseconds) and `ac` (`0.95` or `"95%"`) on `eval_data` choose device and compression
    setting as `tcc select` does (`settings`: the settings to explore, default all); with `study`
    (a `tcc explore` study), `lc` and/or `ac` choose among the exploration's points instead. A named
    target with select-device in its pipeline is the pass's only candidate: it checks the
    constraints. `accel` (`KEY=VALUE,...`) overrides fields of an FPGA target's accelerator
    config; `synth` synthesizes its accelerator with yosys (minutes), records LUT/FF/DSP/BRAM in
    the manifest and fails if the design does not fit the part. `targets_file` adds (or
    replaces) targets from a JSON file of the catalog's schema.

    The prices of one run on every device the cost model can price here are computed once, here,
    and go with the model, its weights, the accelerator's cycles and the accuracy on `eval_data`
    into the artifact's report; `save` only writes. The host's figures are those `tcc calibrate`
    measured on this machine (the catalog's placeholders, marked so, until then); only where the
    choice of the target turns on them (`select-device`, `auto`) is the host measured first, if
    it never was (a progress line says so). What depends on this machine (the predictions, a selection's
    points, select-device's latencies, file paths) goes to the artifact's unhashed `measured/`,
    so the hashed files follow from the model, the options and the software alone."""
    from tqdm.auto import tqdm
    start = time.perf_counter()
    lower_kw = {"frontend": frontend, "input_shapes": input_shapes, "arch": arch, "trust_pickle": trust_pickle}
    catalog = load_catalog(targets_file)
    resolved = resolve_target(target, catalog, pipeline, model=model, example_inputs=example_inputs,
                              lower_kw=lower_kw, accel=accel, synth=synth, lc=lc, ac=ac, settings=settings,
                              eval_data=eval_data, train_data=train_data, seed=seed, progress=progress,
                              study=study)
    steps = tqdm(total=len(resolved.passes) + 4, desc=f"compile: {frontend}", unit="step", leave=False,
                 disable=not progress, dynamic_ncols=True)  # the frontend, each pass, lowering, backend, report

    def step(description: str, done: int = 1) -> None:
        steps.update(done)
        steps.set_description_str(f"compile: {description}")

    graph, signature, examples, source = lower(model, example_inputs, **lower_kw)
    adopted = None
    if weights_from is not None:
        graph, adopted = adopt_weights(graph, weights_from)
    _log.info("lowered %s with %s in %.2f s: %d ops, %d constants", source, frontend, time.perf_counter() - start,
              len(graph.ops), len(graph.constants))
    arrays = example_arrays(signature, examples)
    data = {"example": example_dataset(graph, arrays), "train": fitted_dataset(train_data, graph, "training data"),
            "calib": fitted_dataset(calib_data, graph, "calibration data"),
            "eval": fitted_dataset(eval_data, graph, "evaluation data")}
    data = {k: d for k, d in data.items() if d is not None}
    # the host's measured figures: calibrated now where select-device decides by them, else as cached
    devices = cost_devices(catalog, calibrate=resolved.choosing, on_measure=lambda what: step(what, 0))
    ctx = PassContext(data=data, torch_module=TorchExecutor, progress=progress, seed=seed,
                      devices=candidates(resolved.offered, devices, after=resolved.passes) if resolved.choosing else ())
    if resolved.target is not None:
        resolved.target.context(ctx)
    graph = run_pipeline(graph, resolved.passes, ctx, on_pass=lambda p: step(p.name))
    compiled_for = resolved.chosen(ctx)
    step(f"lowering for {compiled_for.name}")
    graph = compiled_for.lower(graph, ctx, after=resolved.passes)
    ran = resolved.passes + compiled_for.lowering_after(resolved.passes)
    step(f"{compiled_for.backend} backend")
    built = BACKENDS[compiled_for.backend](graph, compiled_for, examples=arrays, synth=synth)
    manifest = {
        "tcc_version": __version__, "torch_version": torch.__version__,
        "source": source, "frontend": frontend, "target": compiled_for.to_json(),
        "pipeline": format_pipeline(ran), "passes": [p.name for p in ran],
        "pass_log": ctx.log, "data": {k: {"source": d.source, "examples": len(d)} for k, d in data.items()},
        **({"weights_from": adopted} if adopted else {}),
        **({"accel": built.manifest} if built.manifest else {}),
    }
    step("report")
    weights = WeightsFile(graph)  # hashed in a thread while the prices and the report are made
    offered = {**catalog, compiled_for.name: compiled_for}
    costs = price_all(graph, offered, devices, after=resolved.passes)
    paths = source_paths(model, {"train": train_data, "calib": calib_data, "eval": eval_data})
    report_files, measured_files = render_report(
        graph, manifest, target=compiled_for, catalog=offered, devices=devices, costs=costs, program=built.program,
        eval_data=data.get("eval"), selection=resolved.selection, measured={"pass_log": ctx.measured, "paths": paths})
    steps.close()
    _log.info("compiled for %s in %.2f s", compiled_for.name, time.perf_counter() - start)
    notes = ((f"--target auto: {resolved.reason}",) if resolved.reason else ()) + tuple(ctx.measured)
    return Artifact(graph, signature.to_json(), manifest, arrays, built.files, report_files=report_files,
                    measured_files=measured_files, notes=notes, weights_file=weights)
