"""Keeping the benchmark's terminal readable."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["quiet_stderr"]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Native code's lines on stderr (the profiler's USDT start/stop lines, torchao's missing
    optional libraries) dropped, so that the progress bar stays readable."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
