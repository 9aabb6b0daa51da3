"""Hyperparameters as 0-dim tensors on the params' device, and the param groups that hold them.

Note [hyperparameters are tensors]: the compiled step reads lr, beta1, beta2, eps, weight_decay
and eps_root (Note [eps_root]) from tensors on the params' device, so changing one never
recompiles, never syncs, and a captured CUDA graph sees the new value.

Note [a group holds what the user gave]: a param group is a :class:`ParamGroup`, a ``dict`` that
holds exactly what was given or assigned -- a Python float stays a float, as in torch, so
``state_dict()``, ``get_last_lr()``, loggers and DCP read what the user (or a scheduler) wrote.
The step never reads the dict's floats: every write of a float (``group["lr"] = 0.1``, OneCycleLR
assigning beta1, a checkpoint being loaded) is validated and written at once into the group's own
float64 vector ``[lr, beta1, beta2, eps, weight_decay, eps_root, 1, 0]`` on the params' device
(the last two are the ``grad_scale`` and ``found_inf`` of a step without a GradScaler, Note [AMP
inside the step]), which
the step passes to its compiled kernel as one argument. Because the step reads no Python
float, a user's ``torch.compile`` around it has no float to guard on, and a CUDA graph replay
needs no Python. A tensor given for a hyperparameter is the user's: the step reads it and never
writes into it (a scheduler may ``fill_`` it, as torch's do), so a tensor shared by several groups
stays shared and each group's float assignment stays that group's own.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["GROUP_KEYS", "NO_SCALER", "OPTIONAL_DEFAULTS", "SCALAR_NAMES", "STRUCTURAL_KEYS", "GroupSettings", "ParamGroup",
           "check_value", "group_value"]

SCALAR_NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_root")
# grad_scale and found_inf without a GradScaler: the step unscales by 1 and skips nothing.
NO_SCALER = (1.0, 0.0)
# The group keys that hold them ("betas" holds two).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "eps_root")
# Options that specialize the compiled step (Python constants).
STRUCTURAL_KEYS = ("amsgrad", "maximize")
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


def _names_of(key: str) -> tuple[str, ...]:
    return ("beta1", "beta2") if key == "betas" else (key,)


def _split(key: str, value: Any, where: str = "") -> dict[str, Any]:
    """``{name: value}`` for the scalars that group key ``key`` holds."""
    if key != "betas":
        return {key: value}
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{where}{': ' if where else ''}betas must be a pair (beta1, beta2), got {value!r}")
    return dict(zip(_names_of(key), value))


def group_value(group: dict[str, Any], name: str) -> Any:
    key = "betas" if name in ("beta1", "beta2") else name
    value = group.get(key, OPTIONAL_DEFAULTS.get(key)) if key in OPTIONAL_DEFAULTS else group[key]
    return _split(key, value)[name]


def check_value(name: str, value: Any, where: str = "") -> float:
    """The value of hyperparameter ``name`` as a float; ValueError naming it if invalid.

    Reads a tensor's value (a host sync): call it when groups are added or loaded, not per step.
    """
    prefix = f"{where}: " if where else ""
    _check_kind(name, value, prefix)
    number = value.item() if isinstance(value, Tensor) else float(value)
    low, high, rule = _RANGES[name]
    in_range = low <= number < high if high == 1.0 else low <= number
    if not in_range:
        raise ValueError(f"{prefix}invalid {name}: {number} (expected {rule})")
    return number


def _check_kind(name: str, value: Any, prefix: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{prefix}{name} must be a float or a 1-element tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{prefix}{name} must be a floating-point tensor, got {value.dtype}")
    elif not isinstance(value, Real) or isinstance(value, bool):
        raise ValueError(f"{prefix}{name} must be a float or a 1-element tensor, got {value!r}")


class GroupSettings:
    """One group as the step reads it (Note [a group holds what the user gave]): the structural
    options, our float64 vector for the float hyperparameters, and the user's tensors, read as
    they are. The step never reads the group dict itself: inside a user's ``torch.compile``,
    Dynamo rewrites optimizers' param groups when they are read (it marks them capturable)."""

    def __init__(self, group: dict[str, Any], device: torch.device, where: str):
        self.device, self.where = device, where
        self.params = tuple(group["params"])  # what the buckets were built from
        self.amsgrad, self.maximize = bool(group["amsgrad"]), bool(group["maximize"])
        values = {name: group_value(group, name) for name in SCALAR_NAMES}
        numbers = [check_value(name, value, where) for name, value in values.items()]
        for name, value in values.items():
            self._check_device(name, value)
        self.vector = torch.tensor([*numbers, *NO_SCALER], dtype=torch.float64, device=device)
        self.tensors = {name: value for name, value in values.items() if isinstance(value, Tensor)}

    def _check_device(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor) and value.device != self.device:
            raise ValueError(f"{self.where}: {name} is a tensor on {value.device}, but the group's "
                             f"params are on {self.device}")

    def assign(self, key: str, value: Any) -> Any:
        """Validate a new value for group key ``key`` and make the step use it; returns what the
        group should hold. Raises (naming the group and key) before anything changes.

        Floats are range-checked; a tensor's value is not read (that would be a host sync), only
        its shape, dtype and device."""
        values = _split(key, value, self.where)
        for name, item in values.items():
            if isinstance(item, Tensor):
                _check_kind(name, item, f"{self.where}: ")
                self._check_device(name, item)
            else:
                check_value(name, item, self.where)
        for name, item in values.items():
            if isinstance(item, Tensor):
                self.tensors[name] = item
            else:
                self.tensors.pop(name, None)
                self.vector[SCALAR_NAMES.index(name)].fill_(float(item))
        return tuple(value) if key == "betas" else value

    def move_to(self, device: torch.device) -> None:
        """Follow the group's params to another device (``model.to(device)``)."""
        self.device, self.vector = device, self.vector.to(device)

    def packed(self, device: torch.device, scaler: Tensor | None = None) -> Tensor:
        """``[lr, beta1, beta2, eps, weight_decay, eps_root, grad_scale, found_inf]`` as one 1-D
        tensor on ``device``, ``scaler`` being a GradScaler's ``[grad_scale, found_inf]`` for this
        step: our vector itself unless the group holds tensors of the user's or a scaler is given
        (then a differentiable concatenation), copied only for a group whose params span devices."""
        if not self.tensors and scaler is None:
            packed = self.vector
        else:
            hyperparameters = torch.stack([
                self.tensors[name].reshape(()).to(torch.float64) if name in self.tensors else self.vector[index]
                for index, name in enumerate(SCALAR_NAMES)])
            tail = self.vector[len(SCALAR_NAMES):] if scaler is None else scaler.to(self.vector)
            packed = torch.cat([hyperparameters, tail])
        return packed if device == self.device else packed.to(device, non_blocking=True)


class ParamGroup(dict):
    """A param group (a ``dict``, as torch's) whose hyperparameter writes go through
    :meth:`GroupSettings.assign` (Note [a group holds what the user gave])."""

    def __init__(self, group: dict[str, Any], settings: GroupSettings):
        super().__init__()
        self.settings = settings
        for key, value in group.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in GROUP_KEYS:
            value = self.settings.assign(key, value)
        elif key in STRUCTURAL_KEYS:
            setattr(self.settings, key, bool(value))
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Iterable) -> ParamGroup:
        self.update(other)
        return self

    def __reduce_ex__(self, protocol: int) -> Any:
        # A copy or a pickle is a plain dict: writes into it must not reach this group's step.
        return dict, (dict(self),)
