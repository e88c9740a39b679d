"""Tasks as data (`tcc.passes.tasks`): greedy CTC decoding, WER/CER, token metrics, the task
losses, a data file naming its task, and `tcc eval`, fine-tuning and bad input on each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from tcc.ir.errors import TccError
from tcc.ir.types import TensorType
from tcc.ir.dtypes import DType
from tcc.passes.tasks import CTC, IGNORE, Classification, Tokens, make_task

VOCAB = ("_", " ", "a", "b", "c", "d")  # the blank first
FRAMES = 12


def one_hot_frames(texts: list[str], rng: np.random.Generator, frames: int = FRAMES) -> np.ndarray:
    """[examples, frames, symbols] logits whose best symbol per frame spells each text the CTC
    way: each symbol held for a random number of frames, a blank between repeats, blanks padding."""
    index = {s: i for i, s in enumerate(VOCAB)}
    out = np.full((len(texts), frames, len(VOCAB)), -4.0)
    for e, text in enumerate(texts):
        path = []
        for i, c in enumerate(text):
            if i and text[i - 1] == c:
                path.append(0)
            path += [index[c]] * int(rng.integers(1, 3))
        path = path[:frames]
        path += [0] * (frames - len(path))
        out[e, np.arange(frames), path] = 4.0
    return out


words = st.text(alphabet="abcd", min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=3), st.integers(0, 2 ** 16))
def test_greedy_ctc_decoding_inverts_an_alignment(texts, seed):
    """Any CTC alignment of a transcript (symbols held over frames, blanks between repeats and
    around) decodes back to it: repeats merged, blanks dropped."""
    text = " ".join(texts)
    if len(text) + sum(a == b for a, b in zip(text, text[1:])) > FRAMES // 2:
        return
    logits = one_hot_frames([text], np.random.default_rng(seed), frames=FRAMES * 2)
    assert CTC(VOCAB).decode(logits) == [text]


def test_word_and_character_error_rates():
    task = CTC(VOCAB)
    logits = one_hot_frames(["ab cd", "a b"], np.random.default_rng(0))
    metrics = task.metrics(logits, ("ab cd", "a c"))  # the second: 1 word of 2 wrong, 1 char of 3
    assert metrics["wer"] == pytest.approx(1 / 4) and metrics["cer"] == pytest.approx(1 / 8)
    assert task.score(metrics) == pytest.approx(0.75)


def test_ctc_loss_prefers_the_right_alignment():
    task = CTC(VOCAB)
    right = torch.tensor(one_hot_frames(["ab", "dc a"], np.random.default_rng(1)), dtype=torch.float32)
    wrong = torch.tensor(one_hot_frames(["ba", "cd b"], np.random.default_rng(1)), dtype=torch.float32)
    assert float(task.loss(right, ("ab", "dc a"))) < 0.1 < float(task.loss(wrong, ("ab", "dc a")))


def test_token_accuracy_and_perplexity():
    task = Tokens()
    labels = torch.tensor([[1, 2, IGNORE], [0, 0, 3]])
    uniform = np.zeros((2, 3, 4))
    assert task.metrics(uniform, labels)["perplexity"] == pytest.approx(4.0)
    best = np.eye(4)[[[1, 0, 0], [0, 1, 3]]] * 10.0
    assert task.metrics(best, labels)["token_accuracy"] == pytest.approx(3 / 5)  # the ignored one not counted


@pytest.mark.parametrize("task, labels, output, message", [
    (Classification(), torch.tensor([0, 5]), TensorType((2, 4), DType.F32), "example 1: label 5 outside the model's 4"),
    (Classification(), torch.tensor([0, 1]), TensorType((2, 3, 4), DType.F32), "class labels need a model whose first"),
    (CTC(VOCAB), ("ab", "ax"), TensorType((2, FRAMES, 6), DType.F32), "example 1: 'x' in 'ax' is not in the vocab"),
    (CTC(VOCAB), ("ab", " "), TensorType((2, FRAMES, 6), DType.F32), "example 1: empty transcript"),
    (CTC(VOCAB), ("ab",), TensorType((2, FRAMES, 6), DType.F32), "1 transcripts for 2 examples"),
    (CTC(VOCAB), ("ab", "aaaaaaa"), TensorType((2, FRAMES, 6), DType.F32), "example 1: 'aaaaaaa' needs 13 frames"),
    (CTC(VOCAB), ("ab", "a"), TensorType((2, 10), DType.F32),
     "CTC needs a model whose first output is [batch, frames, 6]"),
    (Tokens(), torch.tensor([[0, 9]]), TensorType((1, 2, 4), DType.F32), "example 0, position 1: label 9 outside"),
    (Tokens(), torch.tensor([[IGNORE, IGNORE]]), TensorType((1, 2, 4), DType.F32), "example 0: every label is -100"),
])
def test_labels_that_cannot_judge_the_model(task, labels, output, message):
    with pytest.raises(TccError, match="^d.pt: .*" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        task.check(labels, output, 2 if task.name != "tokens" else 1, "d.pt")


@pytest.mark.parametrize("name, vocab, message", [
    ("ctc", None, "a ctc task needs its vocabulary"),
    ("ctc", ["_", "a"], "needs ' ' (the word separator)"),
    ("ctc", ["_", " ", "a", "a"], "lists 'a' twice"),
    ("ctc", "_ ab", "'vocab' must be a list of symbols"),
    ("classification", ["_", " "], "a vocabulary is for a ctc task, not classification"),
    ("speech", None, "unknown task 'speech' (tcc knows classification, ctc, tokens)"),
])
def test_bad_task_or_vocabulary(name, vocab, message):
    with pytest.raises(TccError, match="^d.pt: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        make_task(name, vocab, "d.pt")


class FrameClassifier(torch.nn.Module):
    """Per-frame logits over VOCAB from [batch, frames, 8] features: three linears (the middle one
    is what pruning prunes: it keeps the input projection and the head)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 32)
        self.hidden = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, len(VOCAB))

    def forward(self, x):
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


