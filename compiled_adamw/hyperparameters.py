"""Hyperparameters as 0-dim tensors on the params' device.

Note [hyperparameters are tensors]: the compiled step reads lr, beta1, beta2, eps, weight_decay
and eps_root (Note [eps_root]) from 0-dim tensors, so changing one never recompiles and a captured
graph sees the new value. Each group keeps its tensors in ``group["lr"]``, ``group["betas"]``,
``group["eps"]``, ``group["weight_decay"]`` and ``group["eps_root"]``. Schedulers fill them in
place; a user (or OneCycleLR for beta1) who assigns a Python float instead gets that value written
into the same tensor at the next step, and the group holds the tensor again. A tensor the user puts
there is used as it is. Floats are checked when they are written; tensor values are checked when a
group is added or loaded (a check at step time would be a host sync).

Our own tensors are 0-dim views of one float64 vector per group, ``[lr, beta1, beta2, eps,
weight_decay, eps_root]``, which the step passes to the compiled coefficients as a single argument.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPTIONAL_DEFAULTS", "SCALAR_NAMES", "GroupScalars", "check_value", "group_value",
           "set_group_value"]

SCALAR_NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_root")
# Keys that torch.optim.AdamW's groups lack; a group loaded from its checkpoints gets the default.
OPTIONAL_DEFAULTS = {"eps_root": 0.0}

_RANGES = {
    "lr": (0.0, math.inf, "lr >= 0"),
    "beta1": (0.0, 1.0, "0 <= beta1 < 1"),
    "beta2": (0.0, 1.0, "0 <= beta2 < 1"),
    "eps": (0.0, math.inf, "eps >= 0"),
    "weight_decay": (0.0, math.inf, "weight_decay >= 0"),
    "eps_root": (0.0, math.inf, "eps_root >= 0"),
}


def group_value(group: dict[str, Any], name: str) -> Any:
    if name in ("beta1", "beta2"):
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        return betas[name == "beta2"]
    if name in OPTIONAL_DEFAULTS:
        return group.get(name, OPTIONAL_DEFAULTS[name])
    return group[name]


def set_group_value(group: dict[str, Any], name: str, value: Any) -> None:
    if name in ("beta1", "beta2"):
        betas = list(group["betas"])
        betas[name == "beta2"] = value
        group["betas"] = tuple(betas)
    else:
        group[name] = value


def check_value(name: str, value: Any, where: str = "") -> float:
    """The value of hyperparameter ``name`` as a float; ValueError naming it if invalid.

    Reads a tensor's value (a host sync): call it when groups are added or loaded, not per step.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{prefix}{name} must be a float or a 1-element tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{prefix}{name} must be a floating-point tensor, got {value.dtype}")
        number = value.item()
    elif isinstance(value, Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{prefix}{name} must be a float or a 1-element tensor, got {value!r}")
    low, high, rule = _RANGES[name]
    in_range = low <= number < high if high == 1.0 else low <= number
    if not in_range:
        raise ValueError(f"{prefix}invalid {name}: {number} (expected {rule})")
    return number


class GroupScalars:
    """The 0-dim tensors holding one group's hyperparameters (Note [hyperparameters are tensors])."""

    def __init__(self, group: dict[str, Any], device: torch.device, where: str):
        self.device = device
        values = [group_value(group, name) for name in SCALAR_NAMES]
        numbers = [check_value(name, value, where) for name, value in zip(SCALAR_NAMES, values)]
        self.vector = torch.tensor(numbers, dtype=torch.float64, device=device)
        self.tensors: dict[str, Tensor] = {}
        for index, (name, value) in enumerate(zip(SCALAR_NAMES, values)):
            if isinstance(value, Tensor):
                self.tensors[name] = self._checked_tensor(name, value, where)
            else:
                self.tensors[name] = self.vector[index]
            set_group_value(group, name, self.tensors[name])

    def _checked_tensor(self, name: str, value: Tensor, where: str) -> Tensor:
        if value.device != self.device:
            raise ValueError(f"{where}: {name} is a tensor on {value.device}, but the group's params "
                             f"are on {self.device}")
        return value.reshape(()) if value.dim() else value

    def pending(self, group: dict[str, Any], where: str) -> list[tuple[str, Any]]:
        """The group values that differ from the held tensors, validated; nothing is written."""
        changes = []
        for name in SCALAR_NAMES:
            value = group_value(group, name)
            if value is self.tensors[name]:
                continue
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{where}: {name} must be a float or a 1-element tensor, got a "
                                     f"tensor of shape {tuple(value.shape)}")
                value = self._checked_tensor(name, value, where)
            else:
                check_value(name, value, where)
            changes.append((name, value))
        return changes

    def apply(self, group: dict[str, Any], changes: list[tuple[str, Any]]) -> None:
        """Write ``pending`` changes: floats into the held tensors, new tensors adopted as they are."""
        for name, value in changes:
            if isinstance(value, Tensor):
                self.tensors[name] = value
            else:
                self.tensors[name].fill_(value)
            set_group_value(group, name, self.tensors[name])

    def load(self, group: dict[str, Any], where: str) -> None:
        """Take a loaded group's values (floats or tensors) into the held tensors, in place."""
        for name in SCALAR_NAMES:
            value = group_value(group, name)
            check_value(name, value, where)
            self.tensors[name].copy_(torch.as_tensor(value, dtype=self.tensors[name].dtype))
            set_group_value(group, name, self.tensors[name])

    def floats(self) -> dict[str, float]:
        return {name: t.item() for name, t in self.tensors.items()}

    def packed(self, device: torch.device) -> Tensor:
        """``[lr, beta1, beta2, eps, weight_decay, eps_root]`` as one 1-D tensor on ``device``: our
        vector itself unless the user put tensors of their own in the group (then a differentiable
        stack), copied only for a group whose params span devices."""
        if all(t._base is self.vector for t in self.tensors.values()):
            packed = self.vector
        else:
            packed = torch.stack([t.reshape(()).to(torch.float64) for t in self.tensors.values()])
        return packed if packed.device == device else packed.to(device, non_blocking=True)
