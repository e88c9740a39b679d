"""The language-modelling task: the grammar's corpus (`tcc.language`), a decoder's decode and
prefill steps measured, calibrated and fine-tuned along token sequences (`first_output`), and
the token-rate constraint of `tcc select`."""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tcc
from tcc import zoo
from tcc.cli import main
from tcc.evaluate import evaluate
from tcc.language import COLOURS, INDEX, NAMES, NUMBERS, OBJECTS, VOCAB, make_corpus, text
from tcc.language import main as language_main
from tcc.passes import Dataset
from tcc.passes.tasks import Tokens
from tcc.runtime.generate import generate
from tcc.select import Setting, TokenRate, latency_bound, parse_latency, select
from tcc.targets import load_catalog

MAX_CACHE, LENGTH, BATCH = 24, 16, 4
STARTS = {INDEX["the"]} | {INDEX[n] for n in NUMBERS[:8]} | {INDEX[n] for n in NAMES}  # words a sentence opens with


@lru_cache(maxsize=None)
def corpora():
    """(training, test) windows of the grammar: 256 and 64 of 16 tokens."""
    return make_corpus(256, LENGTH, 0), make_corpus(64, LENGTH, 1)


@lru_cache(maxsize=None)
def trained():
    """A small Llama (2 x 32) trained on the grammar for a few seconds."""
    train, _ = corpora()
    return zoo.train_lm(zoo.causal_lm("llama", vocab_size=len(VOCAB)), train.inputs, train.labels, epochs=8)


@lru_cache(maxsize=None)
def step(width: int = 1):
    """The trained model's step of `width` tokens (1: decode; more: prefill), batch 4."""
    return zoo.decode_step(trained(), MAX_CACHE, batch=BATCH, width=width)


def dataset(which: int = 1) -> Dataset:
    corpus = corpora()[which]
    return Dataset((corpus.inputs,), corpus.labels, ("train", "test")[which], Tokens())


def hf_metrics() -> dict[str, float]:
    """Perplexity and token accuracy of the Hugging Face model's forward pass on the test windows."""
    test = corpora()[1]
    with torch.no_grad():
        logits = trained()(input_ids=test.inputs).logits
    return Tokens().metrics(logits.numpy(), test.labels)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 40))
def test_the_corpus_is_the_grammar_read_in_windows(seed, length):
    """Labels are the next tokens; windows open at a sentence; every probability is one the
    grammar gives; a recalled object and colour are those named first; seeded."""
    corpus = make_corpus(8, length, seed)
    assert torch.equal(corpus.inputs[:, 1:], corpus.labels[:, :-1])
    assert set(corpus.inputs[:, 0].tolist()) <= STARTS
    assert ((corpus.probabilities > 0) & (corpus.probabilities <= 1)).all()
    assert torch.equal(make_corpus(8, length, seed).inputs, corpus.inputs)
    for row, last in zip(corpus.inputs.tolist(), corpus.labels[:, -1].tolist()):
        words = text(row + [last]).split()
        for i in range(len(words) - 10):  # each recall sentence the window holds whole
            if words[i] in NAMES:
                colour, thing = words[i + 3], words[i + 4]
                assert words[i + 1:i + 3] == ["has", "a"] and colour in COLOURS and thing in OBJECTS
                assert words[i + 5:i + 11] == ["and", "the", thing, "is", colour, "."]


