"""The `t2i` command as a shell user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`t2i config | head -1`: the reader closes the pipe before the command writes; the
    command stops as a Unix tool killed by SIGPIPE does, with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        finished = subprocess.run([str(Path(sys.executable).parent / "t2i"), "config"], cwd=ROOT,
                                  stdout=write_end, stderr=subprocess.PIPE, text=True,
                                  timeout=120)
    finally:
        os.close(write_end)
    assert finished.stderr == ""
    assert finished.returncode == 128 + signal.SIGPIPE
