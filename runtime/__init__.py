"""tcc runtime: artifacts and the executors that run them (numpy spec, torch CPU/GPU)."""

from .artifact import Artifact, load
from .numpy_executor import NumpyExecutor
from .torch_executor import TorchExecutor

__all__ = ["Artifact", "load", "NumpyExecutor", "TorchExecutor"]
