"""Generation (issue 24): decode steps with a static KV cache as the ecosystem exports them,
the cache as typed state in the IR, `tcc generate` and its Python API, token for token against
Hugging Face's `generate` and bit for bit between the quantized reference and the accelerator."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
import torch

import tcc
from tcc import zoo
from tcc.cli import main
from tcc.ir import VerifyError, parse_graph, print_graph, verify
from tcc.ir.state import State, StateRole
from tcc.runtime.generate import DecodeStep, generate

from conftest import EXECUTORS, assert_tiers_agree

PROMPT = torch.tensor([[3, 17, 42, 99, 5]])
MAX_CACHE = 24


@lru_cache(maxsize=None)
def decoder(family: str = "llama"):
    """(Hugging Face model, its exported decode step) of a zoo causal LM."""
    model = zoo.causal_lm(family)
    return model, zoo.decode_step(model, MAX_CACHE)


@lru_cache(maxsize=None)
def artifact(family: str = "llama", target: str = "cpu"):
    return tcc.compile(decoder(family)[1], target=target)


@lru_cache(maxsize=None)
def prefill_artifact(width: int = 4, max_cache: int = MAX_CACHE):
    """The llama decoder's prefill step of `width` tokens."""
    return tcc.compile(zoo.decode_step(decoder()[0], max_cache, width=width))


def hf_greedy(model, prompt: torch.Tensor, new: int) -> list[list[int]]:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt),
                              eos_token_id=None, pad_token_id=None).tolist()


@pytest.mark.parametrize("on", EXECUTORS)
def test_greedy_tokens_equal_hugging_face(on):
    """One body for every executor: the prompt prefilled a token at a time, then 16 greedy tokens,
    each equal to transformers' `generate(do_sample=False)` (eager, its own dynamic cache)."""
    model, _ = decoder()
    result = generate(artifact(), PROMPT, 16, on=on)
    assert result.tokens.tolist() == hf_greedy(model, PROMPT, 16)
    assert result.prompt_length == 5 and result.new_tokens.shape == (1, 16)
    assert result.time_to_first_token_s > 0 and result.decode_tokens_per_s > 0


@pytest.mark.parametrize("family", ["qwen2", "phi"])
def test_other_families_generate_as_hugging_face(family):
    """Qwen2 (biased q/k/v, GQA) and Phi (partial rotary, LayerNorm, GELU) decode steps too."""
    model, _ = decoder(family)
    assert generate(artifact(family), PROMPT, 12).tokens.tolist() == hf_greedy(model, PROMPT, 12)


def test_the_cache_is_typed_state_and_dead_buffers_are_dropped():
    """transformers' static cache writes keys, values and a `cumulative_length` counter per
    layer; the counter never reaches the logits, so only the caches are state, each with its
    role, layer and sequence dim read from the graph; the text form carries them."""
    _, program = decoder()
    written = [s.target for s in program.run_decompositions({}).graph_signature.output_specs
               if s.kind.name == "BUFFER_MUTATION"]
    assert sorted(written) == sorted(f"{k}_{i}" for k in ("cumulative_length", "key_cache", "value_cache")
                                     for i in range(2))
    graph = artifact().graph
    assert graph.user_inputs == ("input_ids", "cache_position")
    assert [(s.input, s.role, s.layer, s.seq_dim) for s in graph.state] == [
        ("key_cache_0", StateRole.KEY, 0, 2), ("value_cache_0", StateRole.VALUE, 0, 2),
        ("key_cache_1", StateRole.KEY, 1, 2), ("value_cache_1", StateRole.VALUE, 1, 2)]
    assert [s.output for s in graph.state] == [1, 2, 3, 4] and len(graph.user_outputs) == 1
    assert dict(graph.inputs)["key_cache_0"].shape == (1, 2, MAX_CACHE, 8)
    text = print_graph(graph)
    assert '  state %key_cache_0 -> return[1] {role = "kv.key", layer = 0, seq_dim = 2}\n' in text
    back = parse_graph(text, graph.weights)
    assert back.state == graph.state and back.same_as(graph)
    step = DecodeStep.of(graph)
    assert (step.tokens, step.position, step.logits, step.batch, step.width, step.vocab, step.max_cache) == (
        0, 1, 0, 1, 1, 128, MAX_CACHE)


def test_a_saved_decode_step_generates_the_same(tmp_path):
    """Save and load keep the state; `run` without a cache starts from an empty one and returns
    only the logits."""
    original = artifact()
    loaded = tcc.load(original.save(tmp_path / "step"))
    assert loaded.graph.state == original.graph.state
    assert generate(loaded, PROMPT, 6).tokens.tolist() == generate(original, PROMPT, 6).tokens.tolist()
    logits = loaded.run({"input_ids": PROMPT[:, :1], "cache_position": torch.tensor([0])})
    assert logits.shape == (1, 1, 128)


