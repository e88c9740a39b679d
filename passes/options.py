"""The types of pass options and how they read as text: int, float, bool (true/false), str, a
`Literal[...]` choice, `Shape2` (`16x16`), `Ratio` (`2:4`), `Latency` (`10ms`), or any of these
`| None` (`none`). Pass modules declare their options with these; `tcc.passes.pipeline` parses
pipelines with them."""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin


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


def suggest(word: str, candidates: Sequence[str]) -> str:
    """`; did you mean 'X'?` for the candidate closest to `word`, else the list of candidates."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(candidates) or 'none'})"


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
        raise ValueError(f"expects one of {', '.join(args)}{suggest(text, args) if args else ''}")
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
