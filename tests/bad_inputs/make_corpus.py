"""Writes the bad-input corpus beside this file (see README.md). Run from the repository root:

    .venv/bin/python tests/bad_inputs/make_corpus.py

The files are committed; this script documents how they were made and remakes them."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
MARKER = "PICKLE_PAYLOAD_RAN"  # the file the pickle's payload creates (in the working directory) when loaded


class Tiny(nn.Module):
    """The smallest model worth compiling: one linear layer and a ReLU on a 1x8x8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class Unsupported(nn.Module):
    """A model using two ops tcc has no converter for, on its input (nothing to fold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=-1).values + torch.fmod(x, 2.0)


class Payload:
    """Unpickling this object opens (creates) `MARKER`: code from the file running."""

    def __reduce__(self):
        return open, (MARKER, "w")


def tiny(poison: float | None = None) -> Tiny:
    """`Tiny` with fixed weights; `poison` (NaN, Inf) written into weight [1, 2]."""
    torch.manual_seed(0)
    model = Tiny().eval()
    if poison is not None:
        with torch.no_grad():
            model.fc.weight[1, 2] = poison
    return model


PAYLOAD_MODULE = "tcc_payload_module"  # tcc_payload_module.py: importing it creates MARKER


def _pickled_payload() -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    return buffer.getvalue()


def rewrite_archive(source: Path, target: Path, edits: dict[str, bytes | Callable[[bytes], bytes]]) -> None:
    """Copy the torch.export archive `source` to `target` with members replaced: `edits` maps a
    member's name under the archive's root folder to its new bytes (or a function of the old)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        root = zin.namelist()[0].split("/")[0] + "/"
        names = [n[len(root):] for n in zin.namelist()]
        for name in dict.fromkeys(names + list(edits)):
            old = zin.read(root + name) if name in names else b""
            edit = edits.get(name, old)
            zout.writestr(root + name, edit(old) if callable(edit) else edit)


