"""Ctrl-C before a command has started its work (importing torch takes seconds): one line, not an import
traceback. Every entry script imports this module before anything else; `started()` (called by `run_cli` and
by the mains that do not use it) gives Ctrl-C back to Python's KeyboardInterrupt, which a run turns into a
checkpoint and a line of its own. It acts only where a script of this repository is the program itself:
imported by a test or a notebook, it changes nothing."""

import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_FOLDERS = (ROOT, ROOT / "tools", ROOT / "exercises", ROOT / "notebooks")


def _before_start(signum, frame):
    print("interrupted before the command started its work; nothing was written", file=sys.stderr)
    raise SystemExit(130)


def started() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt again."""
    if signal.getsignal(signal.SIGINT) is _before_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_program = getattr(sys.modules.get("__main__"), "__file__", None)
if (_program and Path(_program).resolve().parent in ENTRY_FOLDERS
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _before_start)
