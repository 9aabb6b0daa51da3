"""``python -m benchmarks.profile_large``: where our step's time goes on one large fp32 tensor.

Times, interleaved, the whole step (ours and torch fused), our kernel alone as the optimizer
compiles it (``dynamic=True``, called past Dynamo's frame hook) and the same function compiled for
the static length, called through ``torch.compile``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from compiled_adamw import AdamW, kernels


def main(elements: int = 16 * 2**20, repetitions: int = 15) -> None:
    p = torch.randn(elements)
    p.grad = torch.randn(elements)
    q = p.detach().clone()
    q.grad = p.grad.clone()
    ours, fused = AdamW([p], lr=1e-3), torch.optim.AdamW([q], lr=1e-3, fused=True)
    ours.step()
    fused.step()
    bucket, vector = ours._buckets[0][0], ours._settings[0].vector
    update = kernels._compiled_update("cpu", torch.float32, False, False, False, False)
    windows = (bucket.flat_param[:elements], p.grad, bucket.exp_avg[:elements],
               bucket.exp_avg_sq[:elements], None, bucket.steps[0], vector)
    static = torch.compile(kernels.apply_update_, fullgraph=True, dynamic=False)
    unviewed = [kernels.without_base(w) for w in windows]
    parts = {
        "ours: whole step": ours.step,
        "torch fused: whole step": fused.step,
        "ours: kernel (dynamic=True)": lambda: update(*windows),
        "same function, dynamic=False": lambda: static(*unviewed, amsgrad=False, maximize=False, scaled=False),
    }
    seconds = {name: [] for name in parts}
    for _ in range(3):
        for part in parts.values():
            part()
    for _ in range(repetitions):
        for name, part in parts.items():
            start = time.perf_counter()
            part()
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(f"{name:42s} median {1e3 * statistics.median(values):7.3f} ms   min {1e3 * min(values):7.3f} ms")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
