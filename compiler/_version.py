"""tcc's version, in a module of its own: the CLI's `--version` and the artifact manifest read it
without importing the compiler."""

__version__ = "0.1.0"
