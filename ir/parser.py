"""Parser of the IR text form (see `tcc.ir.printer`). Errors carry `source:line:col`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .dtypes import DType
from .encoding import make_encoding
from .errors import ParseError, VerifyError
from .graph import Graph, Op, freeze_weights
from .ops import OPS, AttrKind, OpTypeError
from .quant import PerChannel, PerTensor
from .sparsity import make_sparsity
from .state import State, StateRole
from .types import TensorType
from .verifier import verify

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|//[^\n]*)
  | (?P<nl>\n)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<const>@[A-Za-z0-9_.]+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|-?inf\b|nan\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>->|[()\[\]{},:=#!~])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    line: int
    col: int


def _tokenize(text: str, source: str) -> list[Token]:
    tokens, line, line_start, pos = [], 1, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r}", line, pos - line_start + 1, source)
        kind = m.lastgroup
        if kind == "nl":
            line, line_start = line + 1, m.end()
        elif kind != "ws":
            tokens.append(Token(kind, m.group(), line, pos - line_start + 1))
        pos = m.end()
    tokens.append(Token("eof", "", line, pos - line_start + 1))
    return tokens


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.tokens = _tokenize(text, source)
        self.i = 0

    # -- token helpers ----------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, message: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.tok
        return ParseError(message, tok.line, tok.col, self.source)

    def describe(self, tok: Token) -> str:
        return "end of input" if tok.kind == "eof" else f"'{tok.text}'"

    def accept(self, text: str) -> bool:
        if self.tok.text == text and self.tok.kind in ("punct", "ident"):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        tok = self.tok
        if not self.accept(text):
            raise self.error(f"expected '{text}', found {self.describe(tok)}")
        return tok

    def take(self, kind: str, what: str) -> Token:
        tok = self.tok
        if tok.kind != kind:
            raise self.error(f"expected {what}, found {self.describe(tok)}")
        self.i += 1
        return tok

    def integer(self) -> int:
        tok = self.take("number", "an integer")
        if not re.fullmatch(r"-?\d+", tok.text):
            raise self.error(f"expected an integer, found '{tok.text}'", tok)
        return int(tok.text)

    def number(self) -> float:
        return float(self.take("number", "a number").text)

    def sequence(self, open_: str, close: str, item) -> list:
        self.expect(open_)
        items = []
        if not self.accept(close):
            items.append(item())
            while self.accept(","):
                items.append(item())
            self.expect(close)
        return items

    # -- grammar ----------------------------------------------------------------------------
    def dtype(self) -> DType:
        tok = self.take("ident", "a dtype")
        try:
            return DType.parse(tok.text)
        except ValueError as e:
            raise self.error(str(e), tok) from None

    def type_(self) -> TensorType:
        start = self.tok
        dtype = self.dtype()
        shape = tuple(self.sequence("[", "]", self.integer))
        encoding = quant = None
        if self.accept("#"):
            tok = self.take("ident", "an encoding name")
            params = tuple(self.sequence("(", ")", self.integer)) if self.tok.text == "(" else ()
            try:
                encoding = make_encoding(tok.text, params)
            except ValueError as e:
                raise self.error(str(e), tok) from None
        sparsity = None
        if self.accept("~"):
            tok = self.take("ident", "a sparsity structure")
            params = tuple(self.sequence("(", ")", self.integer))
            try:
                sparsity = make_sparsity(tok.text, params)
            except ValueError as e:
                raise self.error(str(e), tok) from None
        if self.accept("!"):
            quant = self.quant()
        try:
            kwargs = {"encoding": encoding} if encoding is not None else {}
            return TensorType(shape, dtype, quant=quant, sparsity=sparsity, **kwargs)
        except ValueError as e:
            raise self.error(str(e), start) from None

    def quant(self):
        tok = self.take("ident", "'q'")
        if tok.text != "q":
            raise self.error(f"expected 'q', found '{tok.text}'", tok)
        fields: dict[str, Any] = {}

        def field() -> None:
            key_tok = self.take("ident", "a quantization field")
            value = _QUANT_FIELDS.get(key_tok.text)
            if value is None:
                raise self.error(f"unknown quantization field '{key_tok.text}' (fields: {', '.join(_QUANT_FIELDS)})",
                                 key_tok)
            if key_tok.text in fields:
                raise self.error(f"quantization field '{key_tok.text}' is given twice", key_tok)
            self.expect("=")
            fields[key_tok.text] = value(self)
        self.sequence("(", ")", field)
        if set(fields) == {"scale", "zp"}:
            return PerTensor(fields["scale"], fields["zp"])
        if set(fields) == {"axis", "scales", "zps"}:
            try:
                return PerChannel(fields["axis"], tuple(fields["scales"]), tuple(fields["zps"]))
            except ValueError as e:
                raise self.error(str(e), tok) from None
        raise self.error("quantization takes (scale, zp) or (axis, scales, zps)", tok)

    def attr_value(self, kind: AttrKind) -> Any:
        tok = self.tok
        if tok.text == "none" and tok.kind == "ident":
            self.i += 1
            return None
        if kind is AttrKind.INT:
            return self.integer()
        if kind is AttrKind.FLOAT:
            return self.number()
        if kind is AttrKind.BOOL:
            word = self.take("ident", "true or false").text
            if word not in ("true", "false"):
                raise self.error(f"expected true or false, found '{word}'", tok)
            return word == "true"
        if kind is AttrKind.STR:
            string = self.take("string", "a string")
            try:
                return json.loads(string.text)
            except json.JSONDecodeError as e:
                raise self.error(f"bad string {string.text}: {e.msg}", string) from None
        if kind is AttrKind.INTS:
            return tuple(self.sequence("[", "]", self.integer))
        return self.dtype()

    def graph(self, weights: Mapping[str, np.ndarray] | None) -> Graph:
        self.expect("graph")
        name = self.take("const", "the graph name '@name'").text[1:]
        types: dict[str, TensorType] = {}
        inputs = self.sequence("(", ")", lambda: self.declare(types, "value"))
        self.expect("{")
        constants, ops = [], []
        while self.accept("const"):
            constants.append(self.declare(types, "const"))
        while self.tok.kind == "value":
            ops.append(self.op(types))
        self.expect("return")
        outputs = [self.reference(types)]
        while self.accept(","):
            outputs.append(self.reference(types))
        state = []
        while self.accept("state"):
            state.append(self.state(inputs))
        self.expect("}")
        if self.tok.kind != "eof":
            raise self.error(f"unexpected {self.describe(self.tok)} after the graph")
        graph = Graph(name, tuple(inputs), tuple(constants), tuple(ops), tuple(outputs),
                      freeze_weights(weights or {}), state=tuple(state))
        if weights is not None:
            try:
                verify(graph)
            except VerifyError as e:
                raise ParseError(str(e), 1, 1, self.source) from None
        return graph

    def state(self, inputs: list[tuple[str, TensorType]]) -> State:
        """`%input -> return[N] {role = "kv.key", layer = 0, seq_dim = 2}` (after `state`)."""
        tok = self.take("value", "the state's input '%name'")
        if tok.text[1:] not in dict(inputs):
            raise self.error(f"state '{tok.text}' is not a graph input", tok)
        self.expect("->")
        self.expect("return")
        self.expect("[")
        output = self.integer()
        self.expect("]")
        fields: dict[str, Any] = {}
        if self.tok.text == "{":
            def field():
                key = self.take("ident", "a state attribute (role, layer, seq_dim)")
                if key.text not in ("role", "layer", "seq_dim") or key.text in fields:
                    raise self.error(f"state attribute '{key.text}' is unknown or repeated (role, layer, seq_dim)", key)
                self.expect("=")
                if key.text == "role":
                    role = self.take("string", "a role string")
                    try:
                        fields["role"] = StateRole(json.loads(role.text))
                    except ValueError:
                        raise self.error(f"unknown state role {role.text} (choose "
                                         f"{', '.join(r.value for r in StateRole)})", role) from None
                else:
                    fields[key.text] = self.integer()
            self.sequence("{", "}", field)
        return State(tok.text[1:], output, **fields)

    def declare(self, types: dict, kind: str) -> tuple[str, TensorType]:
        tok = self.take(kind, "'%name'" if kind == "value" else "'@name'")
        name = tok.text[1:]
        if name in types:
            raise self.error(f"'{name}' is defined twice", tok)
        self.expect(":")
        types[name] = self.type_()
        return name, types[name]

    def reference(self, types: dict) -> str:
        tok = self.tok
        if tok.kind not in ("value", "const"):
            raise self.error(f"expected a value '%name' or constant '@name', found {self.describe(tok)}")
        self.i += 1
        if tok.text[1:] not in types:
            raise self.error(f"'{tok.text}' is not defined", tok)
        return tok.text[1:]

    def op(self, types: dict) -> Op:
        result_tok = self.take("value", "'%name'")
        result = result_tok.text[1:]
        if result in types:
            raise self.error(f"'{result}' is defined twice", result_tok)
        self.expect("=")
        kind_tok = self.take("ident", "an op name")
        opdef = OPS.get(kind_tok.text)
        if opdef is None:
            raise self.error(f"unknown op '{kind_tok.text}'", kind_tok)
        operands = self.sequence("(", ")", lambda: self.reference(types))
        attrs: dict[str, Any] = {}
        if self.tok.text == "{":
            def attr():
                key_tok = self.take("ident", "an attribute name")
                spec = opdef.attrs.get(key_tok.text)
                if spec is None:
                    raise self.error(f"{opdef.name} has no attribute '{key_tok.text}' "
                                     f"(takes: {', '.join(opdef.attrs) or 'none'})", key_tok)
                self.expect("=")
                attrs[key_tok.text] = self.attr_value(spec.kind)
            self.sequence("{", "}", attr)
        self.expect(":")
        type_tok = self.tok
        declared = self.type_()
        try:
            normalized = opdef.normalize_attrs(attrs)
            inferred = opdef.infer([types[o] for o in operands], dict(normalized))
        except (ValueError, OpTypeError) as e:
            raise self.error(f"{opdef.name}: {e}", kind_tok) from None
        if (inferred.shape, inferred.dtype) != (declared.shape, declared.dtype):
            raise self.error(f"{opdef.name}: declared type {declared} but the operands give "
                             f"{inferred.dtype}[{','.join(map(str, inferred.shape))}]", type_tok)
        types[result] = declared
        return Op(opdef.name, result, tuple(operands), normalized, declared)


# the fields of `!q(...)` and how each value is read
_QUANT_FIELDS = {"scale": _Parser.number, "zp": _Parser.integer, "axis": _Parser.integer,
                 "scales": lambda p: p.sequence("[", "]", p.number), "zps": lambda p: p.sequence("[", "]", p.integer)}


def parse_graph(text: str, weights: Mapping[str, np.ndarray] | None = None, source: str = "<text>") -> Graph:
    """Parse IR text. With `weights`, the constants are checked against them and the graph verified.

    Any text that is not a well-formed graph raises `ParseError` (a `TccError`) naming
    `source:line:col`, and nothing else (tests/test_fuzz.py fuzzes it)."""
    return _Parser(text, source).graph(weights)


__all__ = ["parse_graph"]
