"""The explicit registry of every pass by name (`PASSES`); a test checks it lists each pass."""

from __future__ import annotations

from .base import Pass
from .binarize import Binarize
from .block_prune import BlockPrune
from .canonicalize import Canonicalize
from .conv_as_gemm import ConvAsGemm
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

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (
    FoldConstants, DeadCodeElimination, Canonicalize, ConvAsGemm, DecomposeAttention, HPPrune, BlockPrune, Binarize, Quantize,
    IntNonlinear, PoolLate, SelectFormat, SelectDevice, SimplifyNonlinear)}
