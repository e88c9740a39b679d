"""Every tier of a compiled model agrees (integer values bit for bit, floats from host ops within
the tiers' float tolerance): the quantized numpy reference, the ISA simulator, PyRTL simulation
and the generated Verilog in Verilator and Icarus; the ISA
simulator's cycles equal the RTL's exactly. Whole small zoo models run on every tier; the
larger ones run their first and their largest section alone on the RTL tiers."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

import tcc
from conftest import assert_tiers_agree, built, need
from tcc.backends.accel.codegen import EPILOGUE, generate, host_places
from tcc.backends.accel.isa import Buffer, Opcode, passes
from tcc.ir import DType
from tcc.runtime.rtl import run_icarus, run_pyrtl, run_verilator
from tcc.runtime.accel_executor import AccelExecutor, cycle_bound, simulate_section
from tcc.runtime.numpy_executor import NumpyExecutor


@lru_cache(maxsize=None)
def compiled(name: str, accel: str, pipeline: str | None = None):
    model, inputs = built(name)
    artifact = tcc.compile(model, inputs, target="fpga-small", accel=accel, pipeline=pipeline)
    return artifact, [artifact.example_inputs[n] for n in artifact.graph.input_names]


# the compressed and integer-only versions: HP sparse unit, binary unit, vector-unit nonlinearities
HP_INTEGER = "fold-constants,canonicalize,dce,hp-prune{sparsity=0.75},quantize,int-nonlinear"
W1A1 = "fold-constants,canonicalize,dce,binarize{mode=w1a1},quantize"
NONLINEAR_4X4 = "rows=4,cols=4,nonlinear_unit=1"  # fpga-small leaves the nonlinear datapaths out
INTEGER_CONV = "fold-constants,canonicalize,dce,conv-as-gemm,canonicalize,dce,quantize,int-nonlinear"


def layers_apart(artifact):
    """The artifact's program with each layer's sections its own (`generate(chained=False)`):
    what a layer's own sections hold, and programs that run alone."""
    return generate(artifact.graph, artifact.accel_program().config, chained=False)


def assert_sim_matches_reference(graph, program, inputs) -> None:
    """The whole model on the ISA simulator equals the numpy reference."""
    for expected, got in zip(NumpyExecutor(graph)(*inputs), AccelExecutor(graph, program)(*inputs)):
        assert_tiers_agree(got, expected)


def assert_rtl_matches_sim(runner, section, config, dram, note: str = "") -> None:
    """One section's program on an RTL tier (`runner`): the ISA simulator's DRAM and cycles."""
    expected, cycles = simulate_section(section, config, dram, cycle_bound(section, config))
    out, rtl_cycles = runner(section, config, dram, cycle_bound(section, config))
    assert rtl_cycles == cycles and bytes(out)[:len(expected)] == expected, note


def assert_same_run(name: str, accel: str, run_section, pipeline: str | None = None) -> None:
    artifact, inputs = compiled(name, accel, pipeline)
    reference = NumpyExecutor(artifact.graph)(*inputs)
    sim = AccelExecutor(artifact.graph, artifact.accel_program())
    rtl = AccelExecutor(artifact.graph, artifact.accel_program(), run_section)
    for expected, on_sim, on_rtl in zip(reference, sim(*inputs), rtl(*inputs)):
        assert_tiers_agree(on_sim, expected)
        assert_tiers_agree(on_rtl, expected)
    assert rtl.stats.section_cycles == sim.stats.section_cycles
    assert rtl.stats.cycles == sim.stats.cycles > 0


