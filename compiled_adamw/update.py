"""The AdamW update as pure functions of tensors: the single source of the math.

Every path of this package (eager, compiled, graph-captured, differentiable and the functional
API) computes one step with these two functions and nothing else:

* :func:`adamw_coefficients` turns the step count and the hyperparameters (0-dim tensors) into the
  handful of scalars one step needs. It is O(1) work, kept out of the elementwise kernel on purpose
  (Note [scalars outside the elementwise kernel]).
* :func:`adamw_elementwise` applies one step to tensors of any shape (in this package: flat buffers
  holding a whole group's params) and returns the new values without mutating anything.

For step ``t`` (counted from 1), learning rate ``lr``, betas ``b1, b2``, ``eps``, weight decay ``wd``::

    g      = -grad if maximize else grad
    param  = param * (1 - lr * wd)
    m      = lerp(m, g, 1 - b1)                      # = b1 * m + (1 - b1) * g
    v      = b2 * v + (1 - b2) * g * g
    v_max  = max(v_max, v)                           # amsgrad only: the raw v, as torch does
    v_used = v_max if amsgrad else v
    denom  = sqrt(v_used + eps_root * (1 - b2**t)) / sqrt(1 - b2**t) + eps   # eps_root: ours, 0
    param  = param - lr / (1 - b1**t) * m / denom

Note [AMP inside the step]: with ``torch.amp.GradScaler``, ``grad`` is first divided by
``grad_scale``, and when ``found_inf`` is 1 the step leaves params and state as they were (the
caller leaves the step count too), as torch's fused AdamW does: no host sync decides it. The
coefficients always carry ``1 / grad_scale`` and ``found_inf`` (1 and 0 without a scaler), but
the elementwise work is two static options, ``scaled`` (the multiplication) and ``skippable``
(the selects): measured on CPU (one 16M fp32 tensor, the default loop), the unscale and the three
selects made every step 1.8x slower (8.8 against 4.9 ms), a price that only steps with a scaler
should pay; a clip (Note [clipping inside the step]) multiplies and never skips.

This is ``torch.optim.AdamW``'s documented algorithm with ``m_hat / (sqrt(v_hat) + eps)`` rewritten
exactly as its implementation computes it. Note [where eps sits]: eps is added to
``sqrt(v_hat)``, the bias-corrected root, never to ``sqrt(v)``; folding the bias corrections into a
single step size would move eps and change the result for small ``v``. The float64 numpy oracle in
``tests/oracle.py`` pins this down.

For AMSGrad, torch's documentation writes ``max(v_hat_max, v_hat)``; its implementation (which we
match) keeps the max of the raw ``v`` and bias-corrects that.

Note [eps_root]: ``eps_root`` (ours, default 0; optax and TorchOpt have it) is added inside the
square root. ``d sqrt(v) / dv`` is infinite at ``v = 0``, so a gradient entry that is exactly 0
on every step so far makes meta-gradients through the step NaN; a tiny ``eps_root`` (say 1e-16)
keeps them finite. With ``eps_root = 0`` the result is bit-for-bit the formula above without it,
because ``x + 0 == x``; in the documentation's terms it is ``sqrt(v_hat + eps_root) + eps``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Coefficients", "adamw_coefficients", "adamw_elementwise", "compute_dtype"]


class Coefficients(NamedTuple):
    """The scalars of one step, as 0-dim tensors of the compute dtype."""

    decay: Tensor  # 1 - lr * wd
    step_size: Tensor  # lr / (1 - b1**t)
    bias_correction2_sqrt: Tensor  # sqrt(1 - b2**t)
    eps: Tensor
    root_offset: Tensor  # eps_root * (1 - b2**t), added to v under the root (Note [eps_root])
    one_minus_beta1: Tensor
    beta2: Tensor
    one_minus_beta2: Tensor
    grad_multiplier: Tensor  # 1 / grad_scale (Note [AMP inside the step])
    skip: Tensor  # found_inf: 1 keeps params and state as they were


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for params of ``dtype``: low precision is updated in float32."""
    if dtype.is_complex:
        dtype = dtype.to_real()
    return torch.float64 if dtype == torch.float64 else torch.float32


