"""Integer-only nonlinearities (`int-nonlinear`, I-BERT style): the error of each int op
against fp32 on realistic input ranges, and the digits Transformer's accuracy fp32 vs int8
linears (`quantize`) vs fully integer encoder layers (`quantize,int-nonlinear`).

    .venv/bin/python benchmarks/nonlinear.py [--seeds 3]

Op errors are over deterministic inputs (seeded), in real units, after the op's own output
quantization (that step is printed beside it):
- int_softmax: rows of 128 attention logits ~ N(0, sigma), as the i32 accumulator of i8 q.k^T
  (scale (4/127)^2/4), probabilities in 7 bits (i8), 8 bits and 15 bits (i16);
- int_gelu: every i8 input over [-r, r], output i8 at the output's range (and i16 at a fine
  step, which leaves the i-erf polynomial's own error);
- int_layer_norm: 1000 residual-stream rows (offsets, spreads 0.3-4, three outlier channels)
  in i16, output i8 (and i16) at the output's range.
Digits: each seed trains the model once (`tcc.zoo.train_digits`, 30 epochs, one thread),
compiles the three pipelines with the training set as calibration data and evaluates on the
held-out 450 images; the table shows medians over seeds 0..SEEDS-1 (about 10 s per seed).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from scipy import special

import tcc
from tcc.evaluate import evaluate
from tcc.ir import REFERENCE, DType
from tcc.passes import Dataset
from tcc.passes.int_nonlinear import gelu_attrs, layer_norm_params, softmax_attrs
from tcc.zoo import digits_data, residual_stream, train_digits

PIPELINES = {"fp32": None, "int8 linears": "quantize", "fully integer": "quantize,int-nonlinear"}


def softmax_rows() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(0)
    scale = (4 / 127) ** 2 / 4
    out = []
    for bits in (7, 8, 15):
        for sigma in (1.0, 3.0, 6.0):
            x = np.rint(rng.normal(0, sigma, (1000, 128)) / scale).astype(np.int32)
            real = x * scale
            want = np.exp(real - real.max(-1, keepdims=True))
            want /= want.sum(-1, keepdims=True)
            got = REFERENCE["int_softmax"](x, **softmax_attrs(scale, bits)) / 2 ** bits
            out.append((f"int_softmax  logits N(0, {sigma:g}), {bits}-bit probabilities", got - want, 2.0 ** -bits))
    return out


def gelu_rows() -> list[tuple[str, np.ndarray, float]]:
    x = np.arange(-128, 128).astype(np.int8)
    out = []
    for limit in (2.0, 6.0, 10.0):
        scale = limit / 127
        real = x * scale
        want = 0.5 * real * (1 + special.erf(real / math.sqrt(2)))
        for dtype in (DType.I8, DType.I16):
            step = np.abs(want).max() / dtype.value_range[1]
            got = REFERENCE["int_gelu"](x, **gelu_attrs(scale, DType.I8, step, dtype)) * step
            out.append((f"int_gelu     i8 over [-{limit:g}, {limit:g}] -> {dtype}", got - want, step))
    return out


def layer_norm_rows() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (64, 768):
        x, scale = residual_stream(1000, n, rng)
        gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n)
        want = REFERENCE["layer_norm"](x * scale, gamma, beta, normalized_shape=(n,), eps=1e-5)
        for dtype in (DType.I8, DType.I16):
            step = np.abs(want).max() / dtype.value_range[1]
            w, b, attrs = layer_norm_params(scale, DType.I16, gamma, beta, 1e-5, step, dtype)
            got = REFERENCE["int_layer_norm"](x, w, b, **attrs) * step
            out.append((f"int_layer_norm  N={n}, i16 -> {dtype}", got - want, step))
    return out


def digits(seeds: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits_data()
    train, test = Dataset((x_train,), y_train, "train"), Dataset((x_test,), y_test, "test")
    accuracy: dict[str, list[float]] = {label: [] for label in PIPELINES}
    for seed in range(seeds):
        model = train_digits(x_train, y_train, seed=seed)
        for label, spec in PIPELINES.items():
            artifact = tcc.compile(model, (x_train[:64],), pipeline=spec, train_data=train, seed=seed)
            accuracy[label].append(evaluate(artifact, test)["accuracy"])
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="digits seeds 0..SEEDS-1 (default 3)")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{'op and inputs':58s} {'max |err|':>10s} {'mean |err|':>11s} {'out step':>9s}")
    for label, error, step in softmax_rows() + gelu_rows() + layer_norm_rows():
        print(f"{label:58s} {np.abs(error).max():10.5f} {np.abs(error).mean():11.2e} {step:9.5f}")
    accuracy = digits(args.seeds)
    print(f"\ndigits test accuracy (450 images; median of seeds 0-{args.seeds - 1}; per seed in brackets)")
    fp32 = statistics.median(accuracy["fp32"])
    for label, values in accuracy.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {label:14s} {median:.3f} ({100 * (median - fp32):+.1f} pt)  [{runs}]")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
