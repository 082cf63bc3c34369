"""How a child process ended, in the words a shell uses."""

from __future__ import annotations

import signal


def describe_exit(returncode: int) -> str:
    """``was killed by SIGSEGV (exit status 139)`` for a signal, else ``exited with status N``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit status {128 - returncode})"
    return f"exited with status {returncode}"
