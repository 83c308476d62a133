"""What the ``sparsebptt`` command needs before the package's own imports run: Ctrl-C in one line.

Importing the package takes seconds (torch, numpy); a Ctrl-C then was a 15- to 60-line traceback
from inside their imports (once a RecursionError from numpy's half-imported module), before
`sparsebptt.cli.main` could catch anything. The package's ``__init__`` imports this module first;
in the command's own process (``sparsebptt ...``, ``python -m sparsebptt ...``), and only there,
importing it sets a SIGINT handler that prints ``sparsebptt: interrupted`` and exits with status
130 at once (nothing has been written yet; unwinding half-done imports is what made the
tracebacks). `sparsebptt.cli.main` puts Python's default handler back (`restore_interrupts`) as it
starts, and from then on catches KeyboardInterrupt itself. A program that imports the library keeps
its own Ctrl-C. This module imports nothing of the package.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["is_command", "restore_interrupts"]


def is_command() -> bool:
    """True in the process of the ``sparsebptt`` command: its script, or ``python -m sparsebptt``
    (read from ``sys.orig_argv``: while ``-m`` locates a module ``sys.argv[0]`` is ``"-m"`` for any
    module, and a program run with ``python -m theirs`` that imports sparsebptt keeps its Ctrl-C)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in ("sparsebptt", "sparsebptt.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return argv0 == "-m" and "-m" in orig and orig.index("-m") + 1 < len(orig) \
        and orig[orig.index("-m") + 1] in ("sparsebptt", "sparsebptt.cli", "sparsebptt.__main__")


def _interrupted(signum, frame):
    try:
        sys.stderr.write("sparsebptt: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def restore_interrupts() -> None:
    """Python's default SIGINT handler (KeyboardInterrupt) again, if this module had set its own."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if is_command() and threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored, not the program's own
    signal.signal(signal.SIGINT, _interrupted)
