"""tcc's sparse-tensor IR: types, the op table, graphs, text form, verifier, reference semantics."""

from .dtypes import DType, promote
from .encoding import DENSE, Dense, Encoding
from .errors import ParseError, TccError, VerifyError
from .graph import Graph, GraphBuilder, Op
from .ops import OPS, OpDef
from .parser import parse_graph
from .printer import print_graph
from .quant import PerChannel, PerTensor
from .reference import REFERENCE
from .types import TensorType, tensor
from .verifier import verify

__all__ = [
    "DType", "promote", "DENSE", "Dense", "Encoding", "ParseError", "TccError", "VerifyError",
    "Graph", "GraphBuilder", "Op", "OPS", "OpDef", "parse_graph", "print_graph", "PerChannel",
    "PerTensor", "REFERENCE", "TensorType", "tensor", "verify",
]
