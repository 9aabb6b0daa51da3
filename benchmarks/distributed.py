"""``python -m benchmarks.distributed``: two ranks on loopback (gloo, CPU), each rank's whole
iteration (zero_grad, forward, backward with the wrapper's communication, step) and its step alone,
under FSDP2 (``fully_shard`` per layer) and DDP (with and without ``gradient_as_bucket_view``): ours
against torch's foreach and fused AdamW, each contender its own copy of the model, iterations
interleaved. Medians over the repetitions; ``x fused`` divides by fused's from the same run, rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from compiled_adamw import AdamW

from .measure import each_after_itself

CONTENDERS = {
    "ours": lambda params: AdamW(params, lr=1e-3),
    "torch-foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
    "torch-fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
}
WRAPPERS = ("fsdp2", "ddp", "ddp-bucket-view")


def _model(width: int, layers: int, wrapper: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                  for _ in range(layers)))
    if wrapper == "fsdp2":
        for layer in model:
            fully_shard(layer)
        return fully_shard(model)
    return DistributedDataParallel(model, gradient_as_bucket_view=wrapper == "ddp-bucket-view")


def _worker(rank: int, store: str, wrapper: str, width: int, layers: int, repetitions: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    try:
        runs = {}
        for name, make in CONTENDERS.items():
            model = _model(width, layers, wrapper)
            runs[name] = (model, make(model.parameters()))
        x = torch.randn(64, width, generator=torch.Generator().manual_seed(rank))

        def iteration(model, optimizer) -> tuple[float, float]:
            start = time.perf_counter()
            optimizer.zero_grad()
            model(x).square().mean().backward()
            before_step = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            return end - start, end - before_step

        for model, optimizer in runs.values():
            for _ in range(3):  # compiles ours
                iteration(model, optimizer)
        # The same order on every rank: the collectives inside each iteration pair up.
        seconds = each_after_itself({name: lambda run=run: iteration(*run) for name, run in runs.items()}, repetitions)
        rows = {name: {"iteration_ms": 1e3 * statistics.median(s[0] for s in values),
                       "step_ms": 1e3 * statistics.median(s[1] for s in values)}
                for name, values in seconds.items()}
        for row in rows.values():
            for key in ("iteration_ms", "step_ms"):
                row[key.replace("_ms", "_x_fused")] = row[key] / rows["torch-fused"][key]
        results[rank] = rows
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    results = {}
    print(f"{args.layers} x Linear({args.width}, {args.width}), batch 64 per rank, 2 ranks (gloo)\n")
    print("| wrapper | contender | step ms | x fused | iteration ms | x fused |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for wrapper in WRAPPERS:
        with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
            shared = manager.dict()
            mp.spawn(_worker, args=(f"{folder}/store", wrapper, args.width, args.layers, args.repetitions, shared),
                     nprocs=2, join=True)
            results[wrapper] = rows = dict(shared[0])
        for name, row in rows.items():
            print(f"| {wrapper} | {name} | {row['step_ms']:.2f} | {row['step_x_fused']:.2f}x | "
                  f"{row['iteration_ms']:.2f} | {row['iteration_x_fused']:.2f}x |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
