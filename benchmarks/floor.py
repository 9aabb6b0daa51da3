"""The least a step over flat state can do, timed beside ours in ``python -m benchmarks.loop``.

Issue 11 asks 1,000 params of 1,024 to step in a quarter of torch fused's time. A step that keeps
params and state in flat buffers cannot do less than this one: read the fresh ``p.grad``s,
gather them with one ``torch.cat`` into a flat grad buffer, count the step, run
``torch._fused_adamw_`` once over the flat buffers, and bump the params' version counters. It
checks nothing (a param moved, re-typed or without a grad is stepped wrong or fails), runs no
hooks of its own, has one group and is not an optimizer anyone should use: it is the floor that
ours' checks, chunks and bookkeeping stand on (``benchmarks/README.md``, "The default loop and
its floor").
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["FlatFloor"]


class FlatFloor(torch.optim.Optimizer):
    """AdamW on 1-D params moved into one flat buffer; torch's defaults but ``lr``."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3):
        params = list(params)
        if any(p.dim() != 1 for p in params):
            raise ValueError("FlatFloor gathers with one torch.cat: every param must be 1-D")
        super().__init__(params, {"lr": lr})
        self.flat_param = torch.cat([p.detach() for p in params])
        offset = 0
        for p in params:
            p.data = self.flat_param[offset : offset + p.numel()]
            offset += p.numel()
        self.flat_grad, self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.flat_param) for _ in range(3))
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.flat_param.device)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        params = self.param_groups[0]["params"]
        torch.cat([p.grad for p in params], out=self.flat_grad)
        self.step_count += 1
        torch._fused_adamw_([self.flat_param], [self.flat_grad], [self.exp_avg], [self.exp_avg_sq], [],
                            [self.step_count], lr=self.param_groups[0]["lr"], beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
        torch.autograd.graph.increment_version(params)
