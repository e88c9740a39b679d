"""The select-device pass on its own: candidates with stub cost models, golden log lines,
the accuracy gate, its errors, idempotence and the `Latency` option type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tcc.ir import DType, GraphBuilder, TccError, TensorType
from tcc.passes import Dataset, Latency, PassContext, SelectDevice, format_pipeline, parse_pipeline
from tcc.passes.cost_model import Candidate, Cost
from tcc.runtime.torch_executor import TorchExecutor


def graph():
    b = GraphBuilder("g")
    x = b.input("x", TensorType((4, 3), DType.F32))
    return b.finish([b.op("relu", x)])


def candidate(name: str, price: float, ms: float) -> Candidate:
    return Candidate(name, price, lambda g: Cost(name, ms / 1e3, 0.0))


DEVICES = (candidate("big", 9000, 0.1), candidate("small", 50, 12.0), candidate("mid", 400, 2.0))


@pytest.mark.parametrize("lc, chosen, line, measured", [
    ("20ms", "small", "chose small ($50, within lc=20ms)", "chose small at 12 ms"),
    ("5ms", "mid", "chose mid ($400, within lc=5ms)", "chose mid at 2 ms"),
    ("100us", "big", "chose big ($9,000, within lc=0.1ms)", "chose big at 0.1 ms"),
])
def test_the_cheapest_device_within_the_latency_constraint(lc, chosen, line, measured):
    """The choice in the log; the latencies, which depend on the machine's measurement, apart."""
    ctx = PassContext(devices=DEVICES)
    g = graph()
    out = parse_pipeline(f"select-device{{lc={lc}}}")[0](g, ctx)
    assert out is g and ctx.chosen_device == chosen and ctx.log == [f"select-device: no change; {line}"]
    assert ctx.measured == [f"select-device: {measured}; small 12 ms, mid 2 ms, big 0.1 ms"]


def test_idempotent():
    ctx = PassContext(devices=DEVICES)
    once = SelectDevice(lc=Latency(5.0))(graph(), ctx)
    twice = SelectDevice(lc=Latency(5.0))(once, ctx)
    assert twice is once and ctx.chosen_device == "mid" and ctx.log[0] == ctx.log[1]


def test_accuracy_gates_every_device():
    """Top-1 on the eval data: the graph passes its input through, so the labels set it."""
    x = torch.tensor([[3.0, 1, 0], [0, 2, 1], [1, 0, 5], [4, 0, 1], [0, 9, 1], [2, 1, 0]])
    labels = torch.tensor([0, 1, 2, 0, 1, 1])  # 5 of 6 right; 6 examples on a graph of batch 4
    ctx = PassContext(devices=DEVICES, torch_module=TorchExecutor, data={"eval": Dataset((x,), labels, "eval.pt")})
    SelectDevice(lc=Latency(20.0), ac=0.8)(graph(), ctx)
    assert ctx.chosen_device == "small" and ctx.log[-1].startswith("select-device: no change; accuracy 0.8333 on "
                                                                   "eval.pt; chose small")
    with pytest.raises(TccError, match=r"^select-device: accuracy 0.8333 on eval.pt is below ac=0.9 on every device"):
        SelectDevice(lc=Latency(20.0), ac=0.9)(graph(), ctx)


@pytest.mark.parametrize("ctx, make, message", [
    (PassContext(devices=DEVICES), lambda: SelectDevice(lc=Latency(0.01)),
     "select-device: no device runs the graph within lc=0.01ms; the fastest, big, takes 0.1 ms"),
    (PassContext(), lambda: SelectDevice(lc=Latency(1.0)), "select-device: no candidate devices"),
    (PassContext(devices=DEVICES), lambda: SelectDevice(lc=Latency(1.0), ac=0.5),
     "select-device: ac=0.5 needs labelled evaluation data"),
    (PassContext(devices=DEVICES, data={"eval": Dataset((torch.zeros(2, 3),), None, "u.pt")},
                 torch_module=TorchExecutor), lambda: SelectDevice(lc=Latency(20.0), ac=0.5),
     "u.pt \\(evaluation data\\): has no labels"),
    (PassContext(devices=DEVICES, data={"eval": Dataset((torch.zeros(2, 5),), torch.zeros(2), "w.pt")},
                 torch_module=TorchExecutor), lambda: SelectDevice(lc=Latency(20.0), ac=0.5),
     "w.pt \\(evaluation data\\): input 'x' examples have shape \\[5\\], the model expects \\[3\\]"),
    (PassContext(), lambda: SelectDevice(), "select-device: option 'lc' is required"),
    (PassContext(), lambda: SelectDevice(lc=Latency(1.0), ac=1.5), "select-device: option 'ac' must be in \\[0, 1\\]"),
])
def test_errors_name_the_problem(ctx, make, message):
    with pytest.raises(TccError, match=message):
        make()(graph(), ctx)


@given(ms=st.floats(min_value=1e-6, max_value=1e9, allow_nan=False),
       unit=st.sampled_from([("us", 1e-3), ("ms", 1.0), ("s", 1e3)]))
def test_latency_option_round_trips(ms, unit):
    written = format_pipeline([SelectDevice(lc=Latency(ms))])
    assert parse_pipeline(written) == [SelectDevice(lc=Latency(ms))]
    text, scale = unit
    assert Latency.parse(f"{ms!r}{text}") == pytest.approx(ms * scale, rel=1e-12)


def test_unit_less_or_non_positive_latencies_are_refused():
    for text in ("10", "0ms", "-1s", "infms", "fast"):
        with pytest.raises(ValueError, match="expects a"):
            Latency.parse(text)
    assert np.isclose(Latency.parse(" 2.5 s "), 2500.0)
