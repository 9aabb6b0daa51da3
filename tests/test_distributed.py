"""Two ranks on loopback (gloo), each test one spawn: ZeroRedundancyOptimizer (params re-pointed
into its buckets are stepped there), DDP (grads read where DDP's buckets put them) and FSDP2
(sharded params stepped as their local shards, state kept as DTensors, sharded checkpoints)
-- Note [where memory lives]. Every run is compared with torch.optim.AdamW under the same wrapper,
or with one process on the full batch.

The step runs eagerly here (``compile=False``: the same functions, and the same placement code,
without two processes compiling on a 2-core machine); ``test_drop_in.py`` and the one-rank FSDP2
test below step through the compiled kernels.
"""

from __future__ import annotations

import copy
import datetime
import functools
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from compiled_adamw import AdamW

from .helpers import USERS_COMPILES, batch, compiled_by_user, model_and_twin

WORLD_SIZE = 2
STEPS = 4
EAGER = dict(compile=False)


def _in_process_group(worker):
    """``worker(rank, *args)`` run inside a gloo process group of WORLD_SIZE ranks; what it returns
    lands in ``results[rank]``."""
    @functools.wraps(worker)
    def run(rank: int, store: str, results, *args) -> None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE,
                                timeout=datetime.timedelta(seconds=60))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                results[rank] = worker(rank, *args)
        finally:
            dist.destroy_process_group()
    return run


def _spawn(worker, folder, *args) -> list:
    folder.mkdir(exist_ok=True)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(folder / "store"), results, *args), nprocs=WORLD_SIZE, join=True)
        return [results[rank] for rank in range(WORLD_SIZE)]


def _rank_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(10 * step + rank)  # each rank its own data


def _full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What all ranks see together at ``step``: with equal shares, the mean loss over it has the
    mean of the ranks' grads."""
    xs, ys = zip(*(_rank_batch(step, rank) for rank in range(WORLD_SIZE)))
    return torch.cat(xs), torch.cat(ys)


def _train(model, optimizer, steps: range, data) -> None:
    for step in steps:
        x, y = data(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    """All params, whole (an FSDP2 param is gathered from the ranks)."""
    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1)
                      for p in model.parameters()])


def _one_process(steps: range) -> torch.nn.Module:
    """The reference: one process, full batches, torch.optim.AdamW."""
    model, _ = model_and_twin()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps, _full_batch)
    return model


# ---- ZeroRedundancyOptimizer -----------------------------------------------------------------

@_in_process_group
def _train_under_zero(rank: int, bucket_view: bool) -> dict:
    finals, consolidated = [], None
    for optimizer_class, options in ((AdamW, EAGER), (torch.optim.AdamW, {})):
        model, _ = model_and_twin()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class,
                                            parameters_as_bucket_view=bucket_view, lr=1e-2, **options)
        for step in range(STEPS):
            x, y = _rank_batch(step, rank)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for p in model.parameters():  # data-parallel: the mean grad on every rank
                dist.all_reduce(p.grad)
                p.grad /= WORLD_SIZE
            optimizer.step()
        finals.append(_flat(model))
        if optimizer_class is AdamW:
            optimizer.consolidate_state_dict(to=0)
            consolidated = optimizer.state_dict() if rank == 0 else None
    return {"finals": torch.stack(finals), "consolidated": consolidated}


@pytest.mark.parametrize("bucket_view", [True, False], ids=["bucket_view", "no_bucket_view"])
def test_zero_keeps_the_ranks_identical_equal_to_torch_and_consolidates_for_torch(bucket_view, tmp_path):
    rank0, rank1 = _spawn(_train_under_zero, tmp_path, bucket_view)
    ours, theirs = rank0["finals"]
    assert torch.equal(rank0["finals"][0], rank1["finals"][0]), "the ranks drifted apart"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours, _flat(model_and_twin()[0]))
    # The consolidated state_dict continues in torch.optim.AdamW exactly as in ours.
    checkpoint = rank0["consolidated"]
    continued = []
    for make in (torch.optim.AdamW, AdamW):
        model, _ = model_and_twin()
        torch.nn.utils.vector_to_parameters(ours.clone(), model.parameters())  # the params alias it
        optimizer = make(model.parameters())
        optimizer.load_state_dict(copy.deepcopy(checkpoint))  # torch's steps would count on in it
        assert all(type(group["lr"]) is float and group["lr"] == 1e-2 for group in optimizer.param_groups)
        assert all(float(optimizer.state[p]["step"]) == STEPS for p in model.parameters())
        _train(model, optimizer, range(STEPS, STEPS + 2), _full_batch)
        continued.append(_flat(model))
    torch.testing.assert_close(continued[1], continued[0], rtol=1e-5, atol=1e-6)


