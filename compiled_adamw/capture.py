"""CUDA graph capture of whole training iterations, and the guard that says what would break it.

PyTorch's own optimizers fail silently under capture: a step counter on the host, or a float lr,
and the graph bakes in a stale value. Ours keeps every step counter and hyperparameter in device
tensors, so its step is capturable by construction; :func:`check_capturable` names anything that
would still break a capture, and :class:`CapturedIteration` calls it before capturing::

    iteration = CapturedIteration(optimizer, train_step)   # warm-up, check, capture
    for batch in data:
        static_input.copy_(batch)
        loss = iteration()                                  # replay: forward, backward, step
        scheduler.step()                                    # takes effect on the next replay

Note [floats between replays]: a replay runs no Python, yet a float assigned to a group between
replays (``group["lr"] = 0.1``; OneCycleLR does it for beta1) takes effect: the assignment itself
writes it into the group's vector on the device (Note [a group holds what the user gave]), which
is what the captured kernels read.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .hyperparameters import SCALAR_NAMES, group_value
from .optimizer import AdamW, _param_name

__all__ = ["CaptureError", "CapturedIteration", "check_capturable"]


class CaptureError(RuntimeError):
    """The optimizer is not safe to capture; the message lists every reason."""


def _key(name: str) -> str:
    return {"beta1": "['betas'][0]", "beta2": "['betas'][1]"}.get(name, f"[{name!r}]")


def check_capturable(optimizer: AdamW, *, device_type: str = "cuda") -> None:
    """Raise :class:`CaptureError` naming each thing that would break a graph capture of
    ``optimizer.step()`` on ``device_type``; return quietly if there is none."""
    problems = []
    if not isinstance(optimizer, AdamW):
        raise CaptureError(f"check_capturable takes a compiled_adamw.AdamW, got {type(optimizer).__name__}")
    if optimizer.differentiable:
        problems.append("differentiable=True: its step allocates new state tensors on every call; "
                        "capture the non-differentiable optimizer")
    for index, group in enumerate(optimizer.param_groups):
        where = f"param_groups[{index}]"
        for name in SCALAR_NAMES:
            value = group_value(group, name)
            if isinstance(value, Tensor) and value.device.type != device_type:
                problems.append(f"{where}{_key(name)} is a tensor on {value.device}, not on {device_type}")
        for position, p in enumerate(group["params"]):
            name = _param_name(index, position)
            if p.device.type != device_type:
                problems.append(f"{name} is on {p.device}, not on {device_type}")
            if p.grad is None:
                problems.append(f"{name} has no grad: the captured step would skip it on every replay. "
                                "Run the backward (or set a zero grad) before capturing")
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor) and not _is_counter_of(optimizer, index, step):
                problems.append(f"state of {name}: 'step' is a tensor on {step.device} that is not the "
                                "optimizer's device counter (replaced by hand? an eager step loads what "
                                "you wrote, Note [state the user writes]: step once before capturing)")
    if problems:
        raise CaptureError("optimizer is not safe to capture:\n  - " + "\n  - ".join(problems))


def _is_counter_of(optimizer: AdamW, group_index: int, step: Tensor) -> bool:
    """Whether ``step`` is a view of one of the group's device step counters."""
    return any(step._base is bucket.shown_steps for bucket in optimizer._buckets[group_index])


class CapturedIteration:
    """A whole training iteration (forward, backward, ``optimizer.step()``) in one CUDA graph,
    following PyTorch's recipe: warm-up iterations on a side stream, then capture.

    ``iteration`` reads its inputs from static tensors that you refill before each call. The
    warm-up iterations are real ones (they step the optimizer), as in PyTorch's recipe.
    """

    def __init__(self, optimizer: AdamW, iteration: Callable[[], Any], *, warmup: int = 3,
                 pool: Any = None):
        if not torch.cuda.is_available():
            raise CaptureError("CUDA graph capture needs a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                iteration()
        torch.cuda.current_stream().wait_stream(side)
        check_capturable(optimizer)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = iteration()

    def __call__(self) -> Any:
        """Replay; returns the tensors ``iteration`` returned while capturing (refilled)."""
        self.graph.replay()  # floats assigned since: Note [floats between replays]
        return self.output