def _edit_json(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(old: bytes) -> bytes:
        value = json.loads(old)
        change(value)
        return json.dumps(value).encode()
    return edit


def _weight_config(**meta) -> Callable[[bytes], bytes]:
    """fc.weight's entry of the weights config updated with `meta`."""
    return _edit_json(lambda config: config["config"]["fc.weight"].update(meta))


def _constant(path_name: str) -> Callable[[bytes], bytes]:
    """A constants config naming one pickled constant stored at `path_name`."""
    def change(config: dict) -> None:
        config["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
    return _edit_json(change)


def _out_spec(type_name: str) -> Callable[[bytes], bytes]:
    """The program's output spec made an instance of the pytree type `type_name`."""
    leaf = {"type": None, "context": None, "children_spec": []}
    spec = json.dumps([1, {"type": type_name, "context": "null", "children_spec": [leaf]}])
    return _edit_json(lambda program: program["graph_module"]["module_call_graph"][0]["signature"].update(
        out_spec=spec))


def _symbolic_size(expression: str) -> Callable[[bytes], bytes]:
    """The input's first dimension made the symbolic expression `expression`."""
    return _edit_json(lambda program: program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"].__setitem__(
        0, {"as_expr": {"expr_str": expression, "hint": {"as_int": 1}}}))


def _call(target: str, argument: str) -> Callable[[bytes], bytes]:
    """A node calling `target` with the string `argument` before the model's first node."""
    def change(program: dict) -> None:
        node = {"target": target, "inputs": [{"name": "name", "arg": {"as_string": argument}, "kind": 1}],
                "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None}
        program["graph_module"]["graph"]["nodes"].insert(0, node)
    return _edit_json(change)


def _expanded_inputs() -> bytes:
    """Sample inputs whose one tensor is a stride-0 view of 10^10 elements (a few bytes stored)."""
    buffer = io.BytesIO()
    torch.save(((torch.zeros(1).expand(10**10),), {}), buffer)
    return buffer.getvalue()


# Malicious torch.export archives made from tiny.pt2: name -> (edits, whether torch.export.load
# (then running the program) runs the payload; the tests check that it does).
WEIGHTS_CONFIG, CONSTANTS_CONFIG = "data/weights/model_weights_config.json", "data/constants/model_constants_config.json"
MODEL_JSON, SAMPLE_INPUTS = "models/model.json", "data/sample_inputs/model.pt"
EVIL_ARCHIVES: dict[str, tuple[dict[str, bytes | Callable[[bytes], bytes]], bool]] = {
    "payload_sample_inputs": ({SAMPLE_INPUTS: _pickled_payload()}, True),
    "payload_pickled_weight": ({WEIGHTS_CONFIG: _weight_config(use_pickle=True),
                                "data/weights/weight_0": _pickled_payload()}, True),
    "payload_pickled_constant": ({CONSTANTS_CONFIG: _constant("tensor_0"),
                                  "data/constants/tensor_0": _pickled_payload()}, True),
    "payload_opaque_constant": ({CONSTANTS_CONFIG: _constant("opaque_obj_0"),
                                 "data/constants/opaque_obj_0": pickle.dumps(Payload())}, True),
    "payload_legacy_weights": ({"data/weights/model.pt": _pickled_payload()}, True),
    "payload_pytree_module": ({MODEL_JSON: _out_spec(f"{PAYLOAD_MODULE}.Output")}, False),
    "payload_symbolic_shape": ({MODEL_JSON: _symbolic_size(f"__import__('builtins').open('{MARKER}', 'w') and 1")},
                               True),
    "payload_call_import": ({MODEL_JSON: _call("torch.ops.import_module", PAYLOAD_MODULE)}, False),
    "expanded_sample_input": ({SAMPLE_INPUTS: _expanded_inputs()}, False),
    "expanded_weight": ({WEIGHTS_CONFIG: _weight_config(tensor_meta={
        "dtype": 7, "sizes": [{"as_int": 100000}, {"as_int": 100000}], "strides": [{"as_int": 0}, {"as_int": 0}],
        "storage_offset": {"as_int": 0}, "requires_grad": True, "device": {"type": "cpu", "index": None},
        "layout": 7})}, False),
}


def main() -> None:
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, model in (("tiny", tiny()), ("nan_weights", tiny(float("nan"))), ("inf_weights", tiny(float("inf"))),
                        ("unsupported_ops", Unsupported())):
        torch.export.save(torch.export.export(model, (x,)), HERE / f"{name}.pt2")
    torch.jit.script(tiny()).save(str(HERE / "scripted.pt"))
    good = (HERE / "tiny.pt2").read_bytes()
    (HERE / "truncated.pt2").write_bytes(good[:len(good) // 2])
    rng = np.random.default_rng(0)
    (HERE / "random.pt2").write_bytes(rng.bytes(1024))
    (HERE / "random.pt").write_bytes(rng.bytes(1024))
    (HERE / "empty.pt2").write_bytes(b"")
    torch.save(Payload(), HERE / "pickle_payload.pt")
    images, labels = torch.rand(4, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.save({"inputs": images.long(), "labels": labels}, HERE / "data_int_inputs.pt")
    torch.save({"inputs": images, "labels": labels.float()}, HERE / "data_float_labels.pt")
    torch.save({"inputs": images.bool(), "labels": labels}, HERE / "data_bool_inputs.pt")
    np.save(HERE / "input_int32.npy", np.zeros((1, 8, 8), np.int32))
    for name, (edits, _) in EVIL_ARCHIVES.items():
        rewrite_archive(HERE / "tiny.pt2", HERE / f"{name}.pt2", edits)
    (HERE / f"{PAYLOAD_MODULE}.py").write_text(f"open({MARKER!r}, 'w').close()  # a payload: importing it runs code\n")


if __name__ == "__main__":
    main()