def test_the_corpus_floor_and_its_file(tmp_path, capsys):
    """The grammar's own perplexity is far below a uniform guess over its words, half the
    next tokens are fixed by it, and `python -m tcc.language` writes a data file of the
    tokens task."""
    corpus = make_corpus(2000, 32, 3)
    assert 2.4 < corpus.floor_perplexity < 3.0 < len(VOCAB) and 0.45 < corpus.determined < 0.55
    assert language_main(["-o", str(tmp_path / "lm.pt"), "--examples", "16", "--length", "8"]) == 0
    assert "16 x 8 tokens over a vocabulary of 64; the grammar's own perplexity" in capsys.readouterr().out
    saved = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert saved["task"] == "tokens" and saved["inputs"].shape == saved["labels"].shape == (16, 8)


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("on", ["cpu", "numpy"])
def test_a_step_measures_as_the_forward_pass(width, on):
    """Run along the test windows a token (or four) at a time from an empty cache, the decode
    and prefill steps give the perplexity and token accuracy of Hugging Face's forward pass
    over whole windows (float work: within a stated tolerance), on the torch and numpy
    executors."""
    found = evaluate(tcc.compile(step(width)), dataset(), on=on)
    expected = hf_metrics()
    assert found["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert abs(found["token_accuracy"] - expected["token_accuracy"]) <= 2 / (64 * LENGTH)  # a near tie or two
    assert expected["perplexity"] < 1.5 * corpora()[1].floor_perplexity < len(VOCAB)  # it has learned the grammar


def test_quantized_steps_calibrate_along_sequences():
    """int8 decode and prefill steps calibrate on token windows (the cache filling as they
    run): their perplexity stays within 5% of fp32, and both steps quantize alike."""
    fp32 = hf_metrics()["perplexity"]
    found = {}
    for width in (1, 4):
        a = tcc.compile(step(width), pipeline="fold-constants,canonicalize,dce,quantize", calib_data=dataset())
        assert any(t.dtype.value == "i8" for _, t in a.graph.constants)
        found[width] = evaluate(a, dataset(), on="numpy")["perplexity"]
        assert found[width] == pytest.approx(fp32, rel=0.05)
    assert found[1] == pytest.approx(found[4], rel=1e-3)


def test_fine_tuning_a_step_with_the_language_modelling_loss():
    """Pruning 90% of a prefill step's weights one-shot loses much of what it learned;
    gradual pruning with fine-tuning on the LM loss and distillation, through the step along
    the training windows, recovers most of it."""
    prune = "fold-constants,canonicalize,dce,hp-prune{sparsity=0.9,block=8x8,epochs=%d}"
    one_shot = evaluate(tcc.compile(step(LENGTH), pipeline=prune % 0), dataset())["perplexity"]
    tuned = evaluate(tcc.compile(step(LENGTH), pipeline=prune % 3, train_data=dataset(0)), dataset())["perplexity"]
    assert tuned < 0.8 * one_shot


def test_decode_and_prefill_steps_run_the_weights_one_fine_tuning_left():
    """Pruned and fine-tuned once through the 16-wide step, the weights go to the decode and
    the 4-wide prefill steps (`weights_from`): re-pruning keeps them bit for bit, both quantized
    steps give one perplexity, and generating with the prefill step gives the decode step's
    tokens."""
    pruned = tcc.compile(step(LENGTH), pipeline="fold-constants,canonicalize,dce,hp-prune{sparsity=0.75,block=8x8,"
                                                "epochs=1}", train_data=dataset(0))
    again = tcc.compile(step(1), pipeline="fold-constants,canonicalize,dce,hp-prune{sparsity=0.75,block=8x8}",
                        weights_from=pruned)
    assert again.manifest["weights_from"]["weights"] == again.manifest["weights_from"]["of"] > 10
    for name, t in again.graph.constants:
        if t.dtype.is_float and t.rank == 2 and t.shape[1] > 1:
            assert np.array_equal(again.graph.weights[name], pruned.graph.weights[name]), name
    steps = [tcc.compile(step(width), pipeline="fold-constants,canonicalize,dce,hp-prune{sparsity=0.75,block=8x8},"
                                               "quantize", calib_data=dataset(), weights_from=pruned) for width in (1, 4)]
    measured = [evaluate(s, dataset())["perplexity"] for s in steps]
    assert measured[0] == pytest.approx(measured[1], rel=1e-4)
    assert measured[0] == pytest.approx(evaluate(pruned, dataset())["perplexity"], rel=0.02)
    prompt = corpora()[1].inputs[:BATCH, :7]
    assert torch.equal(generate(steps[0], prompt, 8).tokens, generate(steps[0], prompt, 8, prefill=steps[1]).tokens)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("language")
    torch.export.save(step(1), path / "step.pt2")
    torch.export.save(step(4), path / "prefill.pt2")
    tcc.compile(step(4)).save(path / "prefill")
    tcc.compile(*zoo.build("llama-style")).save(path / "other")
    torch.save(corpora()[1].to_file(), path / "test.pt")
    return path


def test_cli_takes_weights_from_an_artifact(files, capsys, tmp_path):
    assert main(["compile", str(files / "step.pt2"), "--weights-from", str(files / "prefill"), "-o",
                 str(tmp_path / "step")]) == 0
    assert f"weights from {files / 'prefill'}: " in capsys.readouterr().out
    assert main(["compile", str(files / "step.pt2"), "--weights-from", str(files / "other"), "-o",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tcc: error: {files / 'other'}: none of its float weights is one of this model's by name and shape "
                   "(another model, or compiled to integers: take the weights from a float compile)")
    assert not (tmp_path / "bad").exists()


def test_cli_evaluates_a_step(files, capsys):
    assert main(["eval", str(files / "prefill"), "--data", str(files / "test.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "tokens" and report["perplexity"] == pytest.approx(hf_metrics()["perplexity"], rel=1e-4)


@pytest.mark.parametrize("inputs, message", [
    (torch.zeros(4, 6, dtype=torch.long), "a step of a decoder is fed token ids [examples, length] with the length a "
                                          "multiple of its width 4 and at most its cache's 24 positions, got int64 [4, 6]"),
    (torch.zeros(4, 28, dtype=torch.long), "at most its cache's 24 positions, got int64 [4, 28]"),
    (torch.full((4, 8), 64), "example 0, position 0: token id 64 outside the model's vocabulary [0, 64)"),
    (torch.zeros(4, 8), "a step of a decoder is fed token ids [examples, length] with the length a multiple of its "
                        "width 4 and at most its cache's 24 positions, got float32 [4, 8]"),
    ((torch.zeros(4, 8, dtype=torch.long),) * 2, "holds 2 input tensor(s) but the model takes 1 (input_ids) (a step "
                                                 "of a decoder is fed token ids [examples, length] alone)"),
])
def test_bad_sequence_data_is_a_one_line_error(files, capsys, inputs, message):
    torch.save({"inputs": inputs}, files / "bad.pt")
    assert main(["eval", str(files / "prefill"), "--data", str(files / "bad.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tcc: error: ") and "\n" not in err and message in err


def test_a_token_rate_is_a_latency_per_run_of_the_step():
    """`--lc 20tok/s` on a decode step of batch 4 bounds each run at 4 / 20 s; on a prefill
    step of width 4 at 16 / 20 s; on a model without a cache it is refused."""
    assert parse_latency(" 20tok/s") == TokenRate(20.0)
    graph = tcc.compile(step(1)).graph
    assert latency_bound(TokenRate(20.0), graph) == pytest.approx(200.0)
    assert latency_bound(TokenRate(20.0), tcc.compile(step(4)).graph) == pytest.approx(800.0)
    assert latency_bound(12.5, graph) == 12.5
    with pytest.raises(tcc.TccError, match=r"^--lc 20tok/s: a token rate constrains a decoder's step"):
        latency_bound(TokenRate(20.0), tcc.compile(*zoo.build("llama-style")).graph)
    for bad in ("0tok/s", "fasttok/s", "-3tok/s"):
        with pytest.raises(tcc.TccError, match="expects a positive token rate"):
            parse_latency(bad)


def test_select_chooses_a_device_for_a_token_rate(files, capsys):
    """`tcc select` on a decode step under a token rate and a token-accuracy constraint: each
    point's tokens/s is the step's tokens over its latency, and the chosen point makes at
    least the rate."""
    full = load_catalog()
    catalog = {name: full[name] for name in ("edge-cpu", "cpu", "fpga-small", full["fpga-small"].device.host)}
    settings = (Setting("fp32", ()), Setting("int8", ("quantize",)))
    selection = select(step(1), dataset(), catalog, lc=TokenRate(50.0), ac=0.5, settings=settings,
                       executor="inline", example_inputs=(torch.zeros(BATCH, 1, dtype=torch.long), torch.tensor([0])))
    assert selection.tokens_per_run == BATCH and selection.lc_ms == pytest.approx(BATCH / 50.0 * 1e3)
    assert selection.chosen is not None and BATCH / selection.chosen.latency_ms * 1e3 >= 50.0
    assert {p.setting for p in selection.points} == {"fp32", "int8"}
    assert main(["select", str(files / "step.pt2"), "--lc", "50tok/s", "--ac", "0.5", "--data",
                 str(files / "test.pt"), "--settings", "fp32", "--executor", "inline", "-q"]) == 0
    out = capsys.readouterr().out
    assert "fp32 runs in" in out and math.isfinite(float(out.split("runs in ")[1].split(" ms")[0]))
    assert main(["select", str(files / "step.pt2"), "--lc", "50tok/s", "--ac", "0.5", "--data",
                 str(files / "test.pt"), "--settings", "fp32", "--executor", "inline"]) == 0
    out = capsys.readouterr().out
    assert f"--lc 50tok/s: a run of the step makes {BATCH} token(s): at most 80 ms a run" in out
    assert "tokens/s" in out.splitlines()[1]


def test_select_prices_the_first_token_through_the_prefill_step(files, capsys):
    """With the prefill step beside the decode step, each point carries its time to first token
    (one run of the prefill step under the point's setting, priced on the point's device), which
    `ttft_ms` bounds along with the token rate."""
    full = load_catalog()
    catalog = {name: full[name] for name in ("edge-cpu", "cpu", "jetson")}
    settings = (Setting("fp32", ()), Setting("int8", ("quantize",)))
    kw = dict(ac=0.5, settings=settings, executor="inline", prefill=step(4),
              example_inputs=(torch.zeros(BATCH, 1, dtype=torch.long), torch.tensor([0])))
    loose = select(step(1), dataset(), catalog, lc=TokenRate(1.0), **kw)
    first = {(p.setting, p.device): p.ttft_ms for p in loose.points}
    assert all(ms > 0 for ms in first.values()) and loose.chosen is not None
    fastest = min(first.values())
    tight = select(step(1), dataset(), catalog, lc=TokenRate(1.0), ttft_ms=fastest * 1.001, **kw)
    assert tight.chosen is not None and tight.chosen.ttft_ms <= fastest * 1.001
    assert all(tight.meets(p) == (p.ttft_ms <= fastest * 1.001) for p in tight.points)
    assert "time to first token <= " in tight.reason
    assert main(["select", str(files / "step.pt2"), "--lc", "1tok/s", "--ac", "0.5", "--data", str(files / "test.pt"),
                 "--settings", "fp32", "--executor", "inline", "--prefill", str(files / "prefill.pt2"), "--ttft",
                 "10s"]) == 0
    assert "TTFT ms" in capsys.readouterr().out.splitlines()[1]
    for argv, message in ((["--ttft", "5ms"], "--ttft bounds the time to first token of a prompt through the prefill "
                                              "step: give --prefill"),
                          (["--prefill", str(files / "prefill.pt2"), "--ttft", "5tok/s"],
                           "--ttft is '5tok/s' but expects a latency (e.g. 20ms), not a token rate")):
        assert main(["select", str(files / "step.pt2"), "--lc", "1tok/s", "--ac", "0.5", "--data",
                     str(files / "test.pt"), "--settings", "fp32", *argv]) == 2
        assert capsys.readouterr().err.strip() == f"tcc: error: {message}"