@pytest.fixture(scope="module")
def ctc_files(tmp_path_factory):
    """A frame classifier trained a little to spell transcripts from features that encode them
    (the one-hot alignment, padded, plus noise); its export, CTC data files and an artifact."""
    d = tmp_path_factory.mktemp("ctc")
    rng = np.random.default_rng(0)
    texts = [" ".join("".join(rng.choice(list("abcd"), int(rng.integers(1, 3)))) for _ in range(2)) for _ in range(48)]
    frames = one_hot_frames(texts, rng)
    x = torch.tensor(np.concatenate([frames, np.zeros((48, FRAMES, 2))], -1) + rng.normal(0, 0.3, (48, FRAMES, 8)),
                     dtype=torch.float32)
    torch.manual_seed(0)
    model = FrameClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    task = CTC(VOCAB)
    for _ in range(150):
        optimizer.zero_grad()
        task.loss(model(x), texts).backward()
        optimizer.step()
    model.eval()
    torch.export.save(torch.export.export(model, (x[:8],)), d / "model.pt2")
    torch.save({"inputs": x, "labels": texts, "task": "ctc", "vocab": list(VOCAB)}, d / "test.pt")
    torch.save({"inputs": x, "labels": texts}, d / "bare.pt")  # its task given on the command line
    (d / "vocab.json").write_text(json.dumps(list(VOCAB)))
    torch.save({"inputs": x, "labels": torch.zeros(48, dtype=torch.long)}, d / "classes.pt")
    torch.save({"inputs": x, "labels": texts[:-1] + ["ab e"], "task": "ctc", "vocab": list(VOCAB)}, d / "unknown.pt")
    torch.save({"inputs": x, "labels": texts[:-1] + [""], "task": "ctc", "vocab": list(VOCAB)}, d / "empty.pt")
    torch.save({"inputs": x[:, :, :6], "labels": texts, "task": "ctc", "vocab": list(VOCAB)}, d / "shape.pt")
    (d / "bad_vocab.json").write_text("{not json")
    result = run_cli("compile", d / "model.pt2", "-o", d / "fp32", "-q")
    assert result.returncode == 0, result.stderr
    return d, model, x, texts


