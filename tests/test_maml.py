"""MAML on sinusoid regression (Finn et al., 2017), data generated in-process: the README example.

The inner loop is ``compiled_adamw.inner_loop.unroll`` (5 AdamW steps per task), run over a batch
of tasks with ``torch.func.vmap``; the outer loop meta-trains the initialisation with backprop
through the inner steps. eps_root keeps the meta-gradient finite where a ReLU unit is dead (a grad
entry of exactly 0 makes d sqrt(v) infinite: Note [eps_root]); without it the loss turns NaN.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from compiled_adamw.inner_loop import unroll

INNER = dict(steps=5, lr=0.03, weight_decay=0.0, eps_root=1e-16)


def sinusoid_tasks(n: int, shots: int, generator: torch.Generator):
    """``n`` tasks y = a sin(x + b): (support x, support y, query x, query y), each (n, shots, 1)."""
    amplitude = torch.rand(n, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=generator) * math.pi
    x = torch.rand(n, 2 * shots, 1, generator=generator) * 10 - 5
    y = amplitude * torch.sin(x + phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def post_adaptation_loss(model: nn.Module, support_x, support_y, query_x, query_y) -> torch.Tensor:
    """Mean query loss after adapting ``model`` to each task's support set."""
    def one_task(support_x, support_y, query_x, query_y):
        adapted = unroll(model, F.mse_loss, support_x, support_y, **INNER)
        return F.mse_loss(torch.func.functional_call(model, adapted.params, query_x), query_y)

    return torch.func.vmap(one_task)(support_x, support_y, query_x, query_y).mean()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def test_meta_trained_initialisation_adapts_better_than_a_random_one():
    torch.manual_seed(0)
    model, random_init = mlp(), mlp()
    meta_optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        loss = post_adaptation_loss(model, *sinusoid_tasks(8, 10, generator))
        meta_optimizer.zero_grad()
        loss.backward()
        meta_optimizer.step()
    unseen = sinusoid_tasks(200, 10, torch.Generator().manual_seed(99))
    with torch.no_grad():  # no outer gradient needed; the inner grads come from torch.func.grad
        meta_trained, random = post_adaptation_loss(model, *unseen), post_adaptation_loss(random_init, *unseen)
    assert torch.isfinite(meta_trained)
    assert meta_trained < 0.85 * random, (meta_trained.item(), random.item())
