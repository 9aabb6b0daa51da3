"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (ZeRO and FSDP2 need one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="session")
def room_for_every_tests_optimizer():
    """Dynamo keeps one cache entry per optimizer on one code object (``helpers.compiled_by_user``'s
    function, or torch's step wrapper for torch's optimizers) and stops compiling past its
    recompile limit (8): the suite builds far more optimizers than a program does."""
    with torch._dynamo.config.patch(recompile_limit=1024):
        yield
