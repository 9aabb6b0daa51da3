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

from .hyperparameters import check_value
from .update import adamw_coefficients, adamw_elementwise, compute_dtype

__all__ = ["AdamWState", "init", "real_flat", "restore", "step_flat", "update"]


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
    new = [step_flat_as(p, g, m, v, v_max, step, hyperparameters, amsgrad=amsgrad, maximize=maximize)
           for p, g, m, v, v_max in zip(leaves, grad_leaves, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
    new_params, new_exp_avgs, new_exp_avg_sqs, new_maxes = [list(column) for column in zip(*new)] or [[]] * 4
    return pytree.tree_unflatten(new_params, spec), AdamWState(
        step=step, exp_avg=pytree.tree_unflatten(new_exp_avgs, spec),
        exp_avg_sq=pytree.tree_unflatten(new_exp_avg_sqs, spec),
        max_exp_avg_sq=pytree.tree_unflatten(new_maxes, spec) if amsgrad else None)


def hyperparameter_vector(values: dict[str, float | Tensor], *, device: torch.device) -> Tensor:
    """``[lr, beta1, beta2, eps, weight_decay, eps_root]`` as one float64 tensor, differentiable
    with respect to any tensor among ``values``; floats are range-checked."""
    for name, value in values.items():
        if not isinstance(value, Tensor):
            check_value(name, value)
    return torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device).reshape(())
                        for value in values.values()])


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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One out-of-place step of 1-D real tensors, results in ``param``'s dtype.

    ``step`` is the count of this step (the first is 1); ``hyperparameters`` is
    :func:`hyperparameter_vector`'s layout. The differentiable optimizer compiles this function;
    its inputs are always 1-D so that one compiled graph serves params of every rank.
    """
    dtype = param.dtype
    coefficients = adamw_coefficients(step, *hyperparameters.unbind(), dtype=compute_dtype(dtype))
    new = adamw_elementwise(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                            amsgrad=amsgrad, maximize=maximize)
    return tuple(None if x is None else x.to(dtype) for x in new)


def step_flat_as(
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
    kernel: Callable[..., tuple] = step_flat,
    param_is_overwritten: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`step_flat` (or ``kernel``, a compiled copy of it) for tensors of any shape and of real
    or complex dtype; results have ``param``'s shape and dtype.

    ``param_is_overwritten``: the caller will write the result into ``param`` in place, so the
    step keeps its own copy of the old value (its backward may need it).
    """
    if param.numel() == 0:
        return param, exp_avg, exp_avg_sq, max_exp_avg_sq
    flat_param = _private_flat(param) if param_is_overwritten else real_flat(param)
    flat = [None if x is None else real_flat(x) for x in (grad, exp_avg, exp_avg_sq, max_exp_avg_sq)]
    new = kernel(flat_param, *flat, step, hyperparameters, amsgrad=amsgrad, maximize=maximize)
    return tuple(None if x is None else restore(x, param) for x in new)


def real_flat(tensor: Tensor) -> Tensor:
    """``tensor`` as a 1-D real tensor that is not a view (complex numbers as pairs, as torch
    steps them).

    Note [flat inputs are not views]: Dynamo guards on an input view's base (its rank and sizes),
    so views of params of different ranks would each compile the step again, soon past the
    recompile limit. The result is therefore one of: the 1-D tensor itself; the 1-D base that
    ``tensor`` is a full view of (:func:`restore` returns such views, so state and params coming
    back from a step cost nothing); or else a contiguous copy. The first two share ``tensor``'s
    memory and version counter, so an in-place change to ``tensor`` after the step makes a
    backward through the step fail loudly, as autograd does everywhere; a copy keeps the values
    the step used.
    """
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    base = real._base
    if base is None:
        return real if real.dim() == 1 else _private_flat(real)
    if (base.dim() == 1 and base.dtype == real.dtype and base.numel() == real.numel()
            and base.storage_offset() == real.storage_offset() and real.is_contiguous()):
        return base
    return _private_flat(real)


def _private_flat(tensor: Tensor) -> Tensor:
    """A 1-D real copy of ``tensor`` that nothing else references."""
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return real.reshape(-1).clone(memory_format=torch.contiguous_format)


def restore(flat: Tensor, like: Tensor) -> Tensor:
    """Undo :func:`real_flat`: ``flat`` with the shape and dtype kind of ``like``."""
    if like.is_complex():
        return torch.view_as_complex(flat.view(*like.shape, 2))
    return flat.view(like.shape)


def _leaves_like(tree: Any, spec: pytree.TreeSpec, what: str) -> list[Any]:
    leaves, tree_spec = pytree.tree_flatten(tree)
    if tree_spec != spec:
        raise ValueError(f"{what} must have the structure of params: expected {spec}, got {tree_spec}")
    return leaves
