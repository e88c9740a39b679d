"""Pipelines as text: `name{key=value,...}` joined by commas, e.g.
`fold-constants,dce,hp-prune{block=16x16,sparsity=0.75},quantize{bits=8}`.

Option values are parsed by the option's annotation: int, float, bool (true/false), str,
a `Literal[...]` choice, `Shape2` (`16x16`), `Ratio` (`2:4`), `Latency` (`10ms`), or any of these `| None`
(`none`). `format_pipeline` prints a list of passes back to the same text.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import Field
from typing import Any, Literal, Mapping, Sequence, get_args, get_origin

from tcc.ir.errors import TccError

from .base import OptionError, Pass


class PipelineError(TccError):
    """A pipeline spec that does not parse, names an unknown pass or option, or gives a bad value."""


class _IntPair(tuple):
    """A pair of positive integers written with a separator (`sep`)."""

    sep: str = ""
    description: str = ""

    def __new__(cls, first: int, second: int):
        return super().__new__(cls, (int(first), int(second)))

    def __str__(self) -> str:
        return f"{self[0]}{self.sep}{self[1]}"

    @classmethod
    def parse(cls, text: str) -> "_IntPair":
        match = re.fullmatch(rf"(\d+){re.escape(cls.sep)}(\d+)", text)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            raise ValueError(f"expects {cls.description} with positive integers")
        return cls(int(match[1]), int(match[2]))


class Shape2(_IntPair):
    """A block or tile shape, written `RxC`."""

    sep, description = "x", "RxC"


class Ratio(_IntPair):
    """N of every M kept, written `N:M`."""

    sep, description = ":", "N:M"


class Latency(float):
    """A duration in milliseconds, written with its unit: `10ms`, `2.5s`, `800us`."""

    description = "LATENCY (10ms, 2.5s, 800us)"
    _UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}

    def __str__(self) -> str:
        short = f"{float(self):g}"
        return f"{short if float(short) == self else repr(float(self))}ms"

    @classmethod
    def parse(cls, text: str) -> "Latency":
        raw = text.strip()
        for unit in sorted(cls._UNITS, key=len, reverse=True):
            if raw.endswith(unit):
                try:
                    value = float(raw[:-len(unit)].strip())
                except ValueError:
                    break
                if not math.isfinite(value) or value <= 0:
                    raise ValueError("expects a positive latency")
                return cls(value * cls._UNITS[unit])
        raise ValueError("expects a latency with a unit (e.g. 10ms, 2.5s, 800us)")


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(candidates) or 'none'})"


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(annotation: Any) -> str:
    """How an option's type reads in `tcc passes`."""
    args = get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(describe_type(a) for a in inner) + " | none"
    if get_origin(annotation) is Literal:
        return "|".join(map(str, args))
    if isinstance(annotation, type) and issubclass(annotation, (_IntPair, Latency)):
        return annotation.description
    return getattr(annotation, "__name__", str(annotation))


def parse_value(annotation: Any, text: str) -> Any:
    """Parse `text` as a value of `annotation`; raise ValueError saying what was expected."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return parse_value(inner[0], text)
        for arg in inner:
            try:
                return parse_value(arg, text)
            except ValueError:
                continue
        raise ValueError(f"expects {describe_type(annotation)}")
    if origin is Literal:
        if text in args:
            return text
        raise ValueError(f"expects one of {', '.join(args)}{_suggest(text, args) if args else ''}")
    if annotation is bool:
        if text in ("true", "false"):
            return text == "true"
        raise ValueError("expects true or false")
    if annotation is int:
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        raise ValueError("expects an integer")
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expects a number") from None
    if isinstance(annotation, type) and issubclass(annotation, (_IntPair, Latency)):
        return annotation.parse(text)
    if annotation is str:
        return text
    raise ValueError(f"has an unsupported option type {annotation}")


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _split_top(text: str) -> list[tuple[int, str]]:
    """Split at commas outside braces; return (column, piece) pairs."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise PipelineError(f"pipeline column {i + 1}: nested '{{'")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline column {i + 1}: '}}' without '{{'")
        elif ch == "," and depth == 0:
            pieces.append((start, text[start:i]))
            start = i + 1
    if depth:
        raise PipelineError(f"pipeline column {len(text)}: missing '}}'")
    pieces.append((start, text[start:]))
    return pieces


_PIECE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?\s*")


def parse_pipeline(text: str, registry: Mapping[str, type[Pass]] | None = None) -> list[Pass]:
    """Parse a pipeline spec into pass instances. Errors name the column, the pass and the
    option, and suggest the nearest known name."""
    if registry is None:
        from . import PASSES
        registry = PASSES
    if not text.strip():
        return []
    passes = []
    for column, piece in _split_top(text):
        where = f"pipeline column {column + 1}"
        match = _PIECE.fullmatch(piece)
        if not match:
            raise PipelineError(f"{where}: cannot read '{piece.strip()}' (expected name or name{{key=value,...}})")
        name, body = match[1], match[2]
        if name not in registry:
            raise PipelineError(f"{where}: unknown pass '{name}'{_suggest(name, sorted(registry))}")
        cls = registry[name]
        fields: dict[str, Field] = {f.name: f for f in cls.options()}
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for item in (body.split(",") if body and body.strip() else []):
            key, eq, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or not key:
                raise PipelineError(f"{where}: {name}: '{item.strip()}' is not key=value")
            if key not in fields:
                raise PipelineError(f"{where}: {name}: unknown option '{key}'{_suggest(key, list(fields))}")
            if key in values:
                raise PipelineError(f"{where}: {name}: option '{key}' given twice")
            try:
                values[key] = parse_value(hints[key], raw)
            except ValueError as e:
                raise PipelineError(f"{where}: {name}: option '{key}' is '{raw}' but {e}") from None
        try:
            passes.append(cls(**values))
        except OptionError as e:
            raise PipelineError(f"{where}: {e}") from None
    return passes


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The text spec of `passes` (options at their defaults left out); parses back equal."""
    parts = []
    for p in passes:
        changed = p.changed_options()
        body = ",".join(f"{k}={format_value(v)}" for k, v in changed.items())
        parts.append(p.name + (f"{{{body}}}" if body else ""))
    return ",".join(parts)


def describe_passes(registry: Mapping[str, type[Pass]]) -> list[dict[str, Any]]:
    """Every pass with its summary and options (name, type, range or null, default, help), for
    `tcc passes`."""
    out = []
    for name, cls in registry.items():
        hints = _type_hints(cls)
        out.append({"name": name, "summary": cls.summary, "options": [
            {"name": f.name, "type": describe_type(hints[f.name]),
             "range": str(f.metadata["range"]) if "range" in f.metadata else None,
             "default": format_value(f.default), "help": f.metadata.get("help", "")} for f in cls.options()]})
    return out
