"""tcc: a Transformer co-design compiler.

    import tcc
    artifact = tcc.compile(model, example_inputs, target="cpu")
    artifact.save("out"); outputs = tcc.load("out").run(inputs, on="cpu")

The root is light: `import tcc` (and `import tcc.ir`, `tcc --version`) loads neither torch nor
pyrtl. `compile`, `load` and `Artifact` are imported on first use (PEP 562), and so is any
submodule named as an attribute (`tcc.zoo`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tcc.ir.errors import TccError  # light: tcc.ir imports numpy only

from ._version import __version__

if TYPE_CHECKING:  # what the lazy attributes are, for type checkers and IDEs
    from tcc.driver import compile
    from tcc.runtime.artifact import Artifact, load

__all__ = ["compile", "load", "Artifact", "TccError", "__version__"]

# tcc's own submodules, reachable as attributes (`tcc.zoo`); an explicit list, so that an
# attribute name never picks what is imported
SUBMODULES = frozenset({"ir", "passes", "backends", "runtime", "frontend", "targets", "zoo", "select", "explore",
                        "report", "evaluate", "data", "loader", "model", "driver", "cli", "export_archive", "speech",
                        "language"})


def __getattr__(name: str) -> Any:
    if name == "compile":
        from .driver import compile as value
    elif name in ("load", "Artifact"):
        from .runtime import artifact
        value = getattr(artifact, name)
    elif name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