@pytest.mark.parametrize("runner, tool", [(run_pyrtl, None), (run_icarus, "iverilog")])
def test_a_calls_layers_run_as_one_program_on_every_tier(runner, tool):
    """Three integer linears (relus between) that chain on chip: one call, one program (`codegen.chain`) that
    hands each layer's output to the next through DRAM (a store, then a load waiting for it:
    st2ld) and runs a layer's loads and products while the one before still finishes: fewer
    cycles than the layers one after another. The ISA simulator equals the numpy reference and
    the RTL the simulator, cycles included."""
    if tool:
        need(tool)
    import torch
    from tcc.backends.accel.isa import Token
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 8)).eval()
    x = torch.randn(12, 16)
    artifact = tcc.compile(model, (x,), target="fpga-small", accel="rows=4,cols=4",
                           pipeline="quantize,int-nonlinear")  # the relus integer: requantize's
    program, graph, inputs = artifact.accel_program(), artifact.graph, [x.numpy()]
    (section,) = program.sections
    assert section.note.count("; ") == 2  # the three layers' sections, chained
    assert any(i.signal >> Token.ST2LD & 1 for i in section.program)
    apart = generate(graph, program.config, chained=False)
    assert len(apart.sections) == 3 and section.cycles < sum(s.cycles for s in apart.sections)
    assert_sim_matches_reference(graph, program, inputs)
    prog, dram = AccelExecutor(graph, program).section_runs(*inputs, first=1)[0]
    assert_rtl_matches_sim(runner, prog, program.config, dram, section.note)


def test_whole_model_on_pyrtl():
    assert_same_run("bert-style", "rows=4,cols=4", run_pyrtl)


@pytest.mark.parametrize("name", ["bert-style", "transformer-encoder"])
def test_whole_model_on_verilator(name):
    need("verilator")
    assert_same_run(name, "rows=4,cols=4", run_verilator)


@pytest.mark.parametrize("pipeline, units", [(HP_INTEGER, {"spgemm", "spload", "vsoftmax", "vlayernorm", "vresadd",
                                                          "tload", "sstore"}),
                                             (W1A1, {"bgemm"})])
def test_whole_compressed_integer_model_on_verilator(pipeline, units):
    """HP-pruned with the whole encoder integer (attention, softmax, residual adds, layer norms
    on the accelerator, the layers chained on chip by tload and sstore, the HP weights loaded
    compact by spload), and binarized W1A1:
    every tier agrees, cycles included."""
    need("verilator")
    artifact, inputs = compiled("transformer-encoder", NONLINEAR_4X4, pipeline)
    run = AccelExecutor(artifact.graph, artifact.accel_program())
    run(*inputs)
    assert units <= set(run.stats.instructions)
    assert_same_run("transformer-encoder", NONLINEAR_4X4, run_verilator, pipeline)


@pytest.mark.parametrize("runner, tool, steps", [(run_pyrtl, None, 2), (run_icarus, "iverilog", 2),
                                                 (run_pyrtl, None, 8),
                                                 pytest.param(run_verilator, "verilator", 1, marks=pytest.mark.slow)])
def test_a_softmax_and_a_layer_norm_section_alone(runner, tool, steps):
    """The row ops on the RTL tiers, cycles included, with the divider and square root at
    `divider_steps` iterations a cycle (the ISA's row costs follow: 6n + 83 at 2, 6n + 23 at 8)."""
    if tool:
        need(tool)
    artifact, inputs = compiled("transformer-encoder", f"{NONLINEAR_4X4},divider_steps={steps}", HP_INTEGER)
    program, config = layers_apart(artifact), artifact.accel_program().config
    assert passes(config)[Opcode.VLAYERNORM] == (6, {1: 162, 2: 83, 8: 23}[steps])
    assert passes(config)[Opcode.VSOFTMAX] == (3, {1: 70, 2: 38, 8: 14}[steps])
    runs = AccelExecutor(artifact.graph, program).section_runs(*inputs)
    for op in (Opcode.VSOFTMAX, Opcode.VLAYERNORM):
        section = next(i for i, s in enumerate(program.sections) if any(ins.op is op for ins in s.program))
        prog, dram = runs[section]
        assert_rtl_matches_sim(runner, prog, config, dram, program.sections[section].note)


