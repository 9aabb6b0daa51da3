"""Every Python block of README.md runs as printed, so the README cannot rot. Blocks that use
CUDA skip without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def _id(block: str) -> str:
    start = README.read_text().index(block)
    return f"line-{README.read_text()[:start].count(chr(10))}"


@pytest.mark.parametrize("block", BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_readme_block_runs_as_printed(block: str):
    if "cuda" in block and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_the_readme_has_blocks():
    assert len(BLOCKS) >= 6
