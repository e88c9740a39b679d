"""`TensorType`: shape, element type, storage encoding and quantization of a value."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import DType
from .encoding import DENSE, Encoding
from .quant import PerChannel, PerTensor, Quant
from .sparsity import Sparsity


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: DType
    encoding: Encoding = DENSE
    quant: Quant | None = None
    sparsity: Sparsity | None = None

    def __post_init__(self) -> None:
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape {self.shape} must hold non-negative integers")
        if self.sparsity is not None and len(self.shape) != 2:
            raise ValueError(f"sparsity structure {self.sparsity} needs a rank-2 tensor, got shape {list(self.shape)}")
        if isinstance(self.quant, PerChannel):
            axis = self.quant.axis
            if not -len(self.shape) <= axis < len(self.shape) or len(self.quant.scales) != self.shape[axis]:
                raise ValueError(f"per-channel quantization on axis {axis} does not fit shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_bytes(self) -> int:
        return (self.numel * self.dtype.bits + 7) // 8

    def with_shape(self, shape: tuple[int, ...]) -> "TensorType":
        """Same element type with a new shape: dense, no sparsity structure; per-tensor
        quantization carries over, per-channel does not (its axis need not survive a layout change)."""
        return TensorType(tuple(shape), self.dtype, quant=self.quant if isinstance(self.quant, PerTensor) else None)

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(map(str, self.shape))}]"
        if self.encoding != DENSE:
            text += f" {self.encoding}"
        if self.sparsity is not None:
            text += f" {self.sparsity}"
        if self.quant is not None:
            text += f" {self.quant}"
        return text


def tensor(shape, dtype: DType = DType.F32) -> TensorType:
    """Shorthand for a dense, unquantized tensor type."""
    return TensorType(tuple(int(d) for d in shape), dtype)