@pytest.mark.parametrize("runner, tool", [(run_pyrtl, None), (run_verilator, "verilator")])
def test_a_pre_norm_residual_section_alone(runner, tool):
    """ViT's pre-norm residual add: the i16 stream read from PBUF (a wide vresadd), the next
    stream stored from PBUF beside the norm's rows; the same on the RTL tiers, cycles included."""
    if tool:
        need(tool)
    artifact, inputs = compiled("hf-vit", NONLINEAR_4X4, HP_INTEGER)
    program, config = layers_apart(artifact), artifact.accel_program().config
    wide = [i for i, s in enumerate(program.sections)
            if any(ins.op is Opcode.VRESADD and ins["wide"] for ins in s.program)
            and any(ins.op is Opcode.STORE and ins["buf"] == Buffer.PBUF for ins in s.program)]
    assert wide
    prog, dram = AccelExecutor(artifact.graph, program).section_runs(*inputs, first=wide[0] + 1)[wide[0]]
    assert_rtl_matches_sim(runner, prog, config, dram, program.sections[wide[0]].note)


@pytest.mark.parametrize("runner, tool", [(run_pyrtl, None),
                                          pytest.param(run_verilator, "verilator", marks=pytest.mark.slow)])
def test_the_embeddings_sum_on_chip(runner, tool):
    """Hugging Face BERT's embeddings: the token rows gathered from the table quantized to i8 (the
    host's indexed copy into the transfer: addressing), the position and token-type embeddings a
    constant in the DRAM image that the vector unit's residual add reads, then the layer norm:
    the first layer. Left to the host: conversions in the transfers and, in the read-back's loop
    after them, the pooler's tanh (no op of its own). The
    whole model on the ISA simulator equals the numpy reference; the first layer's section
    alone, the same on the RTL tiers, cycles included."""
    if tool:
        need(tool)
    artifact, inputs = compiled("hf-bert", NONLINEAR_4X4, HP_INTEGER)
    program, config, graph = artifact.accel_program(), artifact.accel_program().config, artifact.graph
    kinds = {op.result: op.kind for op in graph.ops}
    apart = layers_apart(artifact)
    first = apart.sections[0]
    assert {kinds[r] for r in first.ops} == {"cast", "add", "requantize", "int_layer_norm"}
    assert [t.values[0] for t in first.inputs] == ["embedding.i"]
    assert any(t.values[0] in graph.weights and graph.types[t.values[0]].dtype is DType.I32 for t in first.constants)
    host = {h.kind for h in program.host_ops if not h.moved and not h.converted}
    assert not host and {h.kind for h in program.host_ops if h.moved} >= {"embedding"}
    assert {h.kind: h.reason for h in program.host_ops}["tanh"] == EPILOGUE
    assert_sim_matches_reference(graph, program, inputs)
    prog, dram = AccelExecutor(graph, apart).section_runs(*inputs, first=1)[0]
    assert_rtl_matches_sim(runner, prog, config, dram, first.note)


@pytest.mark.parametrize("name, epilogue", [("transformer-encoder", {"mean"}), ("hf-bert", {"select", "tanh"})])
def test_a_head_after_pooling_runs_in_the_layers_call(name, epilogue):
    """pool-late (the FPGA targets' default): the digits encoder's classifier after its mean over
    tokens, BERT's pooler after the [CLS] rows of a batch of two, run on every row in the
    encoder's call: one call, and the pooling (with the tanh after it) is the host's read-back
    epilogue, no op of its own. The whole model on the ISA simulator equals the numpy reference."""
    artifact, inputs = compiled(name, NONLINEAR_4X4, INTEGER_CONV.replace("conv-as-gemm,", "conv-as-gemm,pool-late,"))
    program, graph = artifact.accel_program(), artifact.graph
    assert len(program.calls()) == 1
    assert not [h for h in program.host_ops if not h.moved and not h.converted]
    assert {h.kind for h in program.host_ops if h.reason == EPILOGUE} == epilogue
    assert_sim_matches_reference(graph, program, inputs)


@pytest.mark.parametrize("runner, tool", [(run_pyrtl, None),
                                          pytest.param(run_verilator, "verilator", marks=pytest.mark.slow)])
