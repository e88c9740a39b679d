"""Element types of the IR, as a closed enum with their storage and numeric properties."""

from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    """An element type. `b1` holds the values +1/-1 (binarized weights); `bool` holds truth values."""

    F64 = "f64"
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I64 = "i64"
    I32 = "i32"
    I16 = "i16"
    I8 = "i8"
    I4 = "i4"
    B1 = "b1"
    BOOL = "bool"

    def __str__(self) -> str:
        return self.value

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.F64, DType.F32, DType.F16, DType.BF16)

    @property
    def is_int(self) -> bool:
        return self in (DType.I64, DType.I32, DType.I16, DType.I8, DType.I4, DType.B1)

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype arrays of this type are held in (bf16 in float32, i4 and b1 in int8)."""
        return np.dtype(_NUMPY[self])

    @property
    def value_range(self) -> tuple[int, int] | None:
        """Inclusive range of representable values of integer types; None for float and bool."""
        if self is DType.B1:
            return (-1, 1)
        if self.is_int:
            return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1)
        return None

    @classmethod
    def parse(cls, text: str) -> "DType":
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unknown dtype '{text}' (known: {', '.join(d.value for d in cls)})") from None

    @classmethod
    def from_numpy(cls, dtype: np.dtype) -> "DType":
        dtype = np.dtype(dtype)
        for candidate in (cls.F64, cls.F32, cls.F16, cls.I64, cls.I32, cls.I16, cls.I8, cls.BOOL):
            if candidate.numpy == dtype:
                return candidate
        raise ValueError(f"no IR dtype for numpy dtype {dtype}")


_BITS = {
    DType.F64: 64, DType.F32: 32, DType.F16: 16, DType.BF16: 16, DType.I64: 64, DType.I32: 32,
    DType.I16: 16, DType.I8: 8, DType.I4: 4, DType.B1: 1, DType.BOOL: 8,
}
_NUMPY = {
    DType.F64: "float64", DType.F32: "float32", DType.F16: "float16", DType.BF16: "float32", DType.I64: "int64",
    DType.I32: "int32", DType.I16: "int16", DType.I8: "int8", DType.I4: "int8", DType.B1: "int8",
    DType.BOOL: "bool",
}


def promote(a: DType, b: DType) -> DType:
    """The common type of two operands, following torch's promotion for same-kind tensors."""
    if a is b:
        return a
    if a is DType.BOOL:
        return b
    if b is DType.BOOL:
        return a
    if a.is_float != b.is_float:
        return a if a.is_float else b
    return a if a.bits >= b.bits else b
