"""AdamW as two pure functions over a typed state: :func:`init` and :func:`update`.

Nothing here mutates its inputs, so everything composes with autograd and ``torch.func``: take
gradients through :func:`update` with respect to params, grads, state or hyperparameters, ``vmap``
it over a batch of tasks, or ``torch.compile`` it. The math is :mod:`compiled_adamw.update`, the
same two functions that the optimizer class runs::

    state = init(params)                                   # params: a dict, list or any pytree
    params, state = update(params, grads, state, lr=1e-3)  # new params, new state; nothing mutated

The fields of :class:`AdamWState` are named after ``torch.optim.AdamW``'s state-dict keys. One
step counter serves every leaf, since :func:`update` steps all leaves together.

Hyperparameters may be floats or tensors; a tensor with ``requires_grad=True`` receives a
gradient. Under ``torch.compile``, pass tensors for anything that changes between calls: a float
is a constant of the compiled graph. Tensor values are not range-checked (that would read them
back to the host); floats are.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .hyperparameters import NO_SCALER, check_value
from .update import adamw_coefficients, adamw_elementwise, compute_dtype

__all__ = ["AdamWState", "group_key", "hyperparameter_vector", "init", "restore", "step_flat",
           "step_together", "update"]


class AdamWState(NamedTuple):
    """The state of :func:`update`; ``exp_avg`` and friends have the structure of the params."""

    step: Tensor  # 0-dim float32: the number of steps taken so far
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any | None  # None unless ``init(..., amsgrad=True)``


def init(params: Any, *, amsgrad: bool = False) -> AdamWState:
    """Zero state for ``params`` (a tensor, or a list, tuple or dict of them, nested as you like).

    ``amsgrad`` is decided here: the state carries ``max_exp_avg_sq`` or it does not.
    """
    leaves = pytree.tree_leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")

    def zeros() -> Any:
        return pytree.tree_map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params)

    return AdamWState(step=torch.zeros((), dtype=torch.float32, device=device), exp_avg=zeros(),
                      exp_avg_sq=zeros(), max_exp_avg_sq=zeros() if amsgrad else None)


def update(
    params: Any,
    grads: Any,
    state: AdamWState,
    *,
    lr: float | Tensor = 1e-3,
    betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
    eps: float | Tensor = 1e-8,
    weight_decay: float | Tensor = 1e-2,
    eps_root: float | Tensor = 0.0,
    maximize: bool = False,
) -> tuple[Any, AdamWState]:
    """One AdamW step of every leaf of ``params``: returns ``(new_params, new_state)``.

    ``grads`` has the structure of ``params``. The equations and their defaults are
    ``torch.optim.AdamW``'s (see :mod:`compiled_adamw.update`); ``eps_root`` is added under the
    square root (Note [eps_root]): set it (e.g. 1e-16) when you differentiate through steps where
    some gradient entries may be exactly 0. ``maximize`` is static: it specializes a compiled graph.
    """
    leaves, spec = pytree.tree_flatten(params)
    grad_leaves = _leaves_like(grads, spec, "grads")
    exp_avgs = _leaves_like(state.exp_avg, spec, "state.exp_avg")
    exp_avg_sqs = _leaves_like(state.exp_avg_sq, spec, "state.exp_avg_sq")
    amsgrad = state.max_exp_avg_sq is not None
    max_exp_avg_sqs = (_leaves_like(state.max_exp_avg_sq, spec, "state.max_exp_avg_sq") if amsgrad
                       else [None] * len(leaves))
    step = state.step + 1
    hyperparameters = hyperparameter_vector(
        dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
             eps_root=eps_root), device=state.step.device)
    new_params, new_exp_avgs, new_exp_avg_sqs, new_maxes = ([None] * len(leaves) for _ in range(4))
    together: dict[tuple, list[int]] = {}
    for index, leaf in enumerate(leaves):
        together.setdefault(group_key(leaf), []).append(index)
    for indices in together.values():
        results = step_together(*(_pick(column, indices) for column in (leaves, grad_leaves, exp_avgs, exp_avg_sqs)),
                                _pick(max_exp_avg_sqs, indices) if amsgrad else None, step, hyperparameters,
                                amsgrad=amsgrad, maximize=maximize, scaled=False)
        for column, values in zip((new_params, new_exp_avgs, new_exp_avg_sqs, new_maxes), results):
            for i, value in zip(indices, values or [None] * len(indices)):
                column[i] = value
    return pytree.tree_unflatten(new_params, spec), AdamWState(
        step=step, exp_avg=pytree.tree_unflatten(new_exp_avgs, spec),
        exp_avg_sq=pytree.tree_unflatten(new_exp_avg_sqs, spec),
        max_exp_avg_sq=pytree.tree_unflatten(new_maxes, spec) if amsgrad else None)


def hyperparameter_vector(values: dict[str, float | Tensor], *, device: torch.device) -> Tensor:
    """``[lr, beta1, beta2, eps, weight_decay, eps_root, 1, 0]`` as one float64 tensor (the last
    two: no GradScaler, Note [AMP inside the step]), differentiable with respect to any tensor
    among ``values``; floats are range-checked."""
    for name, value in values.items():
        if not isinstance(value, Tensor):
            check_value(name, value)
    return torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device).reshape(())
                        for value in (*values.values(), *NO_SCALER)])


def step_flat(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    hyperparameters: Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    scaled: bool,
    skippable: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One out-of-place step of 1-D real tensors, results in ``param``'s dtype.

    ``step`` is the count of this step (the first is 1); ``hyperparameters`` is
    :func:`hyperparameter_vector`'s layout. The differentiable optimizer compiles this function
    and calls it through :func:`step_together`.
    """
    dtype = param.dtype
    coefficients = adamw_coefficients(step, *hyperparameters.unbind(), dtype=compute_dtype(dtype))
    new = adamw_elementwise(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                            amsgrad=amsgrad, maximize=maximize, scaled=scaled, skippable=skippable)
    return tuple(None if x is None else x.to(dtype) for x in new)