def test_positions_added_after_the_input_projection(runner, tool):
    """The digits encoder's `embed(images) + position` (post-norm: the sum feeds the first layer,
    no norm): quantize gives the projection and the sum one step, int-nonlinear makes the add a
    saturating integer add of the positions' integers, and the section adds them with `vadd`
    after requantize (the position tiles loaded beside the outputs): no op between calls but
    the mean pooling. The ISA simulator equals the numpy reference; the first layer's section
    alone, the same on the RTL tiers, cycles included."""
    if tool:
        need(tool)
    import torch
    from tcc.zoo import DigitsTransformer
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    with torch.no_grad():
        model.position.normal_(0, 0.5)
    _, inputs = built("transformer-encoder")
    artifact = tcc.compile(model, inputs, target="fpga-small", accel=NONLINEAR_4X4, pipeline=INTEGER_CONV)
    program, config, graph = artifact.accel_program(), artifact.accel_program().config, artifact.graph
    x = [artifact.example_inputs[n] for n in graph.input_names]
    kinds = {op.result: op.kind for op in graph.ops}
    apart = layers_apart(artifact)
    first = apart.sections[0]
    assert [kinds[r] for r in first.ops] == ["linear", "requantize", "cast", "add", "requantize"]
    assert any(ins.op is Opcode.VADD for ins in first.program)
    addend = np.asarray(graph.weights[next(o for o in graph.producer()[first.ops[3]].operands if o in graph.weights)])
    assert np.count_nonzero(addend) > addend.size // 2  # the test would miss a misplaced zero tile
    places = host_places(graph, program)
    assert {kinds[h] for h, where in places.items() if where == "between"} <= {"mean", "dequantize", "quantize"}
    assert_sim_matches_reference(graph, program, x)
    prog, dram = AccelExecutor(graph, apart).section_runs(*x, first=1)[0]
    assert_rtl_matches_sim(runner, prog, config, dram, first.note)


def test_a_reordered_input_and_its_positions():
    """A linear reading a sequence-first view of the layer before it (`transpose(0, 1)`) and
    adding positions: it reads the source as it lies, its rows come out in that order
    (`DramTensor.rows`), the positions' tiles follow them, and the next linear reads its output
    in place: one call, and the ISA simulator equals the numpy reference."""
    import torch

    class SequenceFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
            self.positions = torch.nn.Parameter(0.5 * torch.randn(3, 1, 32))

        def forward(self, x):
            return self.c(self.b(self.a(x).transpose(0, 1)) + self.positions)

    torch.manual_seed(0)
    model, x = SequenceFirst().eval(), torch.randn(4, 3, 16)
    artifact = tcc.compile(model, (x,), target="fpga-small", accel=NONLINEAR_4X4,
                           pipeline="fold-constants,canonicalize,dce,quantize,int-nonlinear")
    program, graph = artifact.accel_program(), artifact.graph
    second = layers_apart(artifact).sections[1]
    assert "transpose.i" in second.ops and "add.sum" in second.ops and second.outputs[0].rows
    assert len(program.calls()) == 1 and {h.kind for h in program.host_ops} == {"quantize", "dequantize"}
    inputs = [artifact.example_inputs[n] for n in graph.input_names]
    assert_sim_matches_reference(graph, program, inputs)


def test_the_class_token_and_positions_on_chip():
    """ViT's embeddings: the class token (a constant at the patch projection's step) and the
    patches' rows laid out by the host's transfer (an integer cat: addressing), the position
    embeddings a constant operand of the vector unit's residual add: no float op between calls,
    and the ISA simulator equals the numpy reference."""
    artifact, inputs = compiled("hf-vit", NONLINEAR_4X4, INTEGER_CONV)
    program, graph = artifact.accel_program(), artifact.graph
    places = host_places(graph, program)
    assert "between" not in places.values()
    assert "cat" in {h.kind for h in program.host_ops if h.moved}
    assert_sim_matches_reference(graph, program, inputs)


@pytest.mark.parametrize("runner, tool", [(run_pyrtl, None), (run_verilator, "verilator")])
def test_a_masked_softmax_section_alone(runner, tool):
    """Hugging Face BERT's padding mask, from its `attention_mask` input: Q K^T -> int_softmax(scores, mask)
    on the accelerator (the mask rows loaded beside the scores), the same on the RTL tiers."""
    if tool:
        need(tool)
    artifact, inputs = compiled("hf-bert", NONLINEAR_4X4, HP_INTEGER)
    program, config = layers_apart(artifact), artifact.accel_program().config
    masked = [i for i, s in enumerate(program.sections)
              if any(ins.op is Opcode.VSOFTMAX and ins["masked"] for ins in s.program)]
    assert masked and not [h for h in program.host_ops if h.kind in ("matmul", "int_softmax")]
    prog, dram = AccelExecutor(artifact.graph, program).section_runs(*inputs, first=masked[0] + 1)[masked[0]]
    assert_rtl_matches_sim(runner, prog, config, dram, program.sections[masked[0]].note)