def test_eval_prints_wer_and_cer(ctc_files):
    d, model, x, texts = ctc_files
    with torch.no_grad():
        expected = CTC(VOCAB).metrics(model(x).numpy(), texts)
    assert expected["wer"] < 0.5  # it learned something: the figures below are not all 1
    result = run_cli("eval", d / "fp32", "--data", d / "test.pt")
    assert result.returncode == 0, result.stderr
    assert f"WER {expected['wer']:.4f}, CER {expected['cer']:.4f}" in result.stdout
    report = json.loads(run_cli("eval", d / "fp32", "--data", d / "bare.pt", "--task", "ctc", "--vocab",
                                d / "vocab.json", "--baseline", d / "fp32", "--json").stdout)
    assert report["task"] == "ctc" and report["examples"] == 48
    assert report["wer"] == pytest.approx(expected["wer"]) and report["baseline_wer"] == report["wer"]
    assert report["agreement"] == 1.0 and report["max_abs_error"] == 0.0


def test_select_bounds_one_minus_wer(ctc_files):
    """`tcc select --ac` on CTC data bounds 1 - WER: every point's score is its setting's, and the
    constraint's words name it."""
    d, model, x, texts = ctc_files
    with torch.no_grad():
        wer = CTC(VOCAB).metrics(model(x).numpy(), texts)["wer"]
    result = run_cli("select", d / "model.pt2", "--lc", "1s", "--ac", f"{1 - wer - 0.001:.4f}", "--data",
                     d / "test.pt", "--settings", "fp32,int8", "--executor", "inline", "--json")
    assert result.returncode == 0, result.stderr
    selection = json.loads(result.stdout)
    fp32 = [p for p in selection["points"] if p["setting"] == "fp32"]
    assert fp32 and all(p["accuracy"] == pytest.approx(1 - wer) for p in fp32)
    assert "1 - WER >= " in selection["reason"] and selection["score"] == "1 - WER"


def test_fine_tuning_learns_with_the_ctc_loss(ctc_files, tmp_path):
    """hp-prune fine-tunes on CTC data: the pruned model's WER stays near the dense one's, where
    one-shot pruning (no training) loses more."""
    d, *_ = ctc_files
    wer = {}
    for name, epochs in (("tuned", 6), ("one-shot", 0)):
        out = tmp_path / name
        result = run_cli("compile", d / "model.pt2", "-o", out, "-q", "--train-data", d / "test.pt",
                         "--pipeline", f"hp-prune{{sparsity=0.875,block=4x4,epochs={epochs}}}")
        assert result.returncode == 0, result.stderr
        wer[name] = json.loads(run_cli("eval", out, "--data", d / "test.pt", "--json").stdout)["wer"]
    assert wer["tuned"] < wer["one-shot"]


