"""Bad input from the user: one line (`error: ...`, exit status 2, printed by `run_cli` in
plumbing/training.py), never a traceback. The first floor of the plumbing: it imports nothing."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line by `run_cli`, never as a traceback."""


def require(ok: bool, message: str) -> None:
    """A one-line error (`UserError`) with `message` unless `ok`."""
    if not ok:
        raise UserError(message)