@pytest.mark.parametrize("runner, tool", [(run_icarus, "iverilog"), (run_pyrtl, None)])
def test_first_section_of_a_model_alone(runner, tool):
    if tool:
        need(tool)
    artifact, inputs = compiled("transformer-encoder", "rows=4,cols=4")
    config = artifact.accel_program().config
    program, dram = AccelExecutor(artifact.graph, artifact.accel_program()).section_runs(*inputs)[0]
    assert_rtl_matches_sim(runner, program, config, dram)


@pytest.mark.parametrize("name", ["transformer-encoder", "hf-distilbert", "hf-vit",  # the larger two: slow tier
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("tinybert4", "hf-bert"))])
def test_first_and_largest_sections_on_verilator(name):
    need("verilator")
    artifact, inputs = compiled(name, "rows=8,cols=8")
    config = artifact.accel_program().config
    runs = AccelExecutor(artifact.graph, artifact.accel_program()).section_runs(*inputs)
    largest = max(runs, key=lambda run: cycle_bound(run[0], config))
    for program, dram in {id(r): r for r in (runs[0], largest)}.values():
        assert_rtl_matches_sim(run_verilator, program, config, dram)


@pytest.mark.slow  # TinyBERT-4 fully integer on the 4x4 design with the nonlinear unit in Verilator: minutes
def test_heads_read_in_place_on_verilator():
    """TinyBERT-4's heads (26 channels on 4 lanes) read in place: the scores section's tloads
    of Q's heads (the GEMM shifted into the slot) and of K^T into BBUF, and the out-projection's
    head merge (a tload per head): Verilator equals the ISA simulator, cycles included."""
    need("verilator")
    artifact, inputs = compiled("tinybert4", NONLINEAR_4X4, "fold-constants,canonicalize,dce,quantize,int-nonlinear")
    program = layers_apart(artifact)
    config = program.config
    runs = AccelExecutor(artifact.graph, program).section_runs(*inputs)
    wanted = {"scaled_dot_product_attention.probs.i", "linear_3.q"}  # the first layer's scores; its out-projection
    checked = 0
    for (section, dram), meta in zip(runs, program.sections):
        if wanted & set(meta.ops):
            wanted -= set(meta.ops)
            tloads = [i for i in section if i.op is Opcode.TLOAD]
            shifted = [i for i in section if i.op is Opcode.GEMM and i["a"] % config.rows]  # a head's first word
            assert tloads and (shifted or any(i["addr"] % config.rows for i in tloads))  # heads not whole tiles
            assert_rtl_matches_sim(run_verilator, section, config, dram)
            checked += 1
    assert checked == 2


@pytest.mark.parametrize("name", ["speech-transformer", "whisper-encoder"])
def test_a_conv_front_end_is_addressing_and_exact(name):
    """A speech model's conv subsampling (relu; Whisper's: GELU) on fpga-medium's pipeline
    (conv-as-gemm, then canonicalize: each conv's relu follows its linear; the im2col taps
    quantized at their source, the activation before them at the taps' scale): the taps (zero
    pad, strided slices, cat) are integer layout ops the host's transfer does, no op of their
    own. No op is left between calls: the position embeddings are added on chip, after the
    last conv's requantize and relu by `vadd` where the sum feeds the first layer (post-norm:
    the speech model's), as a constant operand of the vector unit's residual add where a layer
    norm reads it (Whisper, pre-norm). The ISA simulator equals the numpy reference."""
    model, inputs = built(name)
    artifact = tcc.compile(model, inputs, target="fpga-medium")
    program = artifact.accel_program()
    places = host_places(artifact.graph, program)
    kinds = {op.result: op.kind for op in artifact.graph.ops}
    moved = {kinds[h.result] for h in program.host_ops if places[h.result] == "addressing"}
    between = sorted(kinds[h.result] for h in program.host_ops if places[h.result] == "between")
    assert {"pad", "slice", "cat"} <= moved
    assert between == []
    assert any(ins.op is Opcode.VADD for s in program.sections for ins in s.program) == (name == "speech-transformer")
    assert {"int_softmax", "int_layer_norm"} <= set(kinds.values()) and "softmax" not in kinds.values()
    x = [artifact.example_inputs[n] for n in artifact.graph.input_names]
    assert_sim_matches_reference(artifact.graph, program, x)


