"""The catalog of targets, shipped as data (`catalog.json`), read and validated.

Every target describes what the compiler needs (backend, executor, default passes, tile) and
what the cost model needs: CPU and GPU targets carry their figures in a `device` object; an
FPGA target's figures follow from its part (price, power, DRAM bandwidth, the host processor and link)
and its accelerator config (clock, array, on-chip buffers).

Users add targets with a JSON file of the same schema (`load_catalog(targets_file)`, the CLI's
`--targets-file`); a user target replaces a shipped one of the same name. Every target, shipped
or not, is validated in full: an error is one `TccError` line naming the file, the target and
the field.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import stat
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from tcc.backends.accel.config import AccelConfig
from tcc.backends.accel.verilog import FAMILIES
from tcc.ir.encoding import ENCODINGS
from tcc.ir.errors import TccError

from .target import Part, Target, parsed_pipeline

KINDS = ("cpu", "gpu", "fpga")
BACKENDS_BY_KIND = {"cpu": ("reference",), "gpu": ("reference",), "fpga": ("accel",)}
EXECUTORS = {"cpu": ("cpu", "numpy"), "gpu": ("gpu",), "fpga": ("sim", "rtl")}
# the figures a cpu/gpu target's `device` object gives: exactly the numeric fields of Device
DEVICE_FIELDS = ("price_usd", "power_w", "dram_gbps", "onchip_mb", "fp32_gflops", "int8_gops", "op_overhead_us",
                 "clock_mhz")
_POSITIVE_FIGURES = ("price_usd", "power_w", "dram_gbps", "fp32_gflops", "clock_mhz")  # the rest may be 0
SYNTHESIS_FIELDS = ("LUT", "FF", "DSP", "BRAM")
SHIPPED = "catalog.json"
MAX_FILE_BYTES = 1 << 24  # 16 MiB of targets (the shipped catalog is a few KB)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# ----------------------------------------------------------------------------------------------
# loading and validation


class _Where:
    """Builds the one-line errors of one target: `FILE: target 'NAME': FIELD ...`."""

    def __init__(self, file: str, name: str):
        self.file, self.name = file, name

    def error(self, message: str) -> TccError:
        return TccError(f"{self.file}: target '{self.name}': {message}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "fpga" else f"a {kind}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(where: _Where, field: str, value: Any, *, positive: bool) -> float:
    """A finite number, > 0 (`positive`) or >= 0."""
    need = "a positive number" if positive else "a number >= 0"
    if not _is_number(value) or not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise where.error(f"{field} must be {need}, got {json.dumps(value)}")
    return value


def _integer(where: _Where, field: str, value: Any, *, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise where.error(f"{field} must be {need}, got {json.dumps(value)}")
    return value


def _string(where: _Where, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"{field} must be a non-empty string, got {json.dumps(value)}")
    return value


def _check_fields(where: _Where, obj: Any, prefix: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
                  what: str = "an object") -> None:
    """`obj` is a JSON object with every `required` field and no field outside `required` +
    `optional`; errors name the field as `prefix` + name."""
    if not isinstance(obj, dict):
        raise where.error(f"{prefix.rstrip('.') or 'the target'} must be {what}, got {_type_name(obj)}")
    known = required + optional
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise where.error(f"unknown field '{prefix}{key}'{hint}")
    for key in required:
        if key not in obj:
            raise where.error(f"missing field '{prefix}{key}'")


COMMON_REQUIRED = ("kind", "backend", "executor", "description", "tile", "pipeline", "lowering")
COMMON_OPTIONAL = ("formats", "work_cost", "measured")
PART_FIELDS = ("name", "family", "lut", "ff", "dsp", "bram36", "uram", "dram_gbps", "price_usd", "power_w",
               "static_w", "process_nm", "link_gbps", "link_latency_us", "host")


def _parse_target(file: str, name: str, data: Any) -> Target:
    """One target from its JSON object, every field checked (the host's existence is checked
    once the whole catalog is known, `_check_hosts`)."""
    where = _Where(file, name)
    if not _NAME.fullmatch(name):
        raise TccError(f"{file}: target name {json.dumps(name)} must be letters, digits and _ . + - "
                       "(starting with a letter or digit)")
    if not isinstance(data, dict):
        raise where.error(f"must be an object of fields, got {_type_name(data)}")
    if "kind" not in data:
        raise where.error("missing field 'kind'")
    kind = data["kind"]
    if kind not in KINDS:
        raise where.error(f"kind must be one of {', '.join(KINDS)}, got {json.dumps(kind)}")
    if kind == "fpga":
        if "device" in data:
            raise where.error("field 'device' is not for fpga targets: their figures follow from 'part' and 'accel'")
        _check_fields(where, data, "", COMMON_REQUIRED + ("part", "accel"), COMMON_OPTIONAL + ("synthesis",))
    else:
        for key in ("part", "accel", "synthesis"):
            if key in data:
                raise where.error(f"field '{key}' is only for fpga targets (this one's kind is {kind})")
        _check_fields(where, data, "", COMMON_REQUIRED + ("device",), COMMON_OPTIONAL)

    backend = data["backend"]
    if backend not in BACKENDS_BY_KIND[kind]:
        raise where.error(f"backend must be {' or '.join(BACKENDS_BY_KIND[kind])} for {_a(kind)} target, "
                          f"got {json.dumps(backend)}")
    executor = data["executor"]
    if executor not in EXECUTORS[kind]:
        raise where.error(f"executor must be {' or '.join(EXECUTORS[kind])} for {_a(kind)} target, "
                          f"got {json.dumps(executor)}")
    description = _string(where, "description", data["description"])
    tile = data["tile"]
    if not (isinstance(tile, list) and len(tile) == 2 and all(
            isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tile)):
        raise where.error(f"tile must be two positive integers [rows, cols], got {json.dumps(tile)}")
    pipelines = {}
    for key in ("pipeline", "lowering"):
        text = data[key]
        if not isinstance(text, str):
            raise where.error(f"{key} must be a string of passes, got {_type_name(text)}")
        _check_pipeline(where, key, text)
        pipelines[key] = text
    formats = data.get("formats")
    if formats is not None:
        if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
            raise where.error(f"formats must be a non-empty list of encoding names or null, got {json.dumps(formats)}")
        for f in formats:
            if f not in ENCODINGS:
                raise where.error(f"formats: unknown encoding '{f}' (known: {', '.join(ENCODINGS)})")
        formats = tuple(formats)
    work_cost = _number(where, "work_cost", data.get("work_cost", 0.0), positive=False)
    measured = data.get("measured", False)
    if not isinstance(measured, bool):
        raise where.error(f"measured must be true or false, got {json.dumps(measured)}")

    fields_ = dict(name=name, kind=kind, backend=backend, executor=executor, description=description,
                   tile=tuple(tile), formats=formats, work_cost=work_cost, measured=measured, **pipelines)
    if kind != "fpga":
        device = data["device"]
        _check_fields(where, device, "device.", DEVICE_FIELDS)
        fields_["figures"] = {k: _number(where, f"device.{k}", device[k], positive=k in _POSITIVE_FIGURES)
                              for k in DEVICE_FIELDS}
        return Target(**fields_)
    part = _parse_part(where, data["part"])
    accel = _parse_accel(where, data["accel"])
    try:
        part.check_fits(accel.estimate_resources(), f"the {accel.rows}x{accel.cols} accelerator")
        part.check_dma(accel)
    except TccError as e:
        raise where.error(f"accel: {e}") from None
    synthesis = data.get("synthesis")
    if synthesis is not None:
        _check_fields(where, synthesis, "synthesis.", SYNTHESIS_FIELDS)
        for k in SYNTHESIS_FIELDS:
            _number(where, f"synthesis.{k}", synthesis[k], positive=False)
        synthesis = dict(synthesis)
    return Target(**fields_, part=part, accel=accel, synthesis=synthesis)


def _check_pipeline(where: _Where, key: str, text: str) -> None:
    try:
        parsed_pipeline(text)
    except TccError as e:
        message = str(e)
        raise where.error(f"{key} {message[len('pipeline '):]}" if message.startswith("pipeline column ")
                          else f"{key}: {message}") from None


def _parse_part(where: _Where, data: Any) -> Part:
    _check_fields(where, data, "part.", PART_FIELDS)
    name = _string(where, "part.name", data["name"])
    family = data["family"]
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise where.error(f"part.family must be a Xilinx family ({', '.join(sorted(FAMILIES))}), "
                          f"got {json.dumps(family)}")
    counts = {k: _integer(where, f"part.{k}", data[k]) for k in ("lut", "ff", "dsp", "bram36")}
    counts["uram"] = _integer(where, "part.uram", data["uram"], minimum=0)
    figures = {k: _number(where, f"part.{k}", data[k], positive=True)
               for k in ("dram_gbps", "price_usd", "power_w", "static_w", "process_nm", "link_gbps")}
    figures["link_latency_us"] = _number(where, "part.link_latency_us", data["link_latency_us"], positive=False)
    host = _string(where, "part.host", data["host"])
    return Part(name=name, family=family, host=host, **counts, **figures)


def _parse_accel(where: _Where, data: Any) -> AccelConfig:
    names = {f.name: f for f in fields(AccelConfig)}
    _check_fields(where, data, "accel.", (), tuple(names))
    for key, value in data.items():  # AccelConfig takes floats where it means integers: the catalog does not
        if names[key].type in ("int", int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise where.error(f"accel.{key} must be an integer, got {json.dumps(value)}")
    try:
        return AccelConfig.from_json(data)
    except (ValueError, TypeError) as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        raise where.error(f"accel.{message}" if field in names else f"accel: {message}") from None


def _check_hosts(catalog: dict[str, Target], files: dict[str, str]) -> None:
    """Every FPGA's part names, as its host, a cpu or gpu target of the catalog."""
    for target in catalog.values():
        if target.part is None:
            continue
        host = catalog.get(target.part.host)
        where = _Where(files[target.name], target.name)
        if host is None:
            close = difflib.get_close_matches(target.part.host, catalog, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(catalog)})"
            raise where.error(f"part.host names unknown target '{target.part.host}'{hint}")
        if host.kind == "fpga":
            raise where.error(f"part.host must name a cpu or gpu target, '{host.name}' is an fpga")


