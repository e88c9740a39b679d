"""Storage encodings of tensors: typed values held in `TensorType.encoding`.

Only `Dense` exists so far; sparse encodings (CSR, BSR, HP, NM, Bitmap, Packed1b) join this
registry as subclasses with their own text form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Encoding:
    """Base of every encoding. `keyword` is the text form's name (`#keyword(params)`)."""

    keyword: ClassVar[str]

    def params(self) -> tuple[int, ...]:
        return ()

    def __str__(self) -> str:
        params = self.params()
        return f"#{self.keyword}" + (f"({', '.join(map(str, params))})" if params else "")


@dataclass(frozen=True)
class Dense(Encoding):
    """Every element stored, row-major."""

    keyword: ClassVar[str] = "dense"


DENSE = Dense()

ENCODINGS: dict[str, type[Encoding]] = {cls.keyword: cls for cls in (Dense,)}


def make_keyword_value(registry: dict[str, type], what: str, sigil: str, keyword: str, params: tuple[int, ...]):
    """Build `registry[keyword](*params)` for the text form `<sigil>keyword(params)`;
    ValueError naming the problem otherwise."""
    if keyword not in registry:
        raise ValueError(f"unknown {what} '{sigil}{keyword}' (known: {', '.join(sorted(registry))})")
    try:
        return registry[keyword](*params)
    except TypeError:
        raise ValueError(f"{what} '{sigil}{keyword}' does not take parameters {params}") from None


def make_encoding(keyword: str, params: tuple[int, ...]) -> Encoding:
    """Build an encoding from its text form's keyword and integer parameters."""
    return make_keyword_value(ENCODINGS, "encoding", "#", keyword, params)
