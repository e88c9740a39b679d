"""tcc passes: the explicit registry of every pass by name, and pipelines as text."""

from .base import OptionError, Pass, PassContext, PassResult, option, run_pipeline
from .binarize import Binarize
from .block_prune import BlockPrune
from .canonicalize import Canonicalize
from .conv_as_gemm import ConvAsGemm
from .data import Batch, Dataset, batch_size_of
from .dce import DeadCodeElimination
from .decompose_attention import DecomposeAttention
from .fold_constants import FoldConstants
from .hp_prune import HPPrune
from .int_nonlinear import IntNonlinear
from .pool_late import PoolLate
from .quantize import Quantize
from .select_device import SelectDevice
from .select_format import SelectFormat
from .simplify_nonlinear import SimplifyNonlinear
from .options import Latency, Ratio, Shape2
from .pipeline import PipelineError, format_pipeline, parse_pipeline
from .registry import PASSES

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "OptionError", "option", "run_pipeline", "Batch",
           "Dataset", "batch_size_of", "DeadCodeElimination", "FoldConstants", "Canonicalize",
           "ConvAsGemm", "PoolLate", "DecomposeAttention", "HPPrune", "BlockPrune",
           "Binarize", "Quantize", "IntNonlinear", "SelectFormat", "SelectDevice", "SimplifyNonlinear",
           "PipelineError", "Latency", "Ratio", "Shape2", "format_pipeline", "parse_pipeline"]