def _read_text(path: Path, label: str) -> str:
    """The text of a targets file: a regular file (a FIFO or /dev/zero would block or never
    end) of at most `MAX_FILE_BYTES`, read without ever reading more."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TccError(f"{label}: not a regular file (a directory, FIFO or device); expected a JSON targets "
                               "file")
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise TccError(f"{label}: no such targets file") from None
    except OSError as e:
        raise TccError(f"{label}: cannot read targets file ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise TccError(f"{label}: larger than {MAX_FILE_BYTES:,} bytes; not a targets file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TccError(f"{label}: not a JSON targets file (not UTF-8 text)") from None


def _read_json(path: Path, label: str, text: str | None = None) -> Any:
    if text is None:
        text = _read_text(path, label)
    if not text.strip():
        raise TccError(f"{label}: empty file; expected a JSON object of targets by name")

    def pairs(items: list[tuple[str, Any]]) -> dict:
        out = {}
        for key, value in items:
            if key in out:
                raise TccError(f"{label}: duplicate key '{key}'")
            out[key] = value
        return out
    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise TccError(f"{label}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except RecursionError:
        raise TccError(f"{label}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise TccError(f"{label}: the top level must be a JSON object of targets by name, got {_type_name(data)}")
    if not data:
        raise TccError(f"{label}: defines no targets")
    return data


def _parse_file(data: dict, label: str) -> dict[str, Target]:
    return {name: _parse_target(label, name, fields_) for name, fields_ in data.items()}


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[dict[str, Target], dict[str, str]]:
    """The shipped catalog, parsed and validated once per process."""
    label = f"tcc/targets/{SHIPPED}"
    data = _read_json(Path(label), label, resources.files(__package__).joinpath(SHIPPED).read_text())
    catalog = _parse_file(data, label)
    files = {name: label for name in catalog}
    _check_hosts(catalog, files)
    return catalog, files


def load_catalog(extra: str | Path | None = None) -> dict[str, Target]:
    """The targets by name: the shipped catalog, plus (replacing shipped targets of the same
    name) those of the JSON file `extra`. Errors are one-line `TccError`s naming the file, the
    target and the field."""
    shipped, shipped_files = _shipped()
    if extra is None:
        return dict(shipped)
    label = str(extra)
    user = _parse_file(_read_json(Path(extra), label), label)
    catalog = {**shipped, **user}
    _check_hosts(catalog, {**shipped_files, **{name: label for name in user}})
    return catalog


def get_target(name: str, targets_file: str | Path | None = None) -> Target:
    catalog = load_catalog(targets_file)
    if name not in catalog:
        close = difflib.get_close_matches(name, catalog, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(catalog)})"
        raise TccError(f"unknown target '{name}'{hint}")
    return catalog[name]