def step_together(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    step: Tensor,
    hyperparameters: Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    scaled: bool,
    skippable: bool = False,
    kernel: Callable[..., tuple] = step_flat,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]:
    """One step of ``params`` that share a step count, a real dtype and complex-ness, as a single
    call of :func:`step_flat` (or ``kernel``, a compiled copy of it) over their concatenation.

    Returns lists of new params and state, shaped and typed like ``params``, without mutating
    anything. Note [concatenated inputs]: the concatenation is a copy, which is what makes one
    compiled graph serve any number and shapes of params (its length is symbolic and it is never
    a view, on whose base Dynamo would guard), and what keeps the values the step used for its
    backward even if a caller later changes an input in place.
    """
    sizes = [_real(p).numel() for p in params]
    columns = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None)
    if sum(sizes) == 0:
        return tuple(None if column is None else list(column) for column in columns[:1] + columns[2:])
    flat = [None if column is None else torch.cat([_real(x).reshape(-1) for x in column]) for column in columns]
    new = kernel(*flat, step, hyperparameters, amsgrad=amsgrad, maximize=maximize, scaled=scaled,
                 skippable=skippable)
    return tuple(None if x is None else [restore(piece, like) for piece, like in zip(x.split(sizes), params)]
                 for x in new)


def _real(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def group_key(tensor: Tensor) -> tuple[torch.dtype, bool, torch.device]:
    """Tensors that :func:`step_together` may take in one call share this key."""
    return _real(tensor).dtype, tensor.is_complex(), tensor.device


def restore(flat: Tensor, like: Tensor) -> Tensor:
    """A 1-D real ``flat`` as a view with the shape and dtype kind of ``like``."""
    if like.is_complex():
        return torch.view_as_complex(flat.view(*like.shape, 2))
    return flat.view(like.shape)


def _pick(column: list[Any], indices: list[int]) -> list[Any]:
    return [column[i] for i in indices]


def _leaves_like(tree: Any, spec: pytree.TreeSpec, what: str) -> list[Any]:
    leaves, tree_spec = pytree.tree_flatten(tree)
    if tree_spec != spec:
        raise ValueError(f"{what} must have the structure of params: expected {spec}, got {tree_spec}")
    return leaves
