"""``python -m benchmarks.soak``: thousands of steps beside torch.optim.AdamW, checking what a long run
would reveal and a short test cannot.

Both optimizers train identical MLPs under OneCycleLR (beta1 cycling), with random params left
without a grad on random steps, and periodic checkpoint round trips (``torch.save`` /
``torch.load(weights_only=True)``) into the same optimizer and into fresh ones. It reports and
checks: resident memory stays flat after warm-up, nothing recompiles after the first steps, and
the final params equal torch's to float32 rounding. Exits 1 if a check fails. Not part of CI.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import torch
from torch._dynamo.utils import counters

from compiled_adamw import AdamW


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _through_disk(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def _build(kind: str, model: torch.nn.Module, total: int):
    make = AdamW if kind == "ours" else torch.optim.AdamW
    optimizer = make(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=total, cycle_momentum=True)
    return optimizer, scheduler


def soak(steps: int, round_trip_every: int, fresh_every: int, skip_probability: float) -> bool:
    models = {kind: _model() for kind in ("ours", "torch")}
    built = {kind: _build(kind, models[kind], steps) for kind in models}
    generator = torch.Generator().manual_seed(1)
    target = torch.nn.Linear(32, 1)
    memory, graphs_after_warmup = [], None
    for step in range(steps):
        x = torch.randn(64, 32, generator=generator)
        y = target(x).detach()
        skipped = torch.rand(len(list(models["ours"].parameters())), generator=generator) < skip_probability
        for kind, model in models.items():
            optimizer, scheduler = built[kind]
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for p, skip in zip(model.parameters(), skipped.tolist()):
                if skip:
                    p.grad = None
            optimizer.step()
            scheduler.step()
            if step % round_trip_every == round_trip_every - 1:
                optimizer.load_state_dict(_through_disk(optimizer.state_dict()))
            if step % fresh_every == fresh_every - 1:
                fresh, fresh_scheduler = _build(kind, model, steps)
                fresh_scheduler.load_state_dict(scheduler.state_dict())
                fresh.load_state_dict(_through_disk(optimizer.state_dict()))
                built[kind] = fresh, fresh_scheduler
        if step == 20:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        if step % 100 == 99:
            memory.append(_resident_mib())
    recompiles = counters["stats"]["unique_graphs"] - graphs_after_warmup
    difference = max((p - q).abs().max().item() for p, q in zip(models["ours"].parameters(), models["torch"].parameters()))
    scale = max(q.abs().max().item() for q in models["torch"].parameters())
    growth = memory[-1] - memory[len(memory) // 4] if len(memory) >= 4 else 0.0
    checks = {
        f"resident memory flat after warm-up (grew {growth:.1f} MiB; first {memory[0]:.0f}, last {memory[-1]:.0f})":
            growth < 16,
        f"no graph compiled after step 20 ({recompiles})": recompiles == 0,
        f"final params equal torch's to float32 rounding (max |diff| {difference:.2e}, max |param| {scale:.2f})":
            difference <= 1e-4 * max(scale, 1.0),
    }
    for text, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--round-trip-every", type=int, default=97, help="steps between round trips into the same optimizer")
    parser.add_argument("--fresh-every", type=int, default=500, help="steps between round trips into a fresh optimizer")
    parser.add_argument("--skip-probability", type=float, default=0.1, help="chance that a param has no grad on a step")
    arguments = parser.parse_args(argv)
    print(f"soak: {arguments.steps} steps, ours and torch.optim.AdamW side by side, torch {torch.__version__}")
    return 0 if soak(arguments.steps, arguments.round_trip_every, arguments.fresh_every, arguments.skip_probability) else 1


if __name__ == "__main__":
    sys.exit(main())
