"""The co-design explorer (`tcc explore`): one multi-objective search over the accelerator's
configuration and the model's compression, beside the catalog's fixed devices.

A space file (JSON, `load_space`) names the FPGA target the hardware starts from (its part,
host, link and default config; a list of them searches the parts too, each accelerator
constrained by its own part's resources), the accelerator parameters to search (`AccelConfig` fields,
each a list of values or a `{"low", "high", "step"}` range; `array` sets rows and columns
together), the compression parameters (`prune`: none, hp or blocks, with `sparsity`, the
block tied to each candidate's array tile; `sparsity` per layer kind as `{"attention": [...],
"ffn": [...]}`, a pruning pass per group (`KIND_GROUPS`); `bits`: 8 or 4; `binarize`: none, w1a8, w1a4 or
w1a1, with `tws`; `int_nonlinear`), the fixed devices, the objectives and the faults of the
robustness objective. Every parameter is a finite set of values, so the space is also a grid
(`--sampler grid` walks it).

Each trial is a point: a device (`fpga`, the searched accelerator on the base target's part,
`base` naming the target where the space has several, or a catalog device) and a compression
setting. Its objectives: the task's metric on the
evaluation data (accuracy, 1 - WER, token accuracy), latency per run and energy per run from
the cost model (an FPGA's cycles are the codegen's, equal to the ISA simulator's), throughput
(examples a second with runs back to back: a board's host, link and accelerator each busy
with another run, so its slowest part sets the pace; a fixed device runs one run after
another), the area (the largest fraction of the part's LUT, FF, DSP or BRAM the estimate
needs; a fixed device counts as a whole chip, 1) and each of those fractions alone (`lut`,
`ff`, `dsp`, `bram`), and robustness: the metric with the integer weights' bits flipped
at `flip_rate` and Gaussian noise of `noise` times each input's standard deviation on the
inputs, both seeded. The metric and robustness depend on the compression only: they are
computed once per setting and shared by every hardware point (`Evaluator.metrics`), settings
that extend another start from its compiled graph, and the cost is priced on the setting
compiled one shot (the structure fine-tuning keeps): with a latency constraint a point the
cost model already puts above it skips the fine-tuning and the metric (it cannot be chosen).

The study lives in a real store: optuna's RDB storage, SQLite in the study directory by
default (`--study DIR`, or a database URL for many machines). An interrupted exploration
resumes without repeating an evaluation: a point evaluated before (the same parameters) takes
its stored values. Several workers share one study: local processes or Ray tasks, each
running the same optimizer on the same store. The search is optuna's NSGA-II sampler, its
population sized to the budget (`population`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from tcc.backends.accel.config import AccelConfig
from tcc.ir.errors import TccError
from tcc.ir.graph import Graph
from tcc.ir.printer import print_graph
from tcc.passes import Dataset, PassContext, parse_pipeline, run_pipeline
from tcc.passes.layers import LAYER_KINDS
from tcc.passes.cost_model import Device
from tcc.runtime.torch_executor import TorchExecutor

from .select import PREFIX, TokenRate, accuracy, latency_bound, prepare, run_on_ray
from .targets import Target
from .targets.backends import synthesize_target
from .targets.calibration import cost_devices

_log = logging.getLogger("tcc.explore")

FPGA = "fpga"  # the device of a trial on the searched accelerator
BOARD_PARTS = ("accelerator", "host", "link")  # an FPGA's latency parts: processors that work on different runs
OBJECTIVES = {"metric": "maximize", "latency": "minimize", "throughput": "maximize", "energy": "minimize",
              "area": "minimize", "lut": "minimize", "ff": "minimize", "dsp": "minimize", "bram": "minimize",
              "robustness": "maximize", "price": "minimize"}
COMPRESSION = {"binarize": ("none", "w1a8", "w1a4", "w1a1"), "tws": (False, True), "prune": ("none", "hp", "blocks"),
               "sparsity": None, "bits": (8, 4), "int_nonlinear": (False, True)}  # in the order they are chosen
# `sparsity` per layer kind: {"attention": [...], "ffn": [...]} (or any of `LAYER_KINDS`), a pruning pass per group
KIND_GROUPS = {"attention": "qkv+attn_out", "ffn": "ffn1+ffn2"} | {k: k for k in LAYER_KINDS}
_NOT_SEARCHED = {"dram_words"}  # config fields a space may not set
_SPACE_KEYS = ("base", "hardware", "compression", "devices", "objectives", "robustness")


@dataclass(frozen=True)
class Param:
    """A searched parameter and its values."""

    name: str
    values: tuple


@dataclass(frozen=True)
class Space:
    """What `tcc explore` searches (see the module doc); `source` names the file in errors."""

    bases: tuple[str, ...]  # the FPGA targets the searched accelerator starts from (none: no accelerator searched)
    hardware: tuple[Param, ...]
    compression: tuple[Param, ...]
    devices: tuple[str, ...]
    objectives: tuple[str, ...]
    flip_rate: float = 1e-3
    noise: float = 0.1
    source: str = "space"

    @property
    def choices(self) -> tuple[str, ...]:
        """The devices a point may run on: the searched accelerator (`FPGA`), the fixed ones."""
        return ((FPGA,) if self.bases else ()) + self.devices

    def grid_size(self) -> int:
        """Points of the grid: the fixed devices' settings plus the accelerator's configs x settings."""
        return len(self.grid())

    def grid(self) -> list[dict[str, Any]]:
        """Every point's parameters: each device with each setting."""
        settings: list[dict[str, Any]] = [{}]
        for p in self.compression:
            settings = [c | {p.name: v} if relevant(p.name, c) else c for c in settings
                        for v in (p.values if relevant(p.name, c) else p.values[:1])]
        parts = [{"base": b} for b in self.bases] if len(self.bases) > 1 else [{}] * len(self.bases)
        hardware = [{"device": FPGA} | b | h for b in parts for h in _product(self.hardware)]
        return [d | s for d in hardware + [{"device": n} for n in self.devices] for s in settings]

    def to_json(self) -> dict:
        return {"base": list(self.bases) if len(self.bases) > 1 else "".join(self.bases),
                "hardware": {p.name: list(p.values) for p in self.hardware},
                "compression": {p.name: list(p.values) for p in self.compression}, "devices": list(self.devices),
                "objectives": list(self.objectives), "robustness": {"flip_rate": self.flip_rate, "noise": self.noise}}


