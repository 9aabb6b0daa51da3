"""Every Python block of README.md and docs/*.md runs as printed, so the documentation cannot
rot. Blocks that use CUDA skip without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, str]]:
    """(id, code) of every Python block, the id naming its page and line."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
            blocks.append((f"{page.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
    return blocks


BLOCKS = _blocks()


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[where for where, _ in BLOCKS])
def test_documentation_block_runs_as_printed(code: str):
    if "cuda" in code and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(compile(code, "documentation", "exec"), {"__name__": "documentation"})


def test_the_documentation_has_its_blocks():
    assert len(BLOCKS) >= 6
