"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (ZeRO and FSDP2 need one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