class SpaceError(TccError):
    """A space file that cannot be searched: names the file and the field."""


def _unknown(where: str, key: str, known: Sequence[str]) -> SpaceError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
    return SpaceError(f"{where}: unknown parameter '{key}'{hint}")


def _values(where: str, raw: Any) -> tuple:
    """A parameter's values: a non-empty list, a single value, or a range {low, high, step}."""
    if isinstance(raw, dict):
        extra = set(raw) - {"low", "high", "step"}
        if extra or not {"low", "high"} <= set(raw):
            raise SpaceError(f"{where}: a range is {{\"low\": L, \"high\": H, \"step\": S}}, got {json.dumps(raw)}")
        low, high, step = raw["low"], raw["high"], raw.get("step", 1)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (low, high, step)) or step <= 0:
            raise SpaceError(f"{where}: a range needs finite numbers and a positive step, got {json.dumps(raw)}")
        if high < low:
            raise SpaceError(f"{where}: empty range (high {high} < low {low})")
        count = int(math.floor((high - low) / step + 1e-9)) + 1
        whole = all(isinstance(v, int) for v in (low, high, step))
        return tuple(low + i * step if whole else round(low + i * step, 10) for i in range(count))
    values = tuple(raw) if isinstance(raw, list) else (raw,)
    if not values:
        raise SpaceError(f"{where}: empty list of values")
    if len(set(map(json.dumps, values))) != len(values):
        raise SpaceError(f"{where}: a value is listed twice in {json.dumps(list(values))}")
    return values


