"""Which weights compression passes act on: the float weight constants of `linear` ops,
chosen by a name pattern, with the role each one plays in a Transformer. Roles come from the
dataflow, not from names, so they hold for any model the frontend lowers.

Terms (exact; `tests/test_layer_kinds.py` checks them on every zoo model):

- An *activation* is a value computed from a graph input (constants, and values computed
  from constants alone, are not).
- An *attention op* is `scaled_dot_product_attention`, or a `matmul` of two activations (the
  scores `q @ k^T` and the context `p @ v` of attention written out op by op).
- A *weighted op* is a `linear`, a `conv1d`, a `conv2d` or an attention op.
- A *residual add* is an `add` of two activations `s + b` where `s` (the skip) feeds `b` (the
  branch) through a weighted op: some path from `s` to `b` passes a weighted op, as in
  `x + f(x)` with a sublayer `f`. Adding a bias, position embeddings, an attention mask, an
  epsilon, or two values neither of which is computed from the other (the halves of a split
  weight) is not a residual add. The residual adds form the *residual stream*.
- *Through non-mixing ops* means along a chain of data movement (reshape, permute, transpose,
  slice, select, (un)squeeze, expand, cat), elementwise arithmetic other than a residual add
  (add, sub, mul, div, pow, neg) and type changes (cast, quantize, dequantize, requantize).

A linear is

- a **head** when its result reaches a graph output, no residual add is downstream of it (it
  never feeds the residual stream), and either a residual add is upstream of it (it reads the
  stream: the classifier, pooler or LM head, and every linear of a classifier MLP after the
  last residual add) or, where none is, no other linear is downstream of it (in a network
  without residual adds, such as an MLP, the last linear before an output);
- an **input projection** when its input is an activation with no weighted op upstream (it is
  computed from graph inputs and constants only, through any ops but linears, convolutions and
  attention: data movement, elementwise ops, normalization, embedding lookups) and it is not an
  attention projection (its kind would not be `qkv`): a patch or feature projection, or an
  embedding's projection, e.g. `embed` of `embed(x) + pos`; never an attention `in_proj` fed
  straight from the input;
- of one **kind**: `other` for heads and input projections (they sit outside the Transformer
  blocks); otherwise the first of
  `qkv` (its result reaches an operand of an attention op through non-mixing ops),
  `attn_out` (its input is reached from an attention op's result through non-mixing ops),
  `ffn1` (its result reaches an activation function (relu, gelu, tanh, sigmoid, silu, erf, int_gelu)
  through non-mixing ops, or the input of an `ffn2` linear: the up projection of a gated FFN
  `down(act(gate(x)) * up(x))`),
  `ffn2` (its input is reached from an activation function's result through non-mixing ops),
  else `other`.

A weight shared by several linears is a head (an input projection) when any of them is, and
takes the kind of its first use.

A convolution (`conv1d`, `conv2d`) with a constant weight is not a layer: the compression
passes leave it dense and say so. It belongs to the model's **convolutional front end** when no
linear or attention op is upstream of it (a speech model's feature extractor, a ViT's patch
embedding), else it sits in the blocks (a Conformer's convolution module, a convolutional
position embedding).

Passes choose layers with `choose_layers` (or `LayerOptions.layer_choice`), which also says
why each linear weight left out was left out; `LayerChoice.notes` turns that into pass-log
notes, so a pass never does less than asked without saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph, Op

from .base import option

LayerKind = Literal["qkv", "attn_out", "ffn1", "ffn2", "other"]
LAYER_KINDS: tuple[str, ...] = ("qkv", "attn_out", "ffn1", "ffn2", "other")

# non-mixing ops: looked through when classifying (a residual add never is)
_THROUGH = {"reshape", "permute", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "cat",
            "add", "sub", "mul", "div", "pow", "neg", "cast", "dequantize", "quantize", "requantize"}
_ACTIVATIONS = {"gelu", "relu", "tanh", "sigmoid", "silu", "erf", "int_gelu"}
_WEIGHTED = {"linear", "conv1d", "conv2d"}  # and attention ops


@dataclass(frozen=True)
class Layer:
    """A weight constant and the linear op(s) using it."""

    weight: str
    ops: tuple[Op, ...]
    kind: LayerKind
    is_head: bool
    is_input: bool  # an input projection (see the module docstring)


class _Dataflow:
    """Ancestor sets of the activations of a graph (Python ints as bitsets), the residual adds,
    attention ops and the walks through non-mixing ops."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer, self.users = graph.producer(), graph.users()
        index: dict[str, int] = {name: i for i, name in enumerate(graph.input_names)}
        up: dict[str, int] = {name: 0 for name in index}  # strict activation ancestors
        weighted: dict[str, int] = {name: 0 for name in index}  # ancestors that reach it through a weighted op
        self.attention: set[str] = set()
        self.residual: set[str] = set()
        for op in graph.ops:
            acts = [o for o in op.operands if o in index]
            if not acts:
                continue
            index[op.result] = len(index)
            ancestors, through = 0, 0
            for o in acts:
                ancestors |= up[o] | (1 << index[o])
                through |= weighted[o]
            attention = op.kind == "scaled_dot_product_attention" or (op.kind == "matmul" and len(acts) == 2)
            if attention:
                self.attention.add(op.result)
            if attention or op.kind in _WEIGHTED:
                through = ancestors
            up[op.result], weighted[op.result] = ancestors, through
            if op.kind == "add" and len(acts) == 2:
                a, b = op.operands
                if weighted[b] >> index[a] & 1 or weighted[a] >> index[b] & 1:
                    self.residual.add(op.result)
        self.index, self.up = index, up

    def bit(self, value: str) -> int:
        return 1 << self.index[value] if value in self.index else 0

    def upstream(self, values) -> int:
        """Bitset of the activations upstream of any of `values` (strictly)."""
        out = 0
        for v in values:
            out |= self.up.get(v, 0)
        return out

    def _passes(self, op: Op) -> bool:
        return op.kind in _THROUGH and op.result not in self.residual

    def reaches(self, start: str, found: Callable[[Op, str], bool], forward: bool) -> bool:
        """Whether, from value `start` through non-mixing ops, an op with `found(op, value)` is
        met: forward, a user `op` of `value`; backward, the producer `op` of `value`."""
        seen, stack = set(), [start]
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            nexts = self.users.get(value, []) if forward else [self.producer[value]] if value in self.producer else []
            for op in nexts:
                if found(op, value):
                    return True
                if self._passes(op):
                    stack.extend([op.result] if forward else list(op.operands))
        return False


