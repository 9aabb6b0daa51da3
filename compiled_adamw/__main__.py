"""``python -m compiled_adamw demo``: train one small model twice, with our AdamW and torch's."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from . import AdamW


def demo(steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    # A regression problem generated in-process: y = sin(x @ w) + noise.
    x = torch.randn(512, 16)
    y = torch.sin(x @ torch.randn(16, 1)) + 0.05 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 1))
    runs = {}
    for name, make in (("compiled_adamw.AdamW", AdamW), ("torch.optim.AdamW", torch.optim.AdamW)):
        net = copy.deepcopy(model)
        optimizer = make(net.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
        losses, times = [], []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
            scheduler.step()
            losses.append(loss.item())
        runs[name] = (net, losses, times)

    print(f"{'step':>6} " + " ".join(f"{name:>22}" for name in runs))
    for step in sorted({0, 1, steps // 4, steps // 2, steps - 1}):
        print(f"{step:>6} " + " ".join(f"{losses[step]:>22.6f}" for _, losses, _ in runs.values()))
    steady = {}
    for name, (_, _, times) in runs.items():
        steady[name] = sorted(times[1:])[len(times) // 2]
        note = " (includes compiling)" if name.startswith("compiled") else ""
        print(f"{name}: first step {times[0] * 1e3:.1f} ms{note}, median step {steady[name] * 1e3:.3f} ms")
    (ours, our_losses, _), (theirs, their_losses, _) = runs.values()
    gap = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    loss_gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(our_losses, their_losses))
    ours_ms, torch_ms = (1e3 * t for t in steady.values())
    # float32 ops rounded in another order (Inductor fuses multiply-adds; torch rounds each op) give
    # an ulp here and there, which training carries along: equal to float32 rounding, not bit for bit.
    print(f"result: the same training as torch.optim.AdamW to float32 rounding (losses within a relative "
          f"{loss_gap:.1e}, params within {gap:.1e} after {steps} steps); median step {ours_ms:.3f} ms "
          f"against torch's {torch_ms:.3f} ms ({ours_ms / torch_ms:.2f}x) on this small model, where "
          "per-call overhead dominates (see README, Performance)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m compiled_adamw")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("demo", help="train a small model with ours and torch's AdamW side by side")
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    demo(args.steps, args.seed)


if __name__ == "__main__":
    main()
