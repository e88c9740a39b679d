"""Pipelines as text: parsing, printing back, errors that name the problem and suggest the
nearest name, and the registry."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcc.passes import PASSES, OptionError, Pass, PipelineError, Latency, Ratio, Shape2, format_pipeline, parse_pipeline
from tcc.passes.pipeline import describe_passes


def test_registry_names_match_classes_and_every_option_is_documented():
    for name, cls in PASSES.items():
        assert cls.name == name and issubclass(cls, Pass) and cls.summary
        hints = typing.get_type_hints(cls)
        for f in cls.options():
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
            assert f.name in hints
    assert {"dce", "fold-constants", "canonicalize", "hp-prune", "block-prune", "binarize", "quantize"} <= set(PASSES)


def test_parse_issue_example():
    passes = parse_pipeline("fold-constants,dce,hp-prune{block=16x16,sparsity=0.75},quantize{bits=8}")
    assert [p.name for p in passes] == ["fold-constants", "dce", "hp-prune", "quantize"]
    assert passes[2].block == Shape2(16, 16) and passes[2].sparsity == 0.75
    assert passes[3].bits == 8


def test_value_kinds():
    (p,) = parse_pipeline("block-prune{nm=2:4, keep_head=false, layers=encoder.*, qkv=0.25}")
    assert p.nm == Ratio(2, 4) and p.keep_head is False and p.layers == "encoder.*" and p.qkv == 0.25
    (p,) = parse_pipeline("hp-prune{sparsity=none,row_nnz=4,block_sparsity=0.5}")
    assert p.sparsity is None and p.row_nnz == 4


def test_empty_pipeline_is_no_passes():
    assert parse_pipeline("") == [] and parse_pipeline("  ") == []


@pytest.mark.parametrize("spec, message", [
    ("hp-prun", "unknown pass 'hp-prun'; did you mean 'hp-prune'?"),
    ("dce,quantise{bits=8}", "pipeline column 5: unknown pass 'quantise'; did you mean 'quantize'?"),
    ("hp-prune{sparsity=0.5,blok=8x8}", "hp-prune: unknown option 'blok'; did you mean 'block'?"),
    ("hp-prune{sparsity=high}", "option 'sparsity' is 'high' but expects a number"),
    ("hp-prune{sparsity=1.0}", "hp-prune: option 'sparsity' must be in [0, 1), got 1.0"),
    ("hp-prune{sparsity=-0.1}", "must be in [0, 1)"),
    ("hp-prune{block=16}", "option 'block' is '16' but expects RxC with positive integers"),
    ("hp-prune{block=0x4}", "positive integers"),
    ("block-prune{nm=4:2}", "block-prune: option 'nm' 4:2: N must not exceed M"),
    ("quantize{bits=7}", "quantize: option 'bits' must be 4, 8 or 16, got 7"),
    ("quantize{calibration=maxmin}", "expects one of minmax, percentile; did you mean 'minmax'?"),
    ("binarize{mode=w2a2}", "option 'mode' is 'w2a2' but expects one of w1a8, w1a4, w1a1"),
    ("hp-prune{keep_head=yes}", "expects true or false"),
    ("hp-prune{sparsity=0.5,sparsity=0.6}", "option 'sparsity' given twice"),
    ("hp-prune{sparsity}", "'sparsity' is not key=value"),
    ("hp-prune{sparsity=0.5", "missing '}'"),
    ("dce}", "'}' without '{'"),
    ("hp-prune{{x=1}}", "nested '{'"),
    ("dce,,fold-constants", "cannot read ''"),
])
def test_errors_name_the_problem(spec, message):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_option_errors_outside_pipelines():
    from tcc.passes import HPPrune
    with pytest.raises(OptionError, match="hp-prune: option 'row_nnz' must be >= 1"):
        HPPrune(row_nnz=0)
    with pytest.raises(OptionError, match="option 'epochs' must be >= 0"):
        HPPrune(epochs=-1)


def _values_for(annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        return st.one_of(st.none(), *[_values_for(a) for a in inner])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(1, 16)
    if annotation is float:
        return st.floats(0.0, 0.95).map(lambda v: round(v, 3))
    if annotation is Shape2:
        return st.builds(Shape2, st.integers(1, 32), st.integers(1, 32))
    if annotation is Latency:
        return st.floats(1e-3, 1e6).map(Latency)
    if annotation is Ratio:
        return st.integers(1, 8).flatmap(lambda m: st.builds(Ratio, st.integers(1, m), st.just(m)))
    return st.sampled_from(["encoder", "layers.0", "attn|ffn"])


@st.composite
def pipelines(draw):
    passes = []
    for name in draw(st.lists(st.sampled_from(sorted(PASSES)), max_size=4)):
        cls = PASSES[name]
        hints = typing.get_type_hints(cls)
        values = {}
        for f in cls.options():
            if draw(st.booleans()):
                values[f.name] = draw(_values_for(hints[f.name]))
        try:
            passes.append(cls(**values))
        except OptionError:
            continue
    return passes


@settings(max_examples=150, deadline=None)
@given(pipelines())
def test_format_parses_back_equal(passes):
    text = format_pipeline(passes)
    assert parse_pipeline(text) == passes
    assert format_pipeline(parse_pipeline(text)) == text


def test_describe_lists_options_with_types_and_defaults():
    info = {entry["name"]: entry for entry in describe_passes(PASSES)}
    options = {o["name"]: o for o in info["hp-prune"]["options"]}
    assert options["block"]["type"] == "RxC | none" and options["block"]["default"] == "none"
    assert options["scope"]["type"] == "layer|global" and options["scope"]["default"] == "layer"
    assert dataclasses.is_dataclass(PASSES["hp-prune"])
