"""tcc: a Transformer co-design compiler.

    import tcc
    artifact = tcc.compile(model, example_inputs, target="cpu")
    artifact.save("out"); outputs = tcc.load("out").run(inputs, on="cpu")
"""

__version__ = "0.1.0"

from tcc.ir.errors import TccError  # noqa: E402
from tcc.runtime.artifact import Artifact, load  # noqa: E402

from .driver import compile  # noqa: E402

__all__ = ["compile", "load", "Artifact", "TccError", "__version__"]
