"""The commands stop quietly when the reader of their output goes away (``... | head``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe


PRINTS_A_LOT = """
import sys, time
from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe

@ends_quietly_on_a_closed_pipe
def main():
    time.sleep(0.5)  # the reader is gone by now
    for _ in range(1000):
        print("a line of a long table " * 10)
    return 0

sys.exit(main())
"""


def test_a_closed_stdout_ends_the_command_without_a_traceback():
    command = subprocess.Popen([sys.executable, "-c", PRINTS_A_LOT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_the_commands_have_it():
    from cifarnet import benchmark
    from cifarnet.study import cli, results

    for main in (benchmark.main, cli.train_main, cli.eval_main, results.main):
        assert main.__wrapped__ is not None, main


def test_a_broken_pipe_elsewhere_still_raises():
    """Only a closed stdout is a reason to stop quietly: a peer's socket is an error."""

    @ends_quietly_on_a_closed_pipe
    def main() -> int:
        raise BrokenPipeError("a peer process went away")

    with pytest.raises(BrokenPipeError, match="peer"):
        main()


def test_the_status_passes_through():
    assert ends_quietly_on_a_closed_pipe(lambda: 3)() == 3