def test_p_v_writes_its_heads_where_the_merge_puts_them():
    """ViT's P V (17 rows a head: the out-projection's row blocks span two images) writes each
    head's rows into the merged tensor, a run of channel blocks per head: the head merge is
    neither a host op nor a call boundary, the out-projection reads it as plain activations, and
    a P V section alone gives the same DRAM and cycles on Verilator as on the ISA simulator."""
    need("verilator")
    artifact, inputs = compiled("hf-vit", NONLINEAR_4X4, INTEGER_CONV)
    program, apart = artifact.accel_program(), layers_apart(artifact)
    producer = artifact.graph.producer()
    merged = [s for s in apart.sections if any(producer[r].kind == "matmul" for r in s.ops)
              and producer[s.outputs[0].values[0]].kind == "reshape"]
    assert merged and all(s.outputs[0].shape == (2 * 17, 64) for s in merged)

    def merges_heads(value: str) -> bool:  # a transpose or reshape of P V's requantized product
        while producer[value].kind in ("transpose", "reshape"):
            value = producer[value].operands[0]
        return producer[value].kind == "requantize" and producer[producer[value].operands[0]].kind == "matmul"

    assert not [h for h in program.host_ops if producer[h.result].kind in ("transpose", "reshape")
                and merges_heads(h.result)]
    assert_sim_matches_reference(artifact.graph, program, inputs)
    config = program.config
    runs = AccelExecutor(artifact.graph, apart).section_runs(*inputs)
    section, dram = next(run for run, meta in zip(runs, apart.sections) if meta is merged[-1])
    assert_rtl_matches_sim(run_verilator, section, config, dram)


W1A8 = "fold-constants,canonicalize,dce,binarize{mode=w1a8},quantize,int-nonlinear"


@pytest.mark.parametrize("group", [4, pytest.param(2, marks=pytest.mark.slow)])
def test_a_w1a8_model_on_the_w1a8_unit(group):
    """binarize{mode=w1a8}: its +-1 weights run on the W1A8 unit (wgemm: G signs a weight lane,
    G activation words a step), the whole model on the ISA simulator equal to numpy, a wgemm
    section on PyRTL equal to the ISA simulator, cycles included; the linears' array steps K / G
    of the int8 array's (its weights as +-1 on the multipliers without the unit)."""
    accel = f"rows=4,cols=4,nonlinear_unit=1,binary_weight_group={group},abuf_banks=4"
    artifact, inputs = compiled("transformer-encoder", accel, W1A8)
    program, config = artifact.accel_program(), artifact.accel_program().config
    assert_sim_matches_reference(artifact.graph, program, inputs)
    apart = layers_apart(artifact)
    signed = [i for i, s in enumerate(apart.sections) if any(ins.op is Opcode.WGEMM for ins in s.program)]
    assert len(signed) >= 6  # the binarized linears but the input projection and the head
    prog, dram = AccelExecutor(artifact.graph, apart).section_runs(*inputs, first=signed[0] + 1)[signed[0]]
    assert_rtl_matches_sim(run_pyrtl, prog, config, dram, apart.sections[signed[0]].note)
    plain, _ = compiled("transformer-encoder", accel.replace(f"binary_weight_group={group}", "binary_weight_group=0"),
                        W1A8)

    def steps(p, op):
        return sum(ins["k"] for i in signed for ins in p.sections[i].program if ins.op is op)
    assert steps(apart, Opcode.WGEMM) * group == steps(layers_apart(plain), Opcode.GEMM)
