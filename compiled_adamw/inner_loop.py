"""K differentiable AdamW steps on an ``nn.Module``: the inner loop of MAML and of hyperparameter
learning, without rewriting the model.

::

    adapted = unroll(model, F.mse_loss, x_support, y_support, steps=5, lr=lr)
    outer_loss = F.mse_loss(torch.func.functional_call(model, adapted.params, x_query), y_query)
    outer_loss.backward()   # gradients reach model's parameters (the initialisation) and lr

Each step takes ``torch.func.grad`` of the loss at the current params (so the gradient itself is
differentiable, as MAML needs) and applies :func:`compiled_adamw.functional.update`. Because it is
built from ``torch.func`` pieces it also runs under ``torch.func.vmap``, over a batch of tasks.

Memory: backpropagating through ``K`` steps keeps, for every step, the model's forward and
backward activations (what ``create_graph=True`` keeps) plus the update's saved tensors, about six
param-sized tensors per step for AdamW (measured by ``tests/test_differentiable.py``). So memory
grows linearly with ``K``. ``truncate_every=N`` detaches params and state every ``N`` steps
(truncated backpropagation): memory is then bounded by ``N`` steps, and gradients reach only what
the last window used -- the hyperparameters, but no longer the initial params once a cut happened.
``first_order=True`` detaches the gradients (first-order MAML): no second derivatives are kept.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .functional import AdamWState, init, update

__all__ = ["Unrolled", "unroll"]


class Unrolled(NamedTuple):
    params: dict[str, Tensor]  # the adapted params, with their autograd history
    state: AdamWState


def unroll(
    module: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Any,
    targets: Any,
    *,
    steps: int,
    params: dict[str, Tensor] | None = None,
    state: AdamWState | None = None,
    lr: float | Tensor = 1e-3,
    betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
    eps: float | Tensor = 1e-8,
    weight_decay: float | Tensor = 1e-2,
    eps_root: float | Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    truncate_every: int | None = None,
    first_order: bool = False,
) -> Unrolled:
    """Run ``steps`` AdamW steps on ``loss_fn(module(inputs), targets)``, functionally.

    Args:
        module: the model; it is called through ``torch.func.functional_call`` and never modified.
        loss_fn: ``loss_fn(outputs, targets)`` gives a scalar loss.
        inputs: the model's input, or a tuple of positional inputs.
        params: the starting params (default: the module's own ``named_parameters()``, so the
            outer gradient reaches them). Buffers are the module's.
        state: AdamW state to continue from (default: fresh, from :func:`~compiled_adamw.functional.init`).
        lr, betas, eps, weight_decay, eps_root, maximize: as :func:`~compiled_adamw.functional.update`.
            Tensors with ``requires_grad=True`` receive hypergradients.
        amsgrad: used only when ``state`` is None; otherwise the state decides.
        truncate_every: cut the autograd history of params and state every that many steps.
        first_order: treat each step's gradient as a constant (first-order MAML).
    """
    if steps < 0 or (truncate_every is not None and truncate_every < 1):
        raise ValueError(f"steps must be >= 0 and truncate_every >= 1 (or None), got steps={steps}, "
                         f"truncate_every={truncate_every}")
    if params is None:
        params = dict(module.named_parameters())
    if state is None:
        state = init(params, amsgrad=amsgrad)

    def loss_at(current: dict[str, Tensor]) -> Tensor:
        return loss_fn(torch.func.functional_call(module, current, inputs), targets)

    for step in range(steps):
        if truncate_every is not None and step > 0 and step % truncate_every == 0:
            params, state = _detached(params), _detached(state)
        grads = torch.func.grad(loss_at)(params)
        if first_order:
            grads = _detached(grads)
        params, state = update(params, grads, state, lr=lr, betas=betas, eps=eps,
                               weight_decay=weight_decay, eps_root=eps_root, maximize=maximize)
    return Unrolled(params, state)


def _detached(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)
