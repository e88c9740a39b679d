"""Pipelines as text: `name{key=value,...}` joined by commas, e.g.
`fold-constants,dce,hp-prune{block=16x16,sparsity=0.75},quantize{bits=8}`.

Option values are parsed by the option's annotation (`tcc.passes.options`). `format_pipeline`
prints a list of passes back to the same text.
"""

from __future__ import annotations

import re
import typing
from dataclasses import Field
from typing import Any, Mapping, Sequence

from tcc.ir.errors import TccError

from .base import OptionError, Pass
from .options import describe_type, format_value, parse_value, suggest
from .registry import PASSES


class PipelineError(TccError):
    """A pipeline spec that does not parse, names an unknown pass or option, or gives a bad value."""


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
    registry = PASSES if registry is None else registry
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
            raise PipelineError(f"{where}: unknown pass '{name}'{suggest(name, sorted(registry))}")
        cls = registry[name]
        fields: dict[str, Field] = {f.name: f for f in cls.options()}
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in (body.split(",") if body and body.strip() else []):
            key, eq, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or not key:
                raise PipelineError(f"{where}: {name}: '{item.strip()}' is not key=value")
            if key not in fields:
                raise PipelineError(f"{where}: {name}: unknown option '{key}'{suggest(key, list(fields))}")
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
        hints = typing.get_type_hints(cls)
        out.append({"name": name, "summary": cls.summary, "options": [
            {"name": f.name, "type": describe_type(hints[f.name]),
             "range": str(f.metadata["range"]) if "range" in f.metadata else None,
             "default": format_value(f.default), "help": f.metadata.get("help", "")} for f in cls.options()]})
    return out