@dataclass(frozen=True)
class Convolution:
    """A convolution's weight constant, in the front end or in the blocks."""

    weight: str
    front_end: bool


def convolutions(graph: Graph) -> tuple[Convolution, ...]:
    """The constant weights of the graph's convolutions, in order of first use (see the module
    docstring)."""
    flow = _Dataflow(graph)
    constants = set(graph.constant_names)
    deep = sum(flow.bit(op.result) for op in graph.ops if op.kind == "linear" or op.result in flow.attention)
    live = flow.upstream(graph.outputs) | sum(flow.bit(o) for o in set(graph.outputs))
    found: dict[str, bool] = {}
    for op in graph.ops:
        if op.kind in ("conv1d", "conv2d") and op.operands[1] in constants and not flow.bit(op.result) & ~live:
            x = op.operands[0]
            front = not (flow.up.get(x, 0) | flow.bit(x)) & deep
            found[op.operands[1]] = found.get(op.operands[1], True) and front
    return tuple(Convolution(w, front) for w, front in found.items())


def _classify(graph: Graph) -> list[Layer]:
    """Every weight constant of a linear op, in order of first use, classified (see the module
    docstring)."""
    flow = _Dataflow(graph)
    constants = set(graph.constant_names)
    reaches_output = flow.upstream(graph.outputs) | sum(flow.bit(o) for o in set(graph.outputs))
    uses: dict[str, list[Op]] = {}
    for op in graph.ops:  # dead linears (a rewrite left them for dce) play no role
        if op.kind == "linear" and op.operands[1] in constants and not flow.bit(op.result) & ~reaches_output:
            uses.setdefault(op.operands[1], []).append(op)
    linears = [op for op in graph.ops if op.kind == "linear" and op.result in flow.index]
    residual_bits = sum(flow.bit(r) for r in flow.residual)
    feeds_residual = flow.upstream(flow.residual)
    feeds_linear = flow.upstream(op.result for op in linears)
    weighted_results = sum(flow.bit(op.result) for op in graph.ops
                           if op.kind in _WEIGHTED or op.result in flow.attention)
    activation_results = {op.result for op in graph.ops if op.kind in _ACTIVATIONS}

    def is_head(op: Op) -> bool:
        y = flow.bit(op.result)
        if not y or not y & reaches_output or y & feeds_residual:
            return False
        return bool(flow.up[op.result] & residual_bits) or not y & feeds_linear

    def is_qkv(op: Op) -> bool:
        return flow.reaches(op.result, lambda user, _: user.result in flow.attention, forward=True)

    def is_input(op: Op) -> bool:
        x = op.operands[0]
        return x in flow.index and not (flow.up[x] | flow.bit(x)) & weighted_results and not is_qkv(op)

    def after(results: set[str], op: Op) -> bool:  # its input is reached from one of `results`
        return flow.reaches(op.operands[0], lambda producer, _: producer.result in results, forward=False)

    ffn2_inputs = {op.operands[0] for op in linears if after(activation_results, op)}

    def kind(op: Op) -> LayerKind:
        if is_qkv(op):
            return "qkv"
        if after(flow.attention, op):
            return "attn_out"
        if flow.reaches(op.result, lambda user, value: user.kind in _ACTIVATIONS
                        or (user.kind == "linear" and user.operands[0] == value and value in ffn2_inputs),
                        forward=True):
            return "ffn1"
        if op.operands[0] in ffn2_inputs:
            return "ffn2"
        return "other"

    layers = []
    for weight, ops in uses.items():
        head = any(is_head(op) for op in ops)
        inputs = any(is_input(op) for op in ops)
        layers.append(Layer(weight, tuple(ops), "other" if head or inputs else kind(ops[0]), head, inputs))
    return layers


