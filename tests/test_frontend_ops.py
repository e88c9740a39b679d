"""The frontend's converters of single torch ops (glu, index_select, repeat, repeat_interleave, roll,
pad, adaptive average pooling, argmax, grouped-query attention, convolutions, batch / group / RMS
norm, silu): small modules through both frontends match eager, lower to the IR ops named, and
their unsupported variants stop with a one-line TccError that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tcc

EAGER = {"rtol": 1e-5, "atol": 1e-5}  # tcc's fp32 against PyTorch eager (another summation order)
FRONTENDS = ["export", "fx"]


def _compiled(model, inputs, frontend, **options):
    """The artifact of `model` (in eval mode) on `inputs`, checked against eager; its op kinds."""
    model = model.eval()
    artifact = tcc.compile(model, inputs, frontend=frontend, **options)
    with torch.no_grad():
        expected = model(*inputs)
    got = artifact.run(inputs)
    torch.testing.assert_close(got, expected, **EAGER)
    return {op.kind for op in artifact.graph.ops}


def _error(model, inputs, frontend) -> str:
    with pytest.raises(tcc.TccError) as caught:
        tcc.compile(model, inputs, frontend=frontend)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------
# layout: glu, index_select, repeat, repeat_interleave, roll, pad

class Glu(nn.Module):
    def __init__(self):
        super().__init__()
        self.glu = nn.GLU(dim=1)

    def forward(self, x):
        return F.glu(x), F.glu(x, 1), self.glu(x)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_glu_is_a_half_times_the_sigmoid_of_the_other(frontend):
    kinds = _compiled(Glu(), (torch.randn(2, 4, 6),), frontend)
    assert kinds >= {"slice", "sigmoid", "mul"} and "glu" not in kinds


class IndexSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("rows", torch.tensor([1, 0, 1]))

    def forward(self, x, index):
        return (x.index_select(2, index), torch.index_select(x, 0, self.rows), x.index_select(-2, index),
                x.index_select(1, index[0]))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_index_select_along_any_dim(frontend):
    """Before: a 0-d index (`index[0]`) lost its dim, torch keeps it (of size 1)."""
    kinds = _compiled(IndexSelect(), (torch.randn(2, 3, 5), torch.tensor([2, 0, 2, 1])), frontend)
    assert kinds >= {"index", "transpose"}


class Repeats(nn.Module):
    def forward(self, x):
        return (x.repeat(2, 1, 3), x.repeat((2, 1, 1, 2)), x.repeat_interleave(2, dim=1),
                torch.repeat_interleave(x, 3), x.repeat_interleave(2, -1))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_repeat_tiles_and_repeat_interleave_repeats_in_place(frontend):
    kinds = _compiled(Repeats(), (torch.randn(2, 3, 4),), frontend)
    assert kinds <= {"reshape", "expand", "unsqueeze"} and "expand" in kinds


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 3), torch.roll(x, -2, 2), x.roll((1, 2), (0, -1)), x.roll(7, 1)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_roll_is_two_slices_joined_the_other_way_round(frontend):
    kinds = _compiled(Roll(), (torch.randn(2, 3, 5),), frontend)
    assert kinds <= {"slice", "cat", "reshape"} and {"slice", "cat"} <= kinds


class Pad(nn.Module):
    def forward(self, x):
        return F.pad(x, (1, 2)), F.pad(x, (-1, 2, 1, -2), value=1.5), F.pad(x, (0, 0, 0, 0, 1, 1), "constant", -3.0)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_constant_pad_and_negative_widths_crop(frontend):
    kinds = _compiled(Pad(), (torch.randn(2, 3, 5),), frontend)
    assert kinds == {"pad", "slice"}


class PadMode(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return F.pad(x, (1, 1), mode=self.mode)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_other_pad_modes_are_named_unsupported(frontend, mode):
    assert f"pad mode '{mode}' is unsupported" in _error(PadMode(mode), (torch.randn(2, 3, 5),), frontend)


# ------------------------------------------------------------------------------------------------
# reductions: adaptive average pooling, argmax

class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool1, self.pool2 = nn.AdaptiveAvgPool1d(4), nn.AdaptiveAvgPool2d(1)

    def forward(self, x, y):
        return self.pool1(x), F.adaptive_avg_pool1d(x, 2), self.pool2(y), F.adaptive_avg_pool2d(y, (None, 2))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_adaptive_avg_pool_to_a_dividing_size_is_a_mean(frontend):
    kinds = _compiled(Pools(), (torch.randn(2, 3, 8), torch.randn(2, 3, 4, 6)), frontend)
    assert kinds == {"reshape", "mean"}


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_adaptive_avg_pool_to_a_size_not_dividing_is_named_unsupported(frontend):
    message = _error(nn.Sequential(nn.AdaptiveAvgPool1d(3)), (torch.randn(2, 3, 8),), frontend)
    assert "is unsupported (the output size must divide the input's)" in message


class Argmax(nn.Module):
    def forward(self, x):
        return (x.argmax(), x.argmax(1), torch.argmax(x, -1, keepdim=True), torch.argmax(x, keepdim=True),
                x[1, 2, 3].argmax(0, keepdim=True))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_argmax_along_a_dim_and_of_the_whole_tensor(frontend):
    """Before: `argmax(x, keepdim=True)` (no dim) came back of rank 0, torch's of rank 3 and all
    ones; the argmax of a 0-d tensor along dim 0 stopped on an IndexError."""
    assert "argmax" in _compiled(Argmax(), (torch.randn(2, 3, 5),), frontend)


# ------------------------------------------------------------------------------------------------
# attention, convolution

class GroupedQueryAttention(nn.Module):
    def forward(self, q, k, v):
        return (F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_grouped_query_attention_repeats_key_and_value_heads(frontend):
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    kinds = _compiled(GroupedQueryAttention(), (q, k, v), frontend)
    assert kinds >= {"scaled_dot_product_attention", "expand"}


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(6, 2, 3)), nn.Parameter(torch.randn(4, 1, 3, 2))

    def forward(self, x, y):
        return F.conv1d(x, self.w1, None, 2, "valid", 1, 2), F.conv2d(y, self.w2, padding="same", groups=4)


CONVS = {
    "conv1d-same": (nn.Conv1d(4, 6, 3, padding="same"), (2, 4, 9)),
    "conv1d-same-even-kernel": (nn.Conv1d(4, 6, 4, padding="same", dilation=1), (2, 4, 9)),
    "conv1d-valid-stride-no-bias": (nn.Conv1d(4, 6, 5, stride=2, padding="valid", bias=False), (2, 4, 11)),
    "conv2d-groups-stride": (nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (2, 4, 7, 6)),
    "conv2d-depthwise-dilated-same": (nn.Conv2d(4, 4, (3, 2), groups=4, dilation=(2, 1), padding="same"), (1, 4, 6, 7)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's, of the even kernel
@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", CONVS)
def test_convolutions_stay_convolutions(name, frontend):
    torch.manual_seed(0)
    conv, shape = CONVS[name]
    kinds = _compiled(nn.Sequential(conv), (torch.randn(shape),), frontend)
    assert f"conv{len(shape) - 2}d" in kinds
    assert ("pad" in kinds) == name.endswith(("even-kernel", "dilated-same"))  # an odd 'same' total pads first


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_functional_convolutions(frontend):
    torch.manual_seed(0)
    kinds = _compiled(FunctionalConv(), (torch.randn(2, 4, 9), torch.randn(1, 4, 5, 6)), frontend)
    assert kinds >= {"conv1d", "conv2d", "pad"}


class FunctionalTransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3))

    def forward(self, x):
        return F.conv_transpose1d(x, self.weight, stride=2)


UNSUPPORTED_CONVS = {  # (model, input shape, the message's words)
    "ConvTranspose1d": (nn.Sequential(nn.ConvTranspose1d(3, 3, 3)), (2, 3, 8), "transposed 1-d"),
    "ConvTranspose2d": (nn.Sequential(nn.ConvTranspose2d(3, 3, 3)), (2, 3, 5, 5), "transposed 2-d"),
    "F.conv_transpose1d": (FunctionalTransposedConv(), (2, 3, 8), "transposed 1-d"),
    "Conv3d": (nn.Sequential(nn.Conv3d(2, 2, 3)), (1, 2, 4, 4, 4), "3-d"),
}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", UNSUPPORTED_CONVS)
def test_unsupported_convolutions_are_named(name, frontend):
    """Before: with fx, `unsupported module ConvTranspose1d` (or `Conv3d`, or op
    `conv_transpose1d`), no word of what about it."""
    model, shape, words = UNSUPPORTED_CONVS[name]
    message = _error(model, (torch.randn(shape),), frontend)
    assert f"{words} convolution is unsupported: got input {list(shape)}" in message


# ------------------------------------------------------------------------------------------------
# normalization, silu

def _with_statistics(norm: nn.Module) -> nn.Module:
    """`norm` with running statistics and affine parameters other than the initial ones."""
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    return norm


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("spatial", [1, 2])
def test_batch_norm_after_a_convolution_is_folded_into_it(spatial, frontend):
    torch.manual_seed(0)
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if spatial == 1 else (nn.Conv2d, nn.BatchNorm2d)
    model, x = nn.Sequential(conv(3, 4, 3), _with_statistics(norm(4))), torch.randn((2, 3) + (6,) * spatial)
    kind, folded = f"conv{spatial}d", _compiled(model, (x,), frontend)
    assert kind in folded and "batch_norm" not in folded
    assert {kind, "batch_norm"} <= _compiled(model, (x,), frontend, pipeline="")


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.batch = _with_statistics(nn.BatchNorm1d(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.group, self.rms = nn.GroupNorm(2, 4), nn.RMSNorm(6)
        with torch.no_grad():
            self.group.weight.uniform_(0.5, 2), self.rms.weight.uniform_(0.5, 2)

    def forward(self, x):
        small = x * 1e-3  # eps matters: a wrong default one shows
        return (self.batch(x), F.batch_norm(x, self.mean, self.var, eps=1e-3), self.group(x),
                F.group_norm(x, 4, eps=1e-3), self.rms(small), F.rms_norm(small, (6,)),
                F.rms_norm(small, (4, 6), eps=1e-6))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_batch_group_and_rms_norm_stay_whole(frontend):
    torch.manual_seed(0)
    assert _compiled(Norms(), (torch.randn(2, 4, 6),), frontend, pipeline="") >= {"batch_norm", "group_norm",
                                                                                   "rms_norm"}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_rms_norm_default_eps_is_that_of_the_type_torch_computes_in(dtype, frontend):
    """Before: every type but f32 took f16's epsilon (1e-3); torch takes f64's for f64, else f32's."""
    model, x = nn.Sequential(nn.RMSNorm(6, elementwise_affine=False)), (torch.randn(2, 6) * 1e-4).to(dtype)
    artifact = tcc.compile(model, (x,), frontend=frontend)
    (eps,) = [dict(op.attrs)["eps"] for op in artifact.graph.ops if op.kind == "rms_norm"]
    assert eps == torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(artifact.run(x), model(x), **({} if dtype == torch.float16 else EAGER))