@pytest.mark.parametrize("prompt_length", [4, 7, 8])
def test_prefill_in_chunks_generates_as_hugging_face(prompt_length):
    """The prompt through a prefill step of 4 tokens a run as far as whole chunks fit (1, 1 and
    2 runs), the rest a token at a time: the same tokens as Hugging Face, in fewer runs."""
    model, _ = decoder()
    prompt = torch.tensor([[3, 17, 42, 99, 5, 64, 1, 120][:prompt_length]])
    result = generate(artifact(), prompt, 8, prefill=prefill_artifact())
    assert result.tokens.tolist() == hf_greedy(model, prompt, 8)
    assert DecodeStep.of(prefill_artifact().graph).width == 4


def test_a_prefill_step_of_another_cache_is_refused():
    with pytest.raises(tcc.TccError, match=r"^the prefill step's cache does not match the decode step's: "
                                           r"'key_cache_0' is f32\[1,2,16,8\] there, 'key_cache_0' f32\[1,2,24,8\] here"):
        generate(artifact(), PROMPT, 4, prefill=prefill_artifact(4, 16))
    with pytest.raises(tcc.TccError, match="^not a prefill step: the graph carries no KV cache"):
        generate(artifact(), PROMPT, 4, prefill=tcc.compile(*zoo.build("llama-style")))


def test_sampling_is_seeded():
    """Sampling draws from a generator of its own: the same seed gives the same tokens, top-k 1
    is greedy, and a flat temperature gives other tokens than greedy."""
    a = artifact()
    first = generate(a, PROMPT, 10, temperature=0.9, top_k=20, seed=5).tokens
    assert torch.equal(first, generate(a, PROMPT, 10, temperature=0.9, top_k=20, seed=5).tokens)
    assert torch.equal(generate(a, PROMPT, 10, temperature=0.9, top_k=1, seed=7).tokens, generate(a, PROMPT, 10).tokens)
    assert not torch.equal(generate(a, PROMPT, 10, temperature=50.0, seed=1).tokens, generate(a, PROMPT, 10).tokens)


def test_eos_stops_generation():
    greedy = generate(artifact(), PROMPT, 10).new_tokens[0].tolist()
    stop = greedy[3]
    stopped = generate(artifact(), PROMPT, 10, eos_token_id=stop).new_tokens[0].tolist()
    assert stopped == greedy[:greedy.index(stop) + 1]


def test_the_accelerator_generates_bit_exact_with_the_quantized_reference():
    """fpga-small (int8 linears on the array, the rest on the host): every output of every step,
    logits and the four caches, agree on the ISA simulator and the numpy reference fed the same
    tokens (the array's integers bit for bit; the host's float ops within FLOAT_TIERS: BLAS may
    sum in another order on another layout); the tokens equal."""
    a = artifact("llama", "fpga-small")
    values = [np.zeros(t.shape, t.dtype.numpy) for _, t in a.graph.inputs]
    for position, token in enumerate([3, 17, 42, 99]):
        values[0], values[1] = np.array([[token]]), np.array([position])
        sim, ref = a.run_flat(values, "sim"), a.run_flat(values, "numpy")
        for name, s, r in zip(a.graph.outputs, sim, ref):
            assert_tiers_agree(s.numpy(), r.numpy(), f"{name} at position {position}")
        values[2:] = [o.numpy() for o in ref[1:]]
    assert a.executor("sim").stats.macs > 0
    assert generate(a, PROMPT, 6, on="sim").tokens.tolist() == generate(a, PROMPT, 6, on="numpy").tokens.tolist()


