"""An independent float64 numpy AdamW, written from torch.optim.AdamW's documented algorithm.

It shares no code with ``compiled_adamw`` and uses the documentation's algebra (explicit ``m_hat``
and ``v_hat``), not the package's rearrangement, so a change that moves eps or folds the bias
corrections differently shows up as a mismatch. One deviation from the documentation, on purpose:
for AMSGrad, torch's implementation keeps the max of the raw ``v`` and bias-corrects it (the
documentation writes the max of ``v_hat``); we follow the implementation.
"""

from __future__ import annotations

import numpy as np


def _real(x: np.ndarray) -> np.ndarray:
    """Complex arrays as (..., 2) real arrays, as torch steps complex params."""
    x = np.asarray(x)
    return np.stack([x.real, x.imag], axis=-1).astype(np.float64) if np.iscomplexobj(x) else x.astype(np.float64)


class OracleAdamW:
    def __init__(self, params: list[np.ndarray], *, amsgrad: bool = False, maximize: bool = False):
        self.params = [_real(p) for p in params]
        self.amsgrad, self.maximize = amsgrad, maximize
        self.t = [0] * len(params)
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.v_max = [np.zeros_like(p) for p in self.params]

    def step(self, grads: list[np.ndarray | None], *, lr: float, betas: tuple[float, float],
             eps: float, weight_decay: float, eps_root: float = 0.0) -> None:
        beta1, beta2 = betas
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = -_real(grad) if self.maximize else _real(grad)
            self.t[i] += 1
            t = self.t[i]
            theta = self.params[i] - lr * weight_decay * self.params[i]
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g**2
            m_hat = self.m[i] / (1 - beta1**t)
            if self.amsgrad:
                self.v_max[i] = np.maximum(self.v_max[i], self.v[i])
                v_hat = self.v_max[i] / (1 - beta2**t)
            else:
                v_hat = self.v[i] / (1 - beta2**t)
            # eps_root is ours (optax's): under the root, added to the bias-corrected v.
            self.params[i] = theta - lr * m_hat / (np.sqrt(v_hat + eps_root) + eps)
