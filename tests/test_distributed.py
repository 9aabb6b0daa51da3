"""Two ranks on loopback (gloo): params that ZeroRedundancyOptimizer re-points into its buckets are
stepped there, so the ranks stay identical, as with torch.optim.AdamW (Note [where memory lives]).

The step runs eagerly here (``compile=False``: the same functions, and the same placement code,
without two processes compiling on a 2-core machine)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

from compiled_adamw import AdamW

from .helpers import batch, model_and_twin

STEPS = 4


def _train_under_zero(rank: int, world_size: int, store: str, bucket_view: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        finals = []
        for optimizer_class, options in ((AdamW, dict(compile=False)), (torch.optim.AdamW, {})):
            model, _ = model_and_twin()
            optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class,
                                                parameters_as_bucket_view=bucket_view, lr=1e-2, **options)
            for step in range(STEPS):
                x, y = batch(10 * step + rank)  # each rank its own data
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                for p in model.parameters():  # data-parallel: the mean grad on every rank
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
                optimizer.step()
            finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        results[rank] = torch.stack(finals)
    finally:
        dist.destroy_process_group()


def _run(bucket_view: bool, folder) -> list[torch.Tensor]:
    world_size = 2
    folder.mkdir()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train_under_zero, args=(world_size, str(folder / "store"), bucket_view, results),
                 nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]


def test_zero_with_bucket_views_keeps_the_ranks_identical_and_equal_to_torch(tmp_path):
    for bucket_view in (True, False):
        (rank0, rank1) = _run(bucket_view, tmp_path / str(bucket_view))
        ours, theirs = rank0
        assert torch.equal(rank0[0], rank1[0]), f"bucket_view={bucket_view}: the ranks drifted apart"
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert not torch.equal(ours, torch.cat([p.detach().reshape(-1) for p in model_and_twin()[0].parameters()]))
