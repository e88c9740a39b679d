"""Writes the bad-input corpus beside this file (see README.md). Run from the repository root:

    .venv/bin/python tests/bad_inputs/make_corpus.py

The files are committed; this script documents how they were made and remakes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
MARKER = "PICKLE_PAYLOAD_RAN"  # the file the pickle's payload creates (in the working directory) when loaded


class Tiny(nn.Module):
    """The smallest model worth compiling: one linear layer and a ReLU on a 1x8x8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class Cumsum(nn.Module):
    """A model using an op tcc has no converter for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=-1)


class Payload:
    """Unpickling this object opens (creates) `MARKER`: code from the file running."""

    def __reduce__(self):
        return open, (MARKER, "w")


def tiny(poison: float | None = None) -> Tiny:
    """`Tiny` with fixed weights; `poison` (NaN, Inf) written into weight [1, 2]."""
    torch.manual_seed(0)
    model = Tiny().eval()
    if poison is not None:
        with torch.no_grad():
            model.fc.weight[1, 2] = poison
    return model


def main() -> None:
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, model in (("tiny", tiny()), ("nan_weights", tiny(float("nan"))), ("inf_weights", tiny(float("inf"))),
                        ("cumsum", Cumsum())):
        torch.export.save(torch.export.export(model, (x,)), HERE / f"{name}.pt2")
    torch.jit.script(tiny()).save(str(HERE / "scripted.pt"))
    good = (HERE / "tiny.pt2").read_bytes()
    (HERE / "truncated.pt2").write_bytes(good[:len(good) // 2])
    rng = np.random.default_rng(0)
    (HERE / "random.pt2").write_bytes(rng.bytes(1024))
    (HERE / "random.pt").write_bytes(rng.bytes(1024))
    (HERE / "empty.pt2").write_bytes(b"")
    torch.save(Payload(), HERE / "pickle_payload.pt")
    images, labels = torch.rand(4, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.save({"inputs": images.long(), "labels": labels}, HERE / "data_int_inputs.pt")
    torch.save({"inputs": images, "labels": labels.float()}, HERE / "data_float_labels.pt")
    torch.save({"inputs": images.bool(), "labels": labels}, HERE / "data_bool_inputs.pt")
    np.save(HERE / "input_int32.npy", np.zeros((1, 8, 8), np.int32))


if __name__ == "__main__":
    main()
