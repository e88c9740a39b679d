"""Fuzzing the readers of untrusted text and bytes: each raises only its documented error type,
never IndexError, KeyError, ValueError, RecursionError or the like.

- the IR text parser (`parse_graph`): `ParseError`, on arbitrary text, on random mutations of
  printed graphs (characters inserted, deleted or replaced, truncation, lines swapped, dropped
  or doubled, IR tokens inserted), and on arbitrary bytes decoded leniently; a text it accepts
  prints to text it parses back to the same graph;
- the accelerator ISA (`decode`, `from_binary`, `parse_assembly`): `ValueError`, on any integer,
  bytes or text; what they accept encodes back to the same word, binary or instructions;
- an artifact's loader (`tcc.load`, and for an FPGA artifact `Artifact.accel_program`):
  `TccError`, whatever bytes a file holds (its hash updated, as a deliberate edit would).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcc
from tcc.backends.accel.isa import (INSTRUCTION_BITS, MAGIC, VERSION, decode, from_binary, parse_assembly,
                                    to_assembly, to_binary)
from tcc.ir import ParseError, parse_graph, print_graph
from tcc.ir.errors import TccError
from test_accel_isa import instructions
from test_ir_roundtrip import graphs

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
TINY = Path(__file__).resolve().parent / "bad_inputs" / "tiny.pt2"

# a graph with what random graphs seldom hold: encodings, sparsity, both quantizations, strings
SAMPLE = """\
graph @main(%x: f32[2,3], %q: i8[3] !q(scale=0.5, zp=0), %r: i8[2,3] !q(axis=0, scales=[0.5, 0.25], zps=[0, 0])) {
  const @w : f32[4,3] #hp(2, 2, 1) ~hp(2, 2, 1)
  const @b : i8[4,3] #bsr(2, 2) ~blocks(2, 2)
  %y = linear(%x, @w) : f32[2,4]
  %p = softmax(%y) {dim = -1} : f32[2,4]
  %g = gelu(%p) {approximate = "tanh"} : f32[2,4]
  %c = cast(%g) {dtype = i64} : i64[2,4]
  %f = full() {shape = [2], value = 1.5e-3, dtype = f32} : f32[2]
  return %p, %c, %f
}
"""
TOKENS = ["%x", "%y", "@w", "{", "}", "[", "]", "(", ")", ",", ":", "=", "#", "!", "~", "->", "#csr", "#hp(2, 2, 1)",
          "~nm(2, 4)", "!q(scale=0.5, zp=0)", "!q(axis=0, scales=[0.5], zps=[0])", "!q(scale=nan, zp=1e400)",
          "f32[2,3]", "i8", "b1", "bool", "99999999999999999999", "-1", "0", "1e400", "nan", "-inf", '"tanh"',
          '"\\q"', '"\\u12"', "none", "true", "linear", "softmax", "reshape", "return", "graph", "const", "\n",
          "// c", "\t", "\r", "\x00", "é"]


def _mutate(draw, data: str | bytes) -> str | bytes:
    """`data` after 1 to 4 random edits: a character (byte) inserted, deleted or replaced, the
    end cut off, two lines swapped, a line dropped or doubled, an IR token inserted."""
    text = isinstance(data, str)
    unit = st.characters() if text else st.binary(min_size=1, max_size=1)
    newline = "\n" if text else b"\n"
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "swap", "drop", "double", "token"]))
        if edit == "insert":
            data = data[:at] + draw(unit) + data[at:]
        elif edit == "delete":
            data = data[:at] + data[at + 1:]
        elif edit == "replace":
            data = data[:at] + draw(unit) + data[at + 1:]
        elif edit == "truncate":
            data = data[:at]
        elif edit == "token":
            token = draw(st.sampled_from(TOKENS))
            data = data[:at] + (token if text else token.encode()) + data[at:]
        else:
            lines = data.split(newline)
            i, j = (draw(st.integers(0, len(lines) - 1)) for _ in range(2))
            if edit == "swap":
                lines[i], lines[j] = lines[j], lines[i]
            elif edit == "drop":
                del lines[i]
            else:
                lines.insert(i, lines[j])
            data = newline.join(lines)
    return data


@st.composite
def mutated_texts(draw) -> str:
    base = draw(st.one_of(st.just(SAMPLE), graphs().map(print_graph)))
    return _mutate(draw, base)


def _parses_or_fails_cleanly(text: str, weights=None) -> None:
    """`parse_graph(text)` raises ParseError or gives a graph that prints and parses back."""
    try:
        graph = parse_graph(text, weights)
    except ParseError:
        return
    assert parse_graph(print_graph(graph), weights) == graph


# ---------------------------------------------------------------------------------------------
# the IR text parser

def test_the_sample_is_a_graph():
    graph = parse_graph(SAMPLE)
    assert parse_graph(print_graph(graph)) == graph


@FUZZ
@given(st.text())
def test_parser_on_arbitrary_text(text):
    _parses_or_fails_cleanly(text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS + ["graph @main(", ") {", "  return %x", "}\n"]), max_size=40)
       .map(" ".join))
def test_parser_on_token_soup(text):
    _parses_or_fails_cleanly(text)


@FUZZ
@given(mutated_texts())
def test_parser_on_mutated_graphs(text):
    _parses_or_fails_cleanly(text)


@FUZZ
@given(st.data())
def test_parser_on_mutated_graphs_with_their_weights(data):
    graph = data.draw(graphs())
    _parses_or_fails_cleanly(_mutate(data.draw, print_graph(graph)), graph.weights)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_parser_on_bytes_decoded_leniently(data, encoding):
    _parses_or_fails_cleanly(data.decode(encoding, errors="replace"))


@FUZZ
@given(st.data())
def test_parser_on_mutated_bytes_decoded_leniently(data):
    raw = data.draw(st.one_of(st.just(SAMPLE), graphs().map(print_graph))).encode()
    _parses_or_fails_cleanly(_mutate(data.draw, raw).decode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------------
# the instruction decoder, the program binary and the assembly

WORD_BYTES = INSTRUCTION_BITS // 8


@FUZZ
@given(st.one_of(st.integers(-(1 << 140), 1 << 140), st.integers(0, (1 << INSTRUCTION_BITS) - 1)))
def test_decode_on_any_integer(word):
    try:
        instruction = decode(word)
    except ValueError:
        return
    assert instruction.encode() == word
    assert parse_assembly(instruction.text()) == (instruction,)


def _binary_round_trips(data: bytes) -> None:
    try:
        program = from_binary(data, "program.bin")
    except ValueError as e:
        assert str(e).startswith("program.bin: ")
        return
    assert to_binary(program) == data


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.binary(min_size=WORD_BYTES, max_size=WORD_BYTES), max_size=8).map(
                     lambda words: MAGIC + VERSION.to_bytes(4, "little") + len(words).to_bytes(4, "little")
                     + b"".join(words))))
def test_program_binary_on_any_bytes(data):
    _binary_round_trips(data)


@FUZZ
@given(st.data())
def test_program_binary_on_mutated_programs(data):
    program = data.draw(st.lists(instructions(), max_size=8))
    _binary_round_trips(_mutate(data.draw, to_binary(program)))


def _assembly_round_trips(text: str) -> None:
    try:
        program = parse_assembly(text, "program.s")
    except ValueError as e:
        assert str(e).startswith("program.s:")
        return
    assert parse_assembly(to_assembly(program)) == program


@FUZZ
@given(st.text())
def test_assembly_on_arbitrary_text(text):
    _assembly_round_trips(text)


@FUZZ
@given(st.data())
def test_assembly_on_mutated_listings(data):
    program = data.draw(st.lists(instructions(), min_size=1, max_size=8))
    _assembly_round_trips(_mutate(data.draw, to_assembly(program, {0: "section 0"})))


# ---------------------------------------------------------------------------------------------
# the artifact loader

ARTIFACT_FILES = ["graph.tcc", "weights.safetensors", "example_inputs.npz"]
ACCEL_FILES = ["accel/program.bin", "accel/program.s", "accel/sections.json", "accel/dram.bin"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Artifacts of tests/bad_inputs/tiny.pt2 with weights in several encodings, quantized,
    and for fpga-small."""
    root = tmp_path_factory.mktemp("fuzz-artifacts")
    pipelines = {f: f"select-format{{format={f}}}" for f in ("coo", "csr", "bitmap", "hp")}
    built = {name: tcc.compile(TINY, pipeline=p).save(root / name) for name, p in pipelines.items()}
    built["int8"] = tcc.compile(TINY, pipeline="quantize").save(root / "int8")
    built["fpga"] = tcc.compile(TINY, target="fpga-small").save(root / "fpga")
    return built


