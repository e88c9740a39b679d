"""tcc passes: the explicit registry of every pass by name."""

from .base import Pass, PassContext, PassResult
from .dce import DeadCodeElimination
from .fold_constants import FoldConstants

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (FoldConstants, DeadCodeElimination)}

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "DeadCodeElimination", "FoldConstants"]