def load_space(path: str | os.PathLike, targets: Mapping[str, Target]) -> Space:
    """The space in the JSON file at `path`, checked field by field against `targets` (the
    catalog): a SpaceError naming the file and the field for an unknown parameter, an empty
    range, a value the accelerator cannot be built with or a config that fits no part."""
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise SpaceError(f"{where}: cannot read the space file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpaceError(f"{where}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: a space is a JSON object of {', '.join(_SPACE_KEYS)}")
    for key in raw:
        if key not in _SPACE_KEYS:
            raise _unknown(where, key, _SPACE_KEYS)
    devices = _values(f"{where}: devices", raw["devices"]) if "devices" in raw else ()
    for d in devices:
        if d not in targets:
            raise _unknown(f"{where}: devices", str(d), list(targets))
    bases = _values(f"{where}: base", raw["base"]) if raw.get("base", "") != "" else ()  # "": none
    if "hardware" in raw and not bases:
        raise SpaceError(f"{where}: hardware: give the FPGA target it starts from as base")
    for base in bases:
        if base not in targets or targets[base].kind != "fpga":
            fpgas = [n for n, t in targets.items() if t.kind == "fpga"]
            raise SpaceError(f"{where}: base: {json.dumps(base)} is not an FPGA target of the catalog "
                             f"({', '.join(fpgas)})")
    hardware = _hardware(where, raw.get("hardware", {}), [targets[b] for b in bases]) if bases else ()
    if not bases and not devices:
        raise SpaceError(f"{where}: neither a base FPGA to search nor devices: nothing to explore")
    compression = _compression(where, raw.get("compression", {}))
    objectives = tuple(_values(f"{where}: objectives", raw.get("objectives", ["metric", "latency", "energy", "area"])))
    for o in objectives:
        if o not in OBJECTIVES:
            raise _unknown(f"{where}: objectives", str(o), list(OBJECTIVES))
    robustness = raw.get("robustness", {})
    if not isinstance(robustness, dict):
        raise SpaceError(f"{where}: robustness: an object {{\"flip_rate\": R, \"noise\": S}}")
    for key in robustness:
        if key not in ("flip_rate", "noise"):
            raise _unknown(f"{where}: robustness", key, ["flip_rate", "noise"])
    rates = {k: robustness.get(k, d) for k, d in (("flip_rate", 1e-3), ("noise", 0.1))}
    for key, value in rates.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise SpaceError(f"{where}: robustness.{key} must be a number in [0, 1], got {json.dumps(value)}")
    return Space(tuple(bases), hardware, compression, devices, objectives, float(rates["flip_rate"]),
                 float(rates["noise"]), where)


def _hardware(where: str, raw: Any, bases: Sequence[Target]) -> tuple[Param, ...]:
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: hardware: an object of accelerator parameters, e.g. {{\"array\": [8, 16]}}")
    names = [f.name for f in dataclasses.fields(AccelConfig) if f.name not in _NOT_SEARCHED] + ["array"]
    params = []
    for key, value in raw.items():
        if key not in names:
            raise _unknown(f"{where}: hardware", key, names)
        values = _values(f"{where}: hardware.{key}", value)
        for v in values:
            spec = f"rows={v},cols={v}" if key == "array" else f"{key}={v}"
            for base in bases:
                try:
                    base.accel.with_overrides(spec)
                except (ValueError, TypeError) as e:
                    raise SpaceError(f"{where}: hardware.{key}: the accelerator cannot be built with "
                                     f"{json.dumps(v)}: {e}") from None
        params.append(Param(key, values))
    if "array" in raw and ({"rows", "cols"} & set(raw)):
        raise SpaceError(f"{where}: hardware: 'array' sets rows and cols; give either it or them")
    if not any(c is not None for base in bases for c in _configs(tuple(params), base)):
        parts = " or ".join(base.part.name for base in bases)
        raise SpaceError(f"{where}: hardware: no accelerator of the space fits {parts} (the smallest "
                         f"needs more than the part has)")
    return tuple(params)


def _configs(params: tuple[Param, ...], base: Target) -> list[Target | None]:
    """Every accelerator of the grid on `base`'s part (None where it does not fit)."""
    out = []
    for combo in _product(params):
        try:
            out.append(base.with_accel(_overrides(combo)))
        except TccError:
            out.append(None)
    return out


def relevant(name: str, setting: Mapping[str, Any]) -> bool:
    """Whether compression parameter `name` matters given the setting's earlier ones: a
    binarized model is neither pruned nor quantized to other bits, tws splits binary weights
    only, the sparsity is a pruning's, and int-nonlinear follows int8 or W1A8."""
    mode = setting.get("binarize", "none")
    if name == "tws":
        return mode != "none"
    if name in ("prune", "bits"):
        return mode == "none"
    if name.split(".")[0] == "sparsity":
        return mode == "none" and setting.get("prune", "none") != "none"
    if name == "int_nonlinear":
        return mode in ("none", "w1a8")
    return True


def _product(params: Sequence[Param]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for p in params:
        combos = [c | {p.name: v} for c in combos for v in p.values]
    return combos


def _overrides(hardware: Mapping[str, Any]) -> str:
    """`--accel` text of a trial's hardware parameters."""
    items = []
    for key, value in hardware.items():
        items += [f"rows={value}", f"cols={value}"] if key == "array" else [f"{key}={value}"]
    return ",".join(items)


def _compression(where: str, raw: Any) -> tuple[Param, ...]:
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: compression: an object, e.g. {{\"prune\": [\"none\", \"hp\"], "
                         f"\"sparsity\": [0.5, 0.9]}}")
    params = []
    items = []
    for key, value in raw.items():
        if key == "sparsity" and isinstance(value, dict) and not {"low", "high", "step"} & set(value):
            if not value:
                raise SpaceError(f"{where}: compression.sparsity: no layer kind given")
            for group, ratios in value.items():
                if group not in KIND_GROUPS:
                    raise _unknown(f"{where}: compression.sparsity", group, list(KIND_GROUPS))
                items.append((f"sparsity.{group}", "sparsity", ratios))
        else:
            items.append((key, key, value))
    for name, key, value in items:
        if key not in COMPRESSION:
            raise _unknown(f"{where}: compression", key, list(COMPRESSION))
        values = _values(f"{where}: compression.{name}", value)
        allowed = COMPRESSION[key]
        for v in values:
            bad = v not in allowed if allowed is not None else not (
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1)
            if bad:
                what = ", ".join(map(json.dumps, allowed)) if allowed is not None else "a sparsity in [0, 1)"
                raise SpaceError(f"{where}: compression.{name}: {json.dumps(v)} is not one of {what}")
        params.append(Param(name, values))
    kinds = [KIND_GROUPS[p.name.split(".")[1]].split("+") for p in params if "." in p.name]
    for i, group in enumerate(kinds):
        for other in kinds[:i]:
            if set(group) & set(other):
                raise SpaceError(f"{where}: compression.sparsity: layer kind {sorted(set(group) & set(other))[0]} "
                                 f"is in two groups")
    return tuple(sorted(params, key=lambda p: list(COMPRESSION).index(p.name.split(".")[0])))


def kind_ratios(setting: Mapping[str, Any]) -> dict[str, float]:
    """A setting's prune ratio per layer-kind group (`sparsity.GROUP` parameters), by group."""
    return {k.split(".")[1]: v for k, v in setting.items() if k.startswith("sparsity.")}


def setting_steps(compression: Mapping[str, Any], tile: tuple[int, int]) -> tuple[str, ...]:
    """The pipeline steps of a compression setting, the prune block the device's tile."""
    steps = []
    block = f"{tile[0]}x{tile[1]}"
    mode, prune = compression.get("binarize", "none"), compression.get("prune", "none")
    if mode != "none":
        steps.append(f"binarize{{mode={mode},tws={str(bool(compression.get('tws', False))).lower()}}}")
    elif prune != "none":
        name = "hp-prune" if prune == "hp" else "block-prune"
        groups = kind_ratios(compression)
        if groups:  # a ratio per layer kind: a pass per group
            steps += [f"{name}{{sparsity={v},block={block},kinds={KIND_GROUPS[g]}}}" for g, v in groups.items()]
        else:
            steps.append(f"{name}{{sparsity={compression.get('sparsity', 0.75)},block={block}}}")
    bits = compression.get("bits", 8)
    if mode in ("none", "w1a8"):
        steps.append(f"conv-as-gemm,pool-late,canonicalize,dce,quantize{{bits={bits}}}" if mode == "none" else
                     "conv-as-gemm,pool-late,canonicalize,dce,quantize")
        if compression.get("int_nonlinear", False):
            steps.append("int-nonlinear")
    return tuple(steps)


@dataclass(frozen=True)
class Outcome:
    """One evaluated point: its parameters, pipeline steps, objectives' values (by name), the
    estimate's resources as fractions of the part, whether the cost model put it past the
    latency constraint (`skipped`: no metric then), and with `--synth` yosys' resources."""

    params: dict[str, Any]
    steps: tuple[str, ...]
    values: dict[str, float]
    latency_ms: float
    energy_mj: float
    resources: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    synthesized: dict[str, float] = field(default_factory=dict)  # yosys' counts as fractions of the part

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"steps": list(self.steps)}


def flip_bits(graph: Graph, rate: float, seed: int) -> Graph:
    """`graph` with each bit of its linears' integer weights flipped with probability `rate`
    (two's complement in the weight's bits; a binary weight's sign)."""
    if rate <= 0:
        return graph
    rng = np.random.default_rng(seed)
    types, weights = graph.types, dict(graph.weights)
    for name in dict.fromkeys(op.operands[1] for op in graph.ops if op.kind in ("linear", "matmul")):
        t = types[name]
        if name not in weights or t.dtype.is_float:
            continue
        array = np.asarray(weights[name]).astype(np.int64)
        if t.dtype.bits == 1:
            array = np.where(rng.random(array.shape) < rate, -array, array)
        else:
            bits = t.dtype.bits
            mask = sum((rng.random(array.shape) < rate).astype(np.int64) << b for b in range(bits))
            unsigned = (array & ((1 << bits) - 1)) ^ mask
            array = np.where(unsigned >= 1 << (bits - 1), unsigned - (1 << bits), unsigned)
        weights[name] = array.astype(np.asarray(graph.weights[name]).dtype)
    return graph.replace(weights=weights)


def noisy(data: Dataset, scale: float, seed: int) -> Dataset:
    """`data` with Gaussian noise of `scale` x each float input's standard deviation added."""
    if scale <= 0:
        return data
    generator = torch.Generator().manual_seed(seed)
    inputs = tuple(x + scale * x.std() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
                   if x.is_floating_point() else x for x in data.inputs)
    return dataclasses.replace(data, inputs=inputs)


class Evaluator:
    """Evaluates trials of `space` for the lowered model `base`: compiled graphs by pipeline
    prefix and metrics by setting, kept for the trials after."""

    def __init__(self, base: Graph, data: Dataset, targets: Mapping[str, Target], space: Space, *,
                 examples: Dataset, train: Dataset | None = None, lc_ms: float | None = None, seed: int = 0,
                 devices: Mapping[str, Device] | None = None):
        self.base, self.data, self.train, self.examples, self.space = base, data, train, examples, space
        self.targets, self.lc_ms, self.seed = dict(targets), lc_ms, seed
        self.devices = dict(devices) if devices is not None else used_devices(targets, space)
        self.graphs: dict[tuple[bool, tuple[str, ...]], Graph] = {(True, ()): base, (False, ()): base}
        self.metrics: dict[tuple[str, ...], tuple[float, float]] = {}

    def target(self, params: Mapping[str, Any]) -> Target:
        """The trial's device: the base FPGA with its accelerator, or a catalog device."""
        if params["device"] != FPGA:
            return self.targets[params["device"]]
        hardware = {p.name: params[p.name] for p in self.space.hardware}
        base = params["base"] if len(self.space.bases) > 1 else self.space.bases[0]
        return self.targets[base].with_accel(_overrides(hardware))

    def graph(self, steps: tuple[str, ...], trained: bool = True) -> Graph:
        """The model compiled by `steps` (fine-tuned on the training data, or with `trained`
        False one shot: the same structure, so the same latency, at a fraction of the cost),
        from the longest prefix compiled before."""
        trained = trained and self.train is not None
        done = max((k for t, k in self.graphs if t == trained and steps[:len(k)] == k), key=len)
        graph = self.graphs[(trained, done)]
        ctx_data = {"example": self.examples} | ({"train": self.train} if trained else {})
        for i in range(len(done), len(steps)):
            ctx = PassContext(data=ctx_data, torch_module=TorchExecutor, seed=self.seed)
            graph = run_pipeline(graph, parse_pipeline(steps[i]), ctx)
            self.graphs[(trained, steps[:i + 1])] = graph
        return graph

    def metric(self, steps: tuple[str, ...]) -> tuple[float, float]:
        """(the task's metric, the metric under the space's faults) of a setting."""
        if steps not in self.metrics:
            graph = self.graph(steps)
            faulty = flip_bits(graph, self.space.flip_rate, self.seed)
            self.metrics[steps] = (accuracy(graph, self.data),
                                   accuracy(faulty, noisy(self.data, self.space.noise, self.seed)))
        return self.metrics[steps]

    def __call__(self, params: Mapping[str, Any], known: tuple[float, float] | None = None) -> Outcome:
        """The point of `params`; `known`: its setting's (metric, robustness) from the store."""
        target = self.target(params)
        steps = setting_steps(params, target.tile)
        try:
            structure = self.graph(steps, trained=False)
        except TccError:  # a pass that trains or nothing (ternary weight splitting)
            structure = self.graph(steps)
        cost = target.price(structure, self.devices, after=tuple(parse_pipeline(",".join((PREFIX,) + steps))))
        latency_ms, energy_mj = cost.latency_s * 1e3, cost.energy_j * 1e3
        pace = max(cost.parts[k] for k in BOARD_PARTS) if target.kind == "fpga" else cost.latency_s
        resources: dict[str, float] = {}
        if target.kind == "fpga":
            needs, have = target.accel.estimate_resources(), target.part.resources()
            resources = {k: needs[k] / have[k] for k in have}
        skipped = known is None and self.lc_ms is not None and latency_ms > self.lc_ms
        metric, robust = known or ((math.nan, math.nan) if skipped else self.metric(steps))
        values = {"metric": metric, "latency": latency_ms, "throughput": len(self.examples) / pace,
                  "energy": energy_mj, "area": max(resources.values()) if resources else 1.0,
                  **{k.lower(): resources.get(k, 1.0) for k in ("LUT", "FF", "DSP", "BRAM")}, "robustness": robust,
                  "price": target.device.price_usd}
        return Outcome(dict(params), steps, values, latency_ms, energy_mj, resources, skipped)


def used_devices(targets: Mapping[str, Target], space: Space) -> dict[str, Device]:
    """The cost model's figures of the devices `space` uses (calibrating the host CPU first
    where it must)."""
    used = {n: t for n, t in targets.items() if n in space.devices or n in space.bases}
    hosts = {t.part.host for t in used.values() if t.part is not None and t.part.host}
    return cost_devices({n: t for n, t in targets.items() if n in used or n in hosts})


def fingerprint(graph: Graph) -> str:
    """What a study is of: the lowered model's text, hashed (weights included)."""
    digest = hashlib.sha256(print_graph(graph).encode())
    for name in sorted(graph.weights):
        digest.update(np.ascontiguousarray(graph.weights[name]).tobytes())
    return digest.hexdigest()[:16]


STUDY = "tcc-explore"


def storage_url(store: str) -> str:
    """A database URL as it is; a directory: the SQLite file `study.db` in it."""
    return store if "://" in store else f"sqlite:///{Path(store).resolve() / 'study.db'}"


def population(budget: int) -> int:
    """NSGA-II's population for a budget of points: about a quarter of it (at least 4, at most
    optuna's default 50), so that a small budget still sees several generations."""
    return max(4, min(50, budget // 4))


def open_study(store: str, space: Space, model: str, seed: int = 0, budget: int = 200):
    """The study in `store` (created if new; its NSGA-II population `population(budget)`): a
    TccError when it explores another model or another space."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage_url(store)
    if url.startswith("sqlite:///") and "://" not in store:
        Path(store).mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=90)
    study = optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True,
                                directions=[OBJECTIVES[o] for o in space.objectives],
                                sampler=optuna.samplers.NSGAIISampler(population_size=population(budget),
                                                                      seed=seed))
    attrs = study.user_attrs
    space_json = json.dumps(space.to_json(), sort_keys=True)
    if not attrs:
        study.set_user_attr("model", model)
        study.set_user_attr("space", space_json)
    elif attrs.get("model") != model:
        raise TccError(f"--study {store}: the study explores another model ({attrs.get('model')}, this one is "
                       f"{model}): give a new --study")
    elif attrs.get("space") != space_json:
        raise TccError(f"--study {store}: the study explores another space: give a new --study")
    return study


def read_study(store: str) -> tuple[dict, dict[str, Any], list[Outcome]]:
    """(the space as JSON, the study's attributes, the evaluated points) of the exploration in
    `store`, read only: a TccError when there is none."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = TccError(f"--study {store}: no exploration there (run `tcc explore ... --study {store}` first)")
    if "://" not in store and not (Path(store) / "study.db").is_file():
        raise missing
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage_url(store))
    except KeyError:
        raise missing from None
    except Exception as e:  # a database URL that does not open
        raise TccError(f"--study {store}: cannot open the study ({type(e).__name__}: {e})") from None
    attrs = study.user_attrs
    return json.loads(attrs.get("space", "{}")), attrs, _points(study)


def _points(study) -> list[Outcome]:
    """The study's evaluated points."""
    return [Outcome(**(t.user_attrs["outcome"] | {"steps": tuple(t.user_attrs["outcome"]["steps"])}))
            for t in _evaluated(study).values() if "outcome" in t.user_attrs]


def explored_choice(store: str, base: Graph, targets: Mapping[str, Target], lc: float | TokenRate | None,
                    ac: float | None) -> tuple[Outcome, Target, str, bool]:
    """The point of the exploration in `store` that `choose` takes under `lc` / `ac` (those
    whose accelerator `--synth` found too large for its part aside), its target, the reason,
    and whether the exploration fine-tuned its settings: a TccError for a study of another
    model, one without points, or when no point meets the constraints."""
    space, attrs, points = read_study(store)
    if attrs.get("model") != fingerprint(base):
        raise TccError(f"--study {store}: the study explores another model ({attrs.get('model')}, this one is "
                       f"{fingerprint(base)})")
    if lc is None and ac is None:
        raise TccError(f"--study {store}: give --lc and/or --ac to choose among the exploration's points")
    lc_ms = latency_bound(lc, base)
    synthesized = _synthesis_of(attrs)
    live = [p for p in (_with_synthesis(p, space, targets, synthesized) for p in points) if p and not p.skipped]
    if not live:
        raise TccError(f"--study {store}: the exploration has no point to choose (run `tcc explore` on it)")
    chosen, _closest, reason = choose(live, lc_ms, ac, attrs.get("score", "accuracy"))
    if chosen is None:
        raise TccError(f"--study {store}: {reason}")
    return chosen, explored_target(chosen, space, targets), reason, bool(attrs.get("trained"))


def explored_target(point: Outcome, space: Mapping, targets: Mapping[str, Target]) -> Target:
    """The target of an explored point: its catalog device, or the space's base FPGA (the
    point's `base` where the space has several) with the point's accelerator."""
    if point.params["device"] != FPGA:
        name = point.params["device"]
    else:
        bases = space["base"] if isinstance(space["base"], list) else [space["base"]]
        name = point.params.get("base", bases[0] if len(bases) == 1 else None)
        if name is None:
            raise TccError(f"the point {describe(point)} names none of the space's FPGA targets ({', '.join(bases)})")
    if name not in targets:
        raise TccError(f"target '{name}' of the exploration is not in the catalog (give the exploration's "
                       f"--targets-file)")
    if point.params["device"] != FPGA:
        return targets[name]
    return targets[name].with_accel(_overrides({k: point.params[k] for k in space.get("hardware", {})}))


def _config_key(target: Target) -> str:
    """What a synthesis is of: the part and the accelerator's config."""
    return json.dumps({"part": target.part.name, "accel": target.accel.to_json()}, sort_keys=True)


def _synthesis_of(attrs: Mapping[str, Any]) -> dict[str, dict]:
    """Yosys' counts kept in a study's attributes, by `_config_key`."""
    return {k.removeprefix("synthesis "): v for k, v in attrs.items() if k.startswith("synthesis ")}


def _with_synthesis(point: Outcome, space: Mapping, targets: Mapping[str, Target],
                    synthesized: Mapping[str, dict]) -> Outcome | None:
    """`point` with yosys' resources where its accelerator was synthesized (None: yosys found it
    too large for its part); as it is otherwise."""
    if point.params["device"] != FPGA or point.synthesized:
        return point
    target = explored_target(point, space, targets)
    counts = synthesized.get(_config_key(target))
    if counts is None:
        return point
    if target.part.overflow(counts) is not None:
        return None
    have = target.part.resources()
    return dataclasses.replace(point, synthesized={k: counts[k] / have[k] for k in have})


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(params.items())))


def _evaluated(study) -> dict[str, Any]:
    """The finished trials of distinct points, by their parameters' key: completed, or pruned
    (an accelerator that does not fit the part)."""
    from optuna.trial import TrialState
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if "key" in t.user_attrs and not t.user_attrs.get("repeat"):
            out.setdefault(t.user_attrs["key"], t)
    return out


def _suggest(trial, space: Space) -> dict[str, Any]:
    """A trial's parameters: the device, its accelerator's when it is the searched FPGA, the
    setting's (those a setting ignores are left out: `prune`'s sparsity, `binarize`'s tws)."""
    params = {"device": trial.suggest_categorical("device", list(space.choices))}
    if params["device"] == FPGA:
        if len(space.bases) > 1:
            params["base"] = trial.suggest_categorical("base", list(space.bases))
        params |= {p.name: trial.suggest_categorical(p.name, list(p.values)) for p in space.hardware}
    for p in space.compression:
        if relevant(p.name, params):
            params[p.name] = trial.suggest_categorical(p.name, list(p.values))
    return params


def _work(evaluator: Evaluator, store: str, model: str, budget: int, seed: int, queue: Sequence[dict] = (),
          progress: bool = False) -> int:
    """One worker: runs the optimizer on the shared study until `budget` distinct points are
    evaluated (or the grid is); returns how many this worker evaluated."""
    import optuna
    space = evaluator.space
    study = open_study(store, space, model, seed, budget)
    for params in queue:
        study.enqueue_trial(params, skip_if_exists=True)
    grid = space.grid()
    limit = min(budget, len(grid))
    mine = [0]

    def objective(trial) -> list[float]:
        params = _suggest(trial, space)  # an enqueued (grid) trial's are fixed
        key = _key(params)
        trial.set_user_attr("key", key)  # claimed first: another worker on the same point sees it
        done = _evaluated(study)
        running = any(t.user_attrs.get("key") == key and t.number < trial.number and not t.user_attrs.get("repeat")
                      for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if key in done or running:  # evaluated (or being evaluated): no evaluation; a point not yet seen goes next
            trial.set_user_attr("repeat", True)
            unseen = [g for g in grid if _key(g) not in done]
            if unseen:
                study.enqueue_trial(unseen[random.Random(trial.number).randrange(len(unseen))])
            if running or done[key].values is None:
                raise optuna.TrialPruned("evaluated by another worker, or an accelerator that does not fit the part")
            return list(done[key].values)
        try:
            steps = setting_key(evaluator, params)
        except TccError as e:  # an accelerator of the space that does not fit the part: no point
            raise optuna.TrialPruned(str(e)) from None
        known = next(((t.user_attrs["outcome"]["values"]["metric"], t.user_attrs["outcome"]["values"]["robustness"])
                      for t in done.values() if "outcome" in t.user_attrs and not t.user_attrs["outcome"]["skipped"]
                      and tuple(t.user_attrs["outcome"]["steps"]) == steps), None)
        outcome = evaluator(params, known)
        values = dict(outcome.values)
        if outcome.skipped:  # past the latency constraint: stored as the worst metric, never chosen
            values["metric"] = values["robustness"] = 0.0
        trial.set_user_attr("outcome", outcome.to_json())
        mine[0] += 1
        return [values[o] for o in space.objectives]

    from tqdm.auto import tqdm
    bar = tqdm(total=limit, initial=len(_evaluated(study)), desc="points", unit="point", disable=not progress,
               leave=False, dynamic_ncols=True)

    def enough(study, trial) -> None:
        done = len(_evaluated(study))
        bar.update(done - bar.n)
        if done >= limit:
            study.stop()

    with bar:
        if bar.n < limit:
            study.optimize(objective, n_trials=2 * limit, callbacks=[enough], catch=())
    return mine[0]


def setting_key(evaluator: Evaluator, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The pipeline steps of a point's setting (its metric's key)."""
    return setting_steps(params, evaluator.target(params).tile)


@contextlib.contextmanager
def watch_study(store: str, space: Space, model: str, limit: int, progress: bool, every: float = 2.0):
    """While the body runs (workers in other processes), a progress bar of the study's
    evaluated points, read from the store `every` seconds."""
    if not progress:
        yield
        return
    from tqdm.auto import tqdm
    study, stop = open_study(store, space, model), threading.Event()

    def poll() -> None:
        with tqdm(total=limit, desc="points", unit="point", leave=False, dynamic_ncols=True) as bar:
            while True:
                bar.update(min(limit, len(_evaluated(study))) - bar.n)
                if stop.wait(every):
                    return

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _worker(args: tuple) -> int:
    """A worker process: builds its evaluator from what it is sent, on one thread."""
    torch.set_num_threads(1)
    evaluator_args, evaluator_kw, store, model, budget, seed = args
    return _work(Evaluator(*evaluator_args, **evaluator_kw), store, model, budget, seed)


@dataclass(frozen=True)
class Exploration:
    """A study's result: every distinct point, the Pareto set (non-dominated on the space's
    objectives, points past the latency constraint aside), the point chosen under --lc/--ac
    (None: none meets both; `closest` then), the reason in words, and the run's numbers."""

    space: Space
    points: tuple[Outcome, ...]
    front: tuple[Outcome, ...]
    chosen: Outcome | None
    closest: Outcome | None
    reason: str
    evaluated: int
    seconds: float
    score: str = "accuracy"

    def to_json(self) -> dict:
        return {"space": self.space.to_json(), "evaluated": self.evaluated, "seconds": round(self.seconds, 3),
                "score": self.score, "reason": self.reason,
                "chosen": self.chosen.to_json() if self.chosen else None,
                "closest": self.closest.to_json() if self.closest else None,
                "pareto": [p.to_json() for p in self.front], "points": [p.to_json() for p in self.points]}


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[str]) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    sign = {o: 1 if OBJECTIVES[o] == "minimize" else -1 for o in objectives}
    return all(sign[o] * a[o] <= sign[o] * b[o] for o in objectives) and \
        any(sign[o] * a[o] < sign[o] * b[o] for o in objectives)


def pareto_front(points: Sequence[Outcome], objectives: Sequence[str]) -> list[Outcome]:
    """The points no other point dominates (`dominates`), points past the constraint aside."""
    live = [p for p in points if not p.skipped]
    return [p for p in live if not any(dominates(q.values, p.values, objectives) for q in live if q is not p)]


def choose(points: Sequence[Outcome], lc_ms: float | None, ac: float | None, score: str = "accuracy"
           ) -> tuple[Outcome | None, Outcome | None, str]:
    """(chosen, closest, reason): the cheapest point meeting latency <= lc_ms and metric >= ac,
    then the fastest; when none does, the one missing them least."""
    live = [p for p in points if not p.skipped]
    if lc_ms is None and ac is None:
        return None, None, "no constraints given (--lc, --ac): the Pareto set is the result"
    if not live:
        return None, None, "no point to choose from (none evaluated, or every one past the latency constraint)"
    lc, floor = lc_ms if lc_ms is not None else math.inf, ac if ac is not None else -math.inf

    def shortfall(p: Outcome) -> float:
        return max(0.0, p.latency_ms / lc - 1) + max(0.0, (floor - p.values["metric"]) / max(abs(floor), 1e-9))

    feasible = [p for p in live if p.latency_ms <= lc and p.values["metric"] >= floor]
    closest = min(live, key=lambda p: (shortfall(p), p.values["price"], p.latency_ms))
    if not feasible:
        return None, closest, (f"no point meets latency <= {lc:g} ms and {score} >= {floor:g}; closest: "
                               f"{describe(closest)}")
    chosen = min(feasible, key=lambda p: (p.values["price"], p.latency_ms, -p.values["metric"]))
    return chosen, closest, (f"{describe(chosen)} is the cheapest point meeting latency <= {lc:g} ms and "
                             f"{score} >= {floor:g}")


def synthesize_front(points: Sequence[Outcome], space: Space, targets: Mapping[str, Target], study,
                     lc_ms: float | None = None, ac: float | None = None, score: str = "accuracy",
                     progress: bool = False) -> tuple[list[Outcome], list[Outcome]]:
    """(points, Pareto set) with yosys' resources on every accelerator of the Pareto set and on
    the point chosen under `lc_ms` / `ac`: each config synthesized once (kept in the study's
    attributes, so a resumed run does not repeat it), every point whose accelerator yosys finds
    too large for its part dropped, and the set and the choice recomputed until each of their
    accelerators is synthesized."""
    from tqdm.auto import tqdm
    done = _synthesis_of(study.user_attrs)
    spec = space.to_json()
    with tqdm(desc="yosys", unit="config", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        while True:
            points = [p for p in (_with_synthesis(p, spec, targets, done) for p in points) if p is not None]
            front = pareto_front(points, space.objectives)
            chosen = choose(points, lc_ms, ac, score)[0]
            todo = {}
            for p in front + ([chosen] if chosen is not None else []):
                if p.params["device"] == FPGA and not p.synthesized:
                    target = explored_target(p, spec, targets)
                    todo[_config_key(target)] = (target, p)
            if not todo:
                return points, front
            for key, (target, p) in todo.items():
                _log.info("synthesizing %s's accelerator", describe(p))
                done[key] = synthesize_target(target)
                study.set_user_attr(f"synthesis {key}", done[key])
                bar.update()


def setting_name(params: Mapping[str, Any]) -> str:
    """A setting in short: `blocks75-int8-integer`, `w1a1-tws`, `int4`."""
    mode = params.get("binarize", "none")
    if mode != "none":
        parts = [mode] + (["tws"] if params.get("tws") else [])
    else:
        prune = params.get("prune", "none")
        groups = kind_ratios(params)
        ratios = "-".join(f"{g}{round(100 * v)}" for g, v in groups.items()) if groups else \
            round(100 * params.get("sparsity", 0.75))
        parts = ([f"{prune}{'-' if groups else ''}{ratios}"] if prune != "none" else []) + \
            [f"int{params.get('bits', 8)}"]
    return "-".join(parts + (["integer"] if relevant("int_nonlinear", params) and params.get("int_nonlinear") else []))


def device_label(params: Mapping[str, Any]) -> str:
    """A point's device in short: a catalog device, `fpga`, or `fpga on BASE` where the space
    searches several FPGA targets."""
    return f"{FPGA} on {params['base']}" if "base" in params else params["device"]


def describe(p: Outcome) -> str:
    """A point in words: device (and accelerator), setting, latency, metric."""
    hardware = {k: v for k, v in p.params.items()
                if k.split(".")[0] not in COMPRESSION and k not in ("device", "base")}
    device = device_label(p.params) + (f" ({_overrides(hardware)})" if hardware else "")
    return f"{device} with {setting_name(p.params)}: {p.latency_ms:.3g} ms, metric {p.values['metric']:.4f}"


def explore(base: Graph, data: Dataset, targets: Mapping[str, Target], space: Space, *, examples: Dataset,
            budget: int, store: str, train: Dataset | None = None, executor: str = "inline",
            workers: int = 1, grid: bool = False, lc: float | TokenRate | None = None, ac: float | None = None,
            seed: int = 0, progress: bool = False, synth: bool = False) -> Exploration:
    """Explore `space` for `base` (the lowered model) in the study at `store` until `budget`
    distinct points are evaluated (all of them: the grid, in order, with `grid`), on this
    process (`inline`), local processes or Ray workers sharing the store; then the Pareto set
    (with `synth`, its accelerators synthesized by yosys: `synthesize_front`) and the choice
    under `lc` (milliseconds a run, or a decoder's `TokenRate`) / `ac`."""
    start = time.perf_counter()
    lc_ms = latency_bound(lc, base)
    if budget < 1:
        raise TccError(f"--budget: at least 1 point, got {budget}")
    if train is None and any(p.name == "tws" and True in p.values for p in space.compression):
        raise TccError(f"{space.source}: compression.tws: ternary weight splitting trains: give --train-data")
    if budget > space.grid_size():
        raise TccError(f"--budget {budget} is more than the space's {space.grid_size()} points (the whole grid): "
                       f"give --budget {space.grid_size()} or less")
    model = fingerprint(base)
    open_study(store, space, model, seed)  # refuses another model's study before any work
    evaluator_args = (base, data, targets, space)
    evaluator_kw = dict(examples=examples, train=train, lc_ms=lc_ms, seed=seed,
                        devices=used_devices(targets, space))  # calibrated here, before workers load the machine
    queue = space.grid() if grid else ()
    if executor == "inline":
        _work(Evaluator(*evaluator_args, **evaluator_kw), store, model, budget, seed, queue, progress)
    elif executor in ("local", "ray"):
        if grid:
            study = open_study(store, space, model, seed)
            for params in queue:
                study.enqueue_trial(params, skip_if_exists=True)
        args = [(evaluator_args, evaluator_kw, store, model, budget, seed + i) for i in range(workers)]
        with watch_study(store, space, model, min(budget, space.grid_size()), progress):
            if executor == "local":
                with concurrent.futures.ProcessPoolExecutor(
                        workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                    list(pool.map(_worker, args))
            else:
                run_on_ray(_worker, [(a,) for a in args])
    else:
        raise TccError(f"--executor: unknown executor '{executor}' (inline, local or ray)")
    study = open_study(store, space, model, seed)
    study.set_user_attr("score", data.task.score_name)  # for tcc compile --study
    study.set_user_attr("trained", train is not None)
    points = _points(study)
    evaluated = len(points)
    front = pareto_front(points, space.objectives)
    if synth:
        points, front = synthesize_front(points, space, targets, study, lc_ms, ac, data.task.score_name, progress)
    points, front = tuple(points), tuple(front)
    chosen, closest, reason = choose(points, lc_ms, ac, data.task.score_name)
    return Exploration(space, points, front, chosen, closest, reason, evaluated, time.perf_counter() - start,
                       data.task.score_name)



def explore_model(model: Any, data: Dataset, targets: Mapping[str, Target], space: Space, *, budget: int,
                  store: str, example_inputs: Any = None, train: Dataset | None = None, **kw) -> Exploration:
    """`explore` for `model` (anything `tcc.compile` takes; `lower`'s keywords among `kw`)."""
    lower_kw = {k: kw.pop(k) for k in ("input_shapes", "arch", "trust_pickle") if k in kw}
    base, example, data, train = prepare(model, example_inputs, data, train, "exploration", **lower_kw)
    return explore(base, data, targets, space, examples=example, budget=budget, store=store, train=train, **kw)


__all__ = ["Space", "Param", "Outcome", "Exploration", "Evaluator", "load_space", "explore", "explore_model",
           "pareto_front", "dominates", "choose", "flip_bits", "noisy", "setting_steps", "setting_name", "relevant",
           "describe", "device_label", "kind_ratios", "synthesize_front", "read_study", "explored_choice", "explored_target"]
