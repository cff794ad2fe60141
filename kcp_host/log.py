"""The agent's journal lines and its one way to stop: `PROGRAM: message` on stderr, an exit code.

Lines are prefixed with the subcommand's name (the program names operators grep the journal
for, e.g. `etcd-member-recovery: decision: ...`), set once by the command line.
"""

from __future__ import annotations

import sys

_program = "kcp-host"


def set_program(name: str) -> None:
    global _program
    _program = name


def program() -> str:
    return _program


def log(message: str) -> None:
    print(f"{_program}: {message}", file=sys.stderr, flush=True)


class Abort(Exception):
    """Stop the subcommand with `code`; the command line prints `PROGRAM: ERROR: message`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