def adamw_coefficients(
    step: Tensor,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    eps_root: Tensor,
    grad_scale: Tensor,
    found_inf: Tensor,
    *,
    dtype: torch.dtype,
) -> Coefficients:
    """The scalars of step ``step`` (already incremented: the first step is 1), in ``dtype``.

    Note [scalars in float64]: torch.optim.AdamW computes ``1 - b1**t`` and friends in Python
    floats (float64) and rounds once when it applies them; so do we, which keeps float32 results
    within an ulp of torch's and keeps ``b2**t`` accurate for ``b2`` close to 1.
    """
    f64 = torch.float64
    step, lr, beta1, beta2, eps, weight_decay, eps_root, grad_scale, found_inf = (
        x.to(f64) for x in (step, lr, beta1, beta2, eps, weight_decay, eps_root, grad_scale, found_inf)
    )
    bias_correction2 = 1 - beta2**step
    return Coefficients(
        decay=(1 - lr * weight_decay).to(dtype),
        step_size=(lr / (1 - beta1**step)).to(dtype),
        bias_correction2_sqrt=bias_correction2.sqrt().to(dtype),
        eps=eps.to(dtype),
        root_offset=(eps_root * bias_correction2).to(dtype),
        one_minus_beta1=(1 - beta1).to(dtype),
        beta2=beta2.to(dtype),
        one_minus_beta2=(1 - beta2).to(dtype),
        # Detached: a scaler's values are never differentiated, and a graph that kept them would
        # save each grad for the multiplication (a param-sized tensor per unrolled step).
        grad_multiplier=(1 / grad_scale).detach().to(dtype),
        skip=found_inf.detach().to(dtype),
    )


def adamw_elementwise(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    coefficients: Coefficients,
    *,
    amsgrad: bool,
    maximize: bool,
    scaled: bool = False,
    skippable: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One AdamW step on real tensors; returns new ``(param, exp_avg, exp_avg_sq, max_exp_avg_sq)``.

    The math runs in the coefficients' dtype (float32 for float16/bfloat16 inputs); results are
    returned in that dtype and rounded by whoever writes them back. ``amsgrad``, ``maximize``,
    ``scaled`` (multiply the grads by ``grad_multiplier``: a GradScaler's unscale, a clip) and
    ``skippable`` (keep the old values where ``skip``: a GradScaler's overflow, Note [AMP inside
    the step]) are Python constants: each combination specializes the compiled graph.
    """
    c = coefficients
    dtype = c.step_size.dtype
    old = [None if x is None else x.to(dtype) for x in (param, exp_avg, exp_avg_sq, max_exp_avg_sq)]
    grad = grad.to(dtype)
    if scaled:
        grad = grad * c.grad_multiplier
    if maximize:
        grad = -grad
    param = old[0] * c.decay
    exp_avg = torch.lerp(old[1], grad, c.one_minus_beta1)
    exp_avg_sq = old[2] * c.beta2 + c.one_minus_beta2 * grad * grad
    if amsgrad:
        assert max_exp_avg_sq is not None, "amsgrad needs max_exp_avg_sq"
        max_exp_avg_sq = torch.maximum(old[3], exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment + c.root_offset).sqrt() / c.bias_correction2_sqrt + c.eps
    param = param - c.step_size * (exp_avg / denom)
    if not skippable:
        return param, exp_avg, exp_avg_sq, max_exp_avg_sq
    skip = c.skip > 0  # Note [AMP inside the step]
    return tuple(None if new is None else torch.where(skip, before, new)
                 for before, new in zip(old, (param, exp_avg, exp_avg_sq, max_exp_avg_sq)))