@pytest.mark.parametrize("args, message", [
    (["--data", "classes.pt", "--task", "ctc", "--vocab", "vocab.json"],
     "classes.pt (data): CTC labels must be a list of transcripts (strings), got Tensor"),
    (["--data", "classes.pt"], "classes.pt (data): class labels need a model whose first output is [batch, classes]"),
    (["--data", "unknown.pt"], "unknown.pt (data): example 47: 'e' in 'ab e' is not in the vocabulary"),
    (["--data", "empty.pt"], "empty.pt (data): example 47: empty transcript"),
    (["--data", "shape.pt"], "shape.pt (data): input 'x' examples have shape [12, 6], the model expects [12, 8]"),
    (["--data", "bare.pt", "--task", "ctc"], "bare.pt: a ctc task needs its vocabulary"),
    (["--data", "bare.pt", "--task", "ctc", "--vocab", "bad_vocab.json"], "--vocab bad_vocab.json: not JSON"),
])
def test_bad_task_data_is_one_line_exit_2(ctc_files, args, message):
    d, *_ = ctc_files
    result = run_cli("eval", "fp32", *args, cwd=d)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_fine_tuning_a_model_with_batch_norm_keeps_its_statistics():
    """The speech Transformer normalizes its features with batch norm: fine-tuning (here hp-prune's,
    CTC) learns its weights and leaves the running statistics as they were."""
    import tcc
    from tcc.passes import PassContext, parse_pipeline, run_pipeline
    from tcc.passes.data import Dataset
    from tcc.runtime.torch_executor import TorchExecutor
    from tcc.speech import VOCAB as SPEECH_VOCAB
    from tcc.zoo import build
    model, (x,) = build("speech-transformer")
    graph = tcc.compile(model, (x,)).graph
    stats = {n for op in graph.ops if op.kind == "batch_norm" for n in op.operands[1:3]}
    assert stats
    data = Dataset((torch.randn(4, *x.shape[1:]),), ("go left", "stop", "one two", "yes"), "t.pt",
                   CTC(SPEECH_VOCAB))
    ctx = PassContext(data={"train": data}, torch_module=TorchExecutor)
    tuned = run_pipeline(graph, parse_pipeline("hp-prune{sparsity=0.5,block=16x16,epochs=1}"), ctx)
    for name in stats:
        assert np.array_equal(tuned.weights[name], graph.weights[name])
    assert not np.array_equal(tuned.weights["layers.0.query.bias"], graph.weights["layers.0.query.bias"])


def test_eval_of_a_language_model_on_next_tokens(tmp_path):
    """A decoder's per-token logits judged as `tokens`: the next token at each position (the last
    ignored); token accuracy and perplexity as the torch model's own logits give them."""
    from tcc.zoo import build
    model, (ids,) = build("llama-style")
    torch.export.save(torch.export.export(model, (ids,)), tmp_path / "lm.pt2")
    tokens = torch.randint(0, 100, (6, ids.shape[1] + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[:, -1] = IGNORE
    torch.save({"inputs": inputs, "labels": labels, "task": "tokens"}, tmp_path / "text.pt")
    assert run_cli("compile", tmp_path / "lm.pt2", "-o", tmp_path / "lm", "-q").returncode == 0
    result = run_cli("eval", tmp_path / "lm", "--data", tmp_path / "text.pt", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    with torch.no_grad():
        logits = model(inputs)[0]
    expected = Tokens().metrics(logits.numpy(), labels)
    assert report["task"] == "tokens" and report["token_accuracy"] == pytest.approx(expected["token_accuracy"])
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4) and report["perplexity"] > 50


def test_compile_target_auto_judges_ctc_data_by_wer(ctc_files, tmp_path):
    """`tcc compile --target auto` on CTC data: the exploration scores each setting by 1 - WER,
    the chosen artifact's report says so, and `tcc eval` of what it built gives that WER."""
    d, model, x, texts = ctc_files
    with torch.no_grad():
        wer = CTC(VOCAB).metrics(model(x).numpy(), texts)["wer"]
    out = tmp_path / "auto"
    result = run_cli("compile", d / "model.pt2", "--target", "auto", "--lc", "1s", "--ac", f"{1 - wer - 0.001:.4f}",
                     "--data", d / "test.pt", "--settings", "fp32", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "--target auto: " in result.stdout and "1 - WER &ge; " in (out / "report.html").read_text()
    report = json.loads(run_cli("eval", out, "--data", d / "test.pt", "--json").stdout)
    assert report["wer"] == pytest.approx(wer)
