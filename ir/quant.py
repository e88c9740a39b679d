"""Quantization parameters held in `TensorType.quant`: real = scale * (q - zero_point)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    scale: float
    zero_point: int = 0

    def __str__(self) -> str:
        return f"!q(scale={self.scale!r}, zp={self.zero_point})"


@dataclass(frozen=True)
class PerChannel:
    axis: int
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.scales) != len(self.zero_points):
            raise ValueError("per-channel quantization needs one zero point per scale")

    def __str__(self) -> str:
        scales = ", ".join(repr(s) for s in self.scales)
        zps = ", ".join(str(z) for z in self.zero_points)
        return f"!q(axis={self.axis}, scales=[{scales}], zps=[{zps}])"


Quant = PerTensor | PerChannel