# ---- DDP -------------------------------------------------------------------------------------

@_in_process_group
def _train_under_ddp(rank: int, bucket_view: bool) -> torch.Tensor:
    model, _ = model_and_twin()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    _train(ddp, AdamW(ddp.parameters(), lr=1e-2, **EAGER), range(STEPS), functools.partial(_rank_batch, rank=rank))
    return _flat(model)


@pytest.mark.parametrize("bucket_view", [True, False], ids=["bucket_view", "no_bucket_view"])
def test_ddp_keeps_the_ranks_identical_and_equal_to_one_process(bucket_view, tmp_path):
    rank0, rank1 = _spawn(_train_under_ddp, tmp_path, bucket_view)
    assert torch.equal(rank0, rank1), "the ranks drifted apart"
    torch.testing.assert_close(rank0, _flat(_one_process(range(STEPS))), rtol=1e-5, atol=1e-6)


# ---- FSDP2 -----------------------------------------------------------------------------------

def _sharded(optimizer_class=AdamW, **options) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, _ = model_and_twin()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, optimizer_class(model.parameters(), lr=1e-2, **options)


def _checkpoint_state(model, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _load(model, optimizer, folder) -> None:
    state = _checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@_in_process_group
def _train_under_fsdp2(rank: int, folder: str) -> dict:
    data = functools.partial(_rank_batch, rank=rank)
    finals = {}
    for name, optimizer_class, options in (("ours", AdamW, EAGER), ("torch", torch.optim.AdamW, {})):
        model, optimizer = _sharded(optimizer_class, **options)
        _train(model, optimizer, range(STEPS), data)
        finals[name] = _flat(model)
        if name == "ours":
            placements = [(p.placements, p.device_mesh, {key: (type(value), getattr(value, "placements", None),
                                                                getattr(value, "device_mesh", None))
                                                          for key, value in optimizer.state[p].items()})
                          for p in model.parameters()]
    # The step inside a user's function: its op gets each rank's local shards.
    model, optimizer = _sharded(**EAGER)
    compiled_step = compiled_by_user(optimizer, "users-function")
    for step in range(STEPS):
        x, y = data(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        compiled_step()
    finals["ours, in a user's compile"] = _flat(model)
    # A sharded checkpoint, written halfway by both ranks, then resumed by both.
    model, optimizer = _sharded(**EAGER)
    _train(model, optimizer, range(STEPS // 2), data)
    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=folder)
    resumed_model, resumed = _sharded(**EAGER)
    _load(resumed_model, resumed, folder)
    lr = resumed.param_groups[0]["lr"]
    _train(resumed_model, resumed, range(STEPS // 2, STEPS), data)
    return {**finals, "resumed": _flat(resumed_model), "placements": placements, "lr": lr}


def test_fsdp2_trains_as_torch_keeps_sharded_state_and_resumes_from_a_sharded_checkpoint(tmp_path):
    """Two ranks: ours equals torch's AdamW, stepped eagerly and inside a user's compile; the state
    is sharded as the params; a sharded checkpoint resumes bit-identically and reshards."""
    rank0, rank1 = _spawn(_train_under_fsdp2, tmp_path, str(tmp_path / "checkpoint"))
    for rank in (rank0, rank1):
        torch.testing.assert_close(rank["ours"], rank["torch"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["ours, in a user's compile"], rank["torch"], rtol=1e-5, atol=1e-6)
        assert torch.equal(rank["resumed"], rank["ours"]), "the resumed run differs from the uninterrupted one"
        assert rank["lr"] == 1e-2 and type(rank["lr"]) is float
        for param_placements, mesh, state in rank["placements"]:
            assert state["step"][0] is torch.Tensor  # as torch keeps it: one count, not sharded
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key] == (DTensor, param_placements, mesh), f"{key} is not sharded as its param"
    assert torch.equal(rank0["ours"], rank1["ours"])
    torch.testing.assert_close(rank0["ours"], _flat(_one_process(range(STEPS))), rtol=1e-5, atol=1e-6)
    # The 2-rank checkpoint, resharded into one process without FSDP.
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        _load(model, optimizer, tmp_path / "checkpoint")
    assert optimizer.param_groups[0]["lr"] == 1e-2
    _train(model, optimizer, range(STEPS // 2, STEPS), _full_batch)
    torch.testing.assert_close(_flat(model), rank0["ours"], rtol=1e-5, atol=1e-6)


def test_fsdp2_steps_local_shards_with_the_compiled_kernels(one_process_group):
    model, optimizer = _sharded()
    assert optimizer.compile
    shards = [p.to_local().data_ptr() for p in model.parameters()]
    _train(model, optimizer, range(STEPS), _full_batch)
    assert [p.to_local().data_ptr() for p in model.parameters()] == shards, "a shard was taken from FSDP"
    torch.testing.assert_close(_flat(model), _flat(_one_process(range(STEPS))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", USERS_COMPILES)
def test_fsdp2_step_inside_a_users_fullgraph_compile(one_process_group, how):
    """The step compiled by the user over FSDP2's params (the op of a user's function receives the
    local shards of params and grads: DTensor has no rule for it) compiles once, leaves the shards
    where FSDP keeps them and gives one process's numbers."""
    model, optimizer = _sharded()
    step = compiled_by_user(optimizer, how)
    shards = [p.to_local().data_ptr() for p in model.parameters()]
    for index in range(STEPS):
        x, y = _full_batch(index)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        if index == 0:
            graphs_after_first_call = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first_call
    assert [p.to_local().data_ptr() for p in model.parameters()] == shards
    torch.testing.assert_close(_flat(model), _flat(_one_process(range(STEPS))), rtol=1e-5, atol=1e-6)


def test_a_plain_tensor_loaded_as_a_sharded_params_state_is_refused(one_process_group):
    model, optimizer = _sharded()
    _train(model, optimizer, range(1), _full_batch)
    checkpoint = copy.deepcopy(optimizer.state_dict())  # its entries are the optimizer's own dicts
    checkpoint["state"][0]["exp_avg"] = checkpoint["state"][0]["exp_avg"].full_tensor()
    before = optimizer.state[model[0].weight]["exp_avg"].to_local().clone()
    with pytest.raises(ValueError, match=r"state\[0\].*'exp_avg'.*must be a DTensor sharded as its param.*"
                                         r"got a plain tensor"):
        optimizer.load_state_dict(checkpoint)
    assert torch.equal(optimizer.state[model[0].weight]["exp_avg"].to_local(), before)


@pytest.mark.parametrize("where", ["eager", "users-compile"])
def test_fsdp2_clipping_inside_the_step_matches_one_process(one_process_group, where):
    """``users-compile``: clip and step in a user's ``fullgraph=True`` function, where the norm is
    an op over the local shards' grads (Note [a step alone with the params])."""
    model, optimizer = _sharded()
    reference_model, _ = model_and_twin()
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2)

    def clip_and_step():
        total = optimizer.clip_grad_norm_(0.05)
        optimizer.step()
        return total

    ours_clip_and_step = torch.compile(clip_and_step, fullgraph=True) if where == "users-compile" else clip_and_step
    for step in range(STEPS):
        for m, o in ((model, optimizer), (reference_model, reference)):
            x, y = _full_batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if o is optimizer:
                norm = ours_clip_and_step()
            else:
                reference_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                o.step()
        assert not isinstance(norm, DTensor)
        torch.testing.assert_close(norm, reference_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(_flat(model), _flat(reference_model), rtol=1e-5, atol=1e-6)
