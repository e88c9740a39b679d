"""The Python API mirrors the CLI: tcc.compile -> Artifact -> save/load -> run on every executor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tcc
from conftest import EXECUTORS, ROOT, built, eager_outputs, max_relative_error


@pytest.mark.parametrize("on", EXECUTORS)
def test_compile_save_load_run(tmp_path, on):
    model, inputs = built("hf-bert")
    artifact = tcc.compile(model, inputs, target="gpu" if on == "gpu" else "cpu")
    loaded = tcc.load(artifact.save(tmp_path / "bert"))
    assert loaded.graph.same_as(artifact.graph)
    outputs = loaded.run(inputs, on=on)
    assert set(outputs) == {"last_hidden_state", "pooler_output"}
    tolerance = 1e-3 if on == "gpu" else 1e-5
    for key, expected in zip(outputs, eager_outputs(model, inputs)):
        assert max_relative_error(outputs[key], expected) < tolerance
    stored = loaded.run(on=on)  # the example inputs travel with the artifact
    assert torch.equal(stored["pooler_output"], outputs["pooler_output"])


def test_compile_graph_module_from_symbolic_trace():
    model, inputs = built("bert-style")
    traced = torch.fx.symbolic_trace(model)
    artifact = tcc.compile(traced, inputs)
    assert artifact.manifest["source"] == "fx.GraphModule"
    for actual, expected in zip(artifact.run(inputs), eager_outputs(model, inputs)):
        assert max_relative_error(actual, expected) < 1e-5


def test_compile_exported_program_and_errors():
    model, inputs = built("transformer-encoder")
    program = torch.export.export(model, inputs)
    artifact = tcc.compile(program)
    assert max_relative_error(artifact.run(inputs), eager_outputs(model, inputs)[0]) < 1e-5
    with pytest.raises(tcc.TccError, match="unknown target 'tpu'"):
        tcc.compile(program, target="tpu")
    with pytest.raises(tcc.TccError, match=r"input 'images': expected f32\[4,8,8\]"):
        artifact.run(torch.zeros(4, 8, 7))
    with pytest.raises(tcc.TccError, match="needs example_inputs"):
        tcc.compile(model)


def test_executors_free_each_value_after_its_last_use():
    """The schedule the executors run (`last_uses`): every value freed once, after its last use,
    never an output."""
    from tcc.ir.analysis import last_uses
    model, inputs = built("bert-style")
    graph = tcc.compile(model, inputs).graph
    frees = last_uses(graph)
    freed = [name for index in sorted(frees) for name in frees[index]]
    assert freed and len(freed) == len(set(freed)) and set(freed).isdisjoint(graph.outputs)
    for index, names in frees.items():
        assert all(name not in op.operands for op in graph.ops[index + 1:] for name in names)


@pytest.mark.slow  # 70 s: `make demo` runs it too
def test_demo_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path),
                             "--epochs", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    accuracy = float(result.stdout.split("eager test accuracy ")[1].split()[0])
    assert accuracy > 0.85  # real digits, really learned


def test_networkx_view_orders_the_dataflow():
    import networkx as nx
    model, inputs = built("bert-style")
    graph = tcc.compile(model, inputs).graph
    view = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(view)
    order = {name: i for i, name in enumerate(nx.topological_sort(view))}
    for op in graph.ops:
        assert all(order[o] < order[op.result] for o in op.operands)
    assert view.nodes[graph.ops[0].result]["kind"] == graph.ops[0].kind