def name_list(names: list[str], most: int = 3) -> str:
    """`a, b and c`, or `a, b, c and 5 more`."""
    if len(names) <= most + 1:
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{', '.join(names[:most])} and {len(names) - most} more"


@dataclass(frozen=True)
class LayerChoice:
    """The linear weights a pass compresses (`chosen`), every linear weight of the graph
    (`layers`), and why each of the others is left alone (`skipped`: weight -> reason)."""

    layers: tuple[Layer, ...]
    chosen: tuple[Layer, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    convolutions: tuple[Convolution, ...] = ()

    @property
    def names(self) -> list[str]:
        return [layer.weight for layer in self.chosen]

    def skip(self, reason: Callable[[Layer], str | None]) -> "LayerChoice":
        """A choice without the chosen layers for which `reason(layer)` is a reason (not None)."""
        skipped, chosen = dict(self.skipped), []
        for layer in self.chosen:
            why = reason(layer)
            if why is None:
                chosen.append(layer)
            else:
                skipped[layer.weight] = why
        return LayerChoice(self.layers, tuple(chosen), skipped, self.numel, self.convolutions)

    def notes(self, verb: str, done: list[str] | None = None, to: str = "") -> list[str]:
        """Pass-log notes: `<verb> N of M linear weights (P% of linear weight elements)[ to]`,
        then one `skipped ...` note per reason naming the weights left alone (a few, then
        `and N more`). `done` replaces the chosen weights' names when the pass acted on others."""
        done = self.names if done is None else done
        total = sum(self.numel.values())
        share = sum(self.numel[n] for n in done if n in self.numel)
        if not self.layers:
            return [f"{verb} 0 linear weights (the graph has none)"]
        head = (f"{verb} {len(done)} of {len(self.layers)} linear weight{'s' if len(self.layers) != 1 else ''} "
                f"({100 * share / total:.1f}% of linear weight elements)")
        notes = [head + (f" to {to}" if to and done else "")]
        by_reason: dict[str, list[str]] = {}  # in the graph's order of the weights
        order = {layer.weight: i for i, layer in enumerate(self.layers)}
        for name, why in sorted(self.skipped.items(), key=lambda item: order.get(item[0], len(order))):
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            if len(names) == 1:
                notes.append(f"skipped {names[0]} ({why})")
            else:
                notes.append(f"skipped {len(names)} weights ({why}): {name_list(names)}")
        for front, where in ((True, "the convolutional front end"), (False, "convolutions in the blocks")):
            names = [c.weight for c in self.convolutions if c.front_end is front]
            if names:
                notes.append(f"kept {where} dense ({len(names)} weight{'s' if len(names) != 1 else ''}: "
                             f"{name_list(names)}; convolutions are not compressed)")
        return notes


def choose_layers(graph: Graph, pattern: str, *, keep_head: bool, keep_input: bool, pass_name: str,
                  float_only: bool = True) -> LayerChoice:
    """The linear weights whose constant name matches `pattern` (a regex, searched), the head
    left out when `keep_head` and input projections when `keep_input`, integer weights when
    `float_only`; each one left out with its reason. Errors on an invalid regex."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TccError(f"{pass_name}: option 'layers' is not a valid regular expression ({e})") from None
    types = graph.types
    layers = tuple(_classify(graph))
    chosen, skipped = [], {}
    for layer in layers:
        dtype = types[layer.weight].dtype
        if not regex.search(layer.weight):
            skipped[layer.weight] = f"not matched by layers={pattern}"
        elif float_only and not dtype.is_float:
            skipped[layer.weight] = f"{dtype} weights, not float"
        elif keep_head and layer.is_head:
            skipped[layer.weight] = "the model's head, keep_head=true"
        elif keep_input and layer.is_input:
            skipped[layer.weight] = "an input projection, keep_input=true"
        else:
            chosen.append(layer)
    return LayerChoice(layers, tuple(chosen), skipped, {layer.weight: types[layer.weight].numel for layer in layers},
                       convolutions(graph))


def select_layers(graph: Graph, pattern: str, *, keep_head: bool, pass_name: str,
                  float_only: bool = True) -> list[Layer]:
    """The chosen layers of `choose_layers` (input projections included)."""
    return list(choose_layers(graph, pattern, keep_head=keep_head, keep_input=False, pass_name=pass_name,
                              float_only=float_only).chosen)


def _kinds_problem(kinds: str) -> str | None:
    """What is wrong with a `kinds` option's value (None: nothing)."""
    unknown = [k for k in kinds.split("+") if k not in LAYER_KINDS]
    if kinds != "all" and unknown:
        return f"unknown layer kind '{unknown[0]}' (all, or kinds joined by '+': {', '.join(LAYER_KINDS)})"
    return None


@dataclass(frozen=True)
class LayerOptions:
    """Options shared by the passes that compress chosen linear layers."""

    layers: str = option(".*", "regex on weight names: which linear layers to compress")
    keep_head: bool = option(True, "leave the head (classifier, pooler, LM head: linears after the last "
                                   "residual add) uncompressed")
    keep_input: bool = option(True, "leave input projections (linears fed from the inputs only, before any "
                                    "attention) uncompressed")

    kinds: str = option("all", "layer kinds to compress: all, or kinds joined by '+' (qkv, attn_out, ffn1, "
                               "ffn2, other), e.g. ffn1+ffn2", check=_kinds_problem)

    def layer_choice(self, graph: Graph, pass_name: str) -> LayerChoice:
        choice = choose_layers(graph, self.layers, keep_head=self.keep_head, keep_input=self.keep_input,
                               pass_name=pass_name)
        if self.kinds == "all":
            return choice
        wanted = self.kinds.split("+")
        return choice.skip(lambda layer: None if layer.kind in wanted else f"kind {layer.kind}, kinds={self.kinds}")

    def layers_to_structure(self, graph: Graph, pass_name: str, structure: object) -> LayerChoice:
        """`layer_choice` without the weights that already have `structure` (a pruning pass run
        again leaves them as they are, and says so)."""
        types = graph.types
        return self.layer_choice(graph, pass_name).skip(
            lambda layer: f"already {structure}" if types[layer.weight].sparsity == structure else None)

    def chosen_layers(self, graph: Graph, pass_name: str) -> list[Layer]:
        return list(self.layer_choice(graph, pass_name).chosen)
