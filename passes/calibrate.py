"""Activation ranges for quantization: run the float graph on data through the torch
executor with observers on chosen values, and return each value's range (max |v|, or a
percentile of |v|). Only the real rows of a padded last batch are counted; a decoder's step
runs along the data's sequences (`first_output`), so its ranges cover a filling cache."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph

from .base import PassContext
from .data import batch_size_of, first_output


class Observer(nn.Module):
    """Identity on a value that records |v| over the real examples of each batch: the running
    max and mean, and with `keep` all values (for percentiles); and the least value, signed
    (`low`). A leading dim that is a multiple of the batch size is taken as batch-major (e.g.
    [B*S, H])."""

    def __init__(self, batch: int, keep: bool):
        super().__init__()
        self.batch, self.keep = batch, keep
        self.valid = batch
        self.amax = 0.0
        self.low = math.inf  # the least value seen (signed)
        self.total, self.count = 0.0, 0
        self.values: list[np.ndarray] = []

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        d = v.detach().float()
        if d.dim() and d.shape[0] % self.batch == 0:
            d = d[:d.shape[0] // self.batch * self.valid]
        a = d.abs()
        if a.numel():
            self.amax = max(self.amax, float(a.max()))
            self.low = min(self.low, float(d.min()))
            self.total, self.count = self.total + float(a.sum()), self.count + a.numel()
            if self.keep:
                self.values.append(a.cpu().numpy().reshape(-1))
        return v

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def range(self, percentile: float | None) -> float:
        if percentile is not None and self.values:
            return float(np.percentile(np.concatenate(self.values), percentile))
        return self.amax


def symmetric_scale(observer: Observer, qmax: int, percentile: float | None = None) -> float:
    """The symmetric per-tensor scale of an observed value: its range over `qmax` (1 when all zero)."""
    r = observer.range(percentile)
    return r / qmax if r > 0 else 1.0


def observe(graph: Graph, ctx: PassContext, values: set[str], *, pass_name: str,
            percentile: float | None = None, may_be_zero: frozenset[str] = frozenset()) -> dict[str, Observer]:
    """Observers of `values` after running the graph over the calibration data: the `calib`
    dataset, else `train`, else the example inputs. Notes which one it used. `percentile`
    keeps every value so that `Observer.range(percentile)` can be asked for. A value the data
    leaves non-finite or all zero is an error: it has no range to take a scale from, and a
    guessed one would quantize real activations to garbage (or all to zero: a constant model);
    except for `may_be_zero`, whose caller has another range to fall back on."""
    name, data = ctx.dataset("calib", "train", "example")
    if data is None:
        raise TccError(f"{pass_name} needs calibration data: give --calib-data or --train-data")
    data = data.fit(graph, "calibration data")
    batch = batch_size_of(graph)
    observers = {v: Observer(batch, percentile is not None) for v in sorted(values)}
    module = ctx.require_torch(pass_name)(graph, ctx.device, activation_transforms=observers)
    with torch.no_grad():
        for b in data.batches(batch):
            for o in observers.values():
                o.valid = b.valid
            first_output(graph, b.inputs, lambda xs: module(*(x.to(ctx.device) for x in xs)))
    ctx.note(f"calibrated on {data.source} ({len(data)} examples, "
             f"{'minmax' if percentile is None else f'percentile {percentile}'})")
    for v, o in observers.items():
        if not math.isfinite(o.amax):
            raise TccError(f"{pass_name}: calibration saw non-finite values in %{v}")
        if o.count and o.amax == 0 and v not in may_be_zero:
            raise TccError(f"{pass_name}: calibration on {data.source} saw only zeros in %{v}: no range to take its "
                           "scale from (calibrate on data that exercises it: --calib-data)")
    return observers
