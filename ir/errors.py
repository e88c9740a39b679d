"""Errors raised by the IR. Every tcc user error derives from `TccError`."""

from __future__ import annotations


class TccError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with code 2."""


class VerifyError(TccError):
    """The graph is ill-typed or malformed; the message names the op and the problem."""


class ParseError(TccError):
    """IR text could not be parsed; the message carries `file:line:col`."""

    def __init__(self, message: str, line: int, col: int, source: str = "<text>"):
        super().__init__(f"{source}:{line}:{col}: {message}")
        self.line = line
        self.col = col


def printable(text: str) -> str:
    """`text` safe for a terminal: every character that is not printable (control characters
    such as ESC, newline and carriage return, bidirectional overrides, other format and
    unassigned characters) written as its Python escape (`\\x1b`, `\\n`, `\\u202e`). Names
    and messages that come from files pass through this before tcc prints them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
