"""The checked-in record in graphs/ matches what the compiler makes of the step now.

It runs ``python -m graphs --check`` in a fresh process (the record resets Dynamo, and a fresh
process gives the same compile history every time) and fails with the diff. Regenerate with
``python -m graphs`` and review the diff: every change to the step's graphs, a fusion regression
(more kernels) included, shows up there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _recorded_torch() -> str:
    header = (ROOT / "graphs" / "default.txt").read_text().splitlines()[1]
    return header.split("torch ")[1].split(",")[0]


@pytest.mark.skipif(torch.__version__.split("+")[0] != _recorded_torch(),
                    reason="the record was made with another torch version; its graphs legitimately differ")
def test_graphs_record_is_up_to_date():
    done = subprocess.run([sys.executable, "-m", "graphs", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (
        "graphs/ is stale: the step's compiled graphs changed. Review this diff, then regenerate "
        f"with `python -m graphs`:\n{done.stdout}\n{done.stderr[-2000:]}")
