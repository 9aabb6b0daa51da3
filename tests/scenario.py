"""The deterministic training scenario that parity tests replay on several optimizers."""

from __future__ import annotations

import torch

from .configs import BASE, CHANNELS_LAST, GROUP_OPTIONS, NEVER_STEPPED, SHAPES, SKIPPED, Config


def _random(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=generator, dtype=torch.float64))
    return x.to(dtype)


def _layout(i: int, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if i == CHANNELS_LAST else x


def make_params(config: Config) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(_layout(i, _random(s, config.dtype, generator)))
            for i, s in enumerate(SHAPES)]


def grads_at(step: int, config: Config) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [_layout(i, _random(s, config.dtype, generator)) for i, s in enumerate(SHAPES)]
    return [None if i == NEVER_STEPPED or step in SKIPPED.get(i, ()) else g
            for i, g in enumerate(grads)]


def group_split(params: list) -> list[list]:
    return [params[:4], params[4:]]


def hyperparameters(group: int) -> dict:
    return {**BASE, **GROUP_OPTIONS[group]}


def as_tensors(values: dict) -> dict:
    tensors = {k: torch.tensor(v) for k, v in values.items() if k != "betas"}
    tensors["betas"] = tuple(torch.tensor(b) for b in values["betas"])
    return tensors


def param_groups(params: list, config: Config, *, tensors: bool = False) -> list[dict]:
    groups = []
    for index, members in enumerate(group_split(params)):
        values = hyperparameters(index)
        groups.append(dict(params=members, **(as_tensors(values) if tensors else values)))
    return groups


def set_grads(params: list, grads: list) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