def test_the_accelerator_streams_each_weight_once_a_token():
    """Decode is bandwidth-bound: each section of the step moves its operands across DRAM once a
    run (no weight tile is fetched twice for the one token's row), the weights in their
    encoding (int8 on this array: their own bytes), most of the traffic."""
    program = artifact("llama", "fpga-small").accel_program()
    word = program.config.dram_bits // 8
    for section in program.sections:
        operands = (*section.inputs, *section.constants, *section.outputs)
        assert section.activity.dram_bits // 8 == word * sum(t.region.words for t in operands), section.ops
    weights = artifact("llama", "fpga-small").manifest["accel"]["weights"]
    streamed = sum(w["dram_bytes"] for w in weights)
    assert streamed == sum(w["encoded_bytes"] for w in weights)
    assert streamed > 0.5 * sum(s.activity.dram_bits // 8 for s in program.sections)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tcc: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate")
    artifact().save(path / "step")
    tcc.compile(*zoo.build("llama-style"), target="cpu").save(path / "forward")
    torch.save(PROMPT, path / "prompt.pt")
    return path


def test_inspect_shows_the_cache(saved, capsys):
    assert main(["inspect", str(saved / "step")]) == 0
    assert ("state:   key_cache_0 -> index_put (kv.key, layer 0, seq dim 2), value_cache_0 -> index_put_1 (kv.value, "
            "layer 0, seq dim 2)") in capsys.readouterr().out


def test_cli_generates_and_saves_tokens(saved, capsys):
    assert main(["generate", str(saved / "step"), "--input", str(saved / "prompt.pt"), "--max-new-tokens", "8",
                 "-o", str(saved / "tokens.pt")]) == 0
    out = capsys.readouterr().out
    assert "cpu: 8 new tokens after 5; time to first token " in out and "tokens/s" in out
    tokens = torch.load(saved / "tokens.pt", weights_only=True)
    assert tokens.tolist() == hf_greedy(decoder()[0], PROMPT, 8)
    assert out.splitlines()[0] == " ".join(map(str, tokens[0, 5:].tolist()))


@pytest.mark.parametrize("prompt, new, message", [
    ([[3, 17, 400]], 4, "prompt: token id 400 at position 2 (sequence 0) is outside the vocabulary [0, 128)"),
    ([[3, -1]], 4, "prompt: token id -1 at position 1 (sequence 0) is outside the vocabulary [0, 128)"),
    ([list(range(MAX_CACHE))], 1, f"a prompt of {MAX_CACHE} tokens and 1 new ones need {MAX_CACHE + 1} positions; "
                                   f"the cache holds {MAX_CACHE} (the prompt alone is too long)"),
    ([[3, 17]], MAX_CACHE, f"a prompt of 2 tokens and {MAX_CACHE} new ones need {MAX_CACHE + 2} positions; the cache "
                           f"holds {MAX_CACHE}"),
    ([[3, 17]], 0, "--max-new-tokens must be a positive integer, got 0"),
    ([[3, 17], [4, 18]], 2, "prompt: 2 sequences; the decode step was exported for batch 1"),
    ([[0.5, 2.0]], 2, "prompt: token ids are integers, got float32"),
])
def test_bad_generation_input_is_a_one_line_error(saved, capsys, prompt, new, message):
    torch.save(torch.tensor(prompt), saved / "bad.pt")
    err = _one_line_error(capsys, ["generate", str(saved / "step"), "--input", str(saved / "bad.pt"),
                                   "--max-new-tokens", str(new)])
    assert err == f"tcc: error: {message}"


def test_generating_with_a_model_without_a_cache_is_a_one_line_error(saved, capsys):
    err = _one_line_error(capsys, ["generate", str(saved / "forward"), "--input", str(saved / "prompt.pt"),
                                   "--max-new-tokens", "2"])
    assert "not a decode step: the graph carries no KV cache" in err


def test_a_cache_that_does_not_match_the_model_is_refused():
    """A graph whose cache has another batch than its tokens, or no written sequence dim."""
    graph = artifact().graph
    unwritten = graph.replace(state=tuple(dataclasses.replace(s, seq_dim=None) for s in graph.state))
    with pytest.raises(tcc.TccError, match="cache 'key_cache_0' .* does not match the model: no sequence dim"):
        DecodeStep.of(unwritten)


@pytest.mark.parametrize("change, message", [
    (lambda g: g.replace(state=g.state + (State("input_ids", 0),)), "state inputs come after the caller's inputs"),
    (lambda g: g.replace(state=(dataclasses.replace(g.state[0], output=0),) + g.state[1:]),
     "output 0 is not among the graph's last 4 of 5 outputs"),
    (lambda g: g.replace(state=(g.state[0], dataclasses.replace(g.state[1], output=1)) + g.state[2:]),
     "its input or output 1 is another state's too"),
    (lambda g: g.replace(state=(dataclasses.replace(g.state[0], input="value_cache_0"),) + g.state[1:]),
     "its input or output"),
    (lambda g: g.replace(state=(dataclasses.replace(g.state[0], seq_dim=4),) + g.state[1:]), "seq_dim 4 is outside"),
    (lambda g: g.replace(state=(dataclasses.replace(g.state[0], input="nothing"),) + g.state[1:]),
     "state 'nothing' is not a graph input"),
])
def test_the_verifier_checks_state(change, message):
    graph = artifact().graph
    with pytest.raises(VerifyError, match=message):
        verify(change(graph))


def test_state_whose_type_changes_in_a_step_is_refused():
    from tcc.ir import GraphBuilder, tensor

    def step(kept: int):  # a window: the cache followed by x, its first `kept` elements
        b = GraphBuilder("g")
        x, cache = b.input("x", tensor((2,))), b.input("cache", tensor((4,)))
        return b.finish([x, b.op("slice", b.op("cat", cache, x, dim=0), dim=0, end=kept)]).replace(
            state=(State("cache", 1),))

    verify(step(4))
    with pytest.raises(VerifyError, match=r"state 'cache' is f32\[4\] before a step and f32\[5\] after it"):
        verify(step(5))
