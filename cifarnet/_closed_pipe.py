"""Command-line entry points that stop quietly when the reader of their output goes away."""

from __future__ import annotations

import functools
import os
import select
import sys
from typing import Callable


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (``cifarnet-eval ... | head``): the
    kernel reports an error condition on its writing end."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor, or no poll()
        return False


def ends_quietly_on_a_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """``main``, which returns 1 (Python's own status for a broken pipe) without a traceback
    when its output's reader has gone, as Unix tools stop. Stdout then points at /dev/null, so
    that the interpreter's last flush does not fail again (the recipe of the ``signal``
    module's "Note on SIGPIPE"). A broken pipe anywhere else (a peer process's socket) still
    raises."""

    @functools.wraps(main)
    def entry_point(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            if not stdout_reader_gone():
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1

    return entry_point