class BatchStatistics(nn.Module):
    def forward(self, x):
        return F.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("model", [BatchStatistics(), nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))],
                         ids=["F.batch_norm", "BatchNorm1d-without-running-stats"])
def test_batch_norm_on_batch_statistics_is_named_unsupported(model, frontend):
    """tcc.compile puts the model in eval mode, so a BatchNorm1d with running statistics uses them;
    without them (or `training=True`) it would normalize by the batch's own. Before: with
    torch.export, `unsupported op aten._native_batch_norm_legit.no_stats`."""
    assert "training mode" in _error(model, (torch.randn(2, 3, 5),), frontend)


class Clamps(nn.Module):
    def forward(self, x, i):
        return (x.clamp(-0.5, 0.7) + torch.clamp(x, min=0.1) + x.clamp_max(0.2) + x.clamp_min(-0.1)
                + torch.clip(x, max=0.3) + x.clamp(0.6, 0.2)), i.clamp(1, 3)  # min > max: max, as torch


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_clamp_is_a_maximum_then_a_minimum(frontend):
    inputs = (torch.randn(3, 4), torch.randint(0, 5, (3, 4)))
    assert _compiled(Clamps(), inputs, frontend) == {"maximum", "minimum", "add", "full"}


class Silu(nn.Module):
    def __init__(self):
        super().__init__()
        self.silu = nn.SiLU()

    def forward(self, x):
        return self.silu(x), F.silu(x)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_silu_stays_silu(frontend):
    assert _compiled(Silu(), (torch.randn(2, 7),), frontend) == {"silu"}