def _copy(source: Path, work: Path, edits: dict[str, bytes]) -> Path:
    """`work`: artifact `source` with the files `edits` names holding new bytes (the others
    hard links to the originals, which stay as they are)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work, copy_function=os.link)
    for name, data in edits.items():
        (work / name).unlink()
        (work / name).write_bytes(data)
    return work


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_artifact_loader_on_mutated_files(artifacts, tmp_path, data):
    kind = data.draw(st.sampled_from(sorted(artifacts)))
    name = data.draw(st.sampled_from(ARTIFACT_FILES + (ACCEL_FILES if kind == "fpga" else [])))
    edited = _mutate(data.draw, (artifacts[kind] / name).read_bytes())
    manifest = json.loads((artifacts[kind] / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(edited).hexdigest()
    work = _copy(artifacts[kind], tmp_path / "work", {name: edited, "manifest.json": json.dumps(manifest).encode()})
    try:
        artifact = tcc.load(work)
        if kind == "fpga":
            artifact.accel_program()
    except TccError:
        pass


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_artifact_loader_on_mutated_manifests(artifacts, tmp_path, data):
    """The manifest edited as JSON: values replaced by others of any JSON type, keys dropped."""
    source = artifacts[data.draw(st.sampled_from(sorted(artifacts)))]
    manifest = json.loads((source / "manifest.json").read_text())
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(), inner, max_size=3), max_leaves=5)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(manifest)))
        if data.draw(st.booleans()):
            del manifest[key]
            if not manifest:
                break
        else:
            manifest[key] = data.draw(json_values)
    work = _copy(source, tmp_path / "work", {"manifest.json": json.dumps(manifest).encode()})
    try:
        tcc.load(work)
    except TccError:
        pass