# ------------------------------------------------------------------------------------------------
# properties: drawn shapes, shifts, dims and widths

class Drawn(nn.Module):
    def __init__(self, shifts, dims, pads, repeats, dim, tiles):
        super().__init__()
        self.shifts, self.dims, self.pads, self.repeats, self.dim, self.tiles = shifts, dims, pads, repeats, dim, tiles

    def forward(self, x):
        return (torch.roll(x, self.shifts, self.dims), F.pad(x, self.pads, value=0.5),
                x.repeat_interleave(self.repeats, self.dim), x.repeat(self.tiles))


@st.composite
def drawn(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    rank = len(shape)
    dims = draw(st.none() | st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                                     unique_by=lambda d: d % rank))
    shifts = draw(st.integers(-7, 7)) if dims is None else tuple(draw(st.integers(-7, 7)) for _ in dims)
    padded = draw(st.integers(1, rank))  # the last `padded` dims, widths cropping at most all but one element
    pads = tuple(draw(st.integers(-((n - 1) // 2), 3)) for n in reversed(shape[-padded:]) for _ in range(2))
    dim = draw(st.none() | st.integers(-rank, rank - 1))
    tiles = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank + 1)))
    return shape, Drawn(shifts, None if dims is None else tuple(dims), pads, draw(st.integers(1, 3)), dim, tiles)


@pytest.mark.parametrize("frontend", FRONTENDS)
@settings(max_examples=12, deadline=None)
@given(case=drawn())
def test_roll_pad_repeat_and_repeat_interleave_match_eager(frontend, case):
    """Shapes of rank 1 to 3; shifts past the size and negative, one dim or several, or none (the
    flattened tensor); widths that pad or crop; repeats of any dim or of the flattened tensor."""
    shape, model = case
    _compiled(model, (torch.randn(shape),), frontend)
