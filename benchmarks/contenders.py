"""Every AdamW a user might pick instead of ours, built the same way: ``build(params, workload)``.

A contender that cannot be built (not installed, or lacking an option the workload needs) raises
:class:`Unavailable` with the reason, which the report prints in its row.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch

from .quiet import quiet_stderr
from .workloads import Workload

__all__ = ["CONTENDERS", "Built", "Contender", "Unavailable", "by_name"]

LR = 1e-3
WEIGHT_DECAY = 1e-2


class Unavailable(Exception):
    """This contender cannot run this workload here; the message says why."""


@dataclasses.dataclass
class Built:
    optimizer: Any
    step: Callable[[], Any]
    supports_schedulers: bool = True


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[list[torch.Tensor], Workload], Built]
    compiled: bool  # has a compile step worth timing (cold and warm)
    note: str = ""


def _import(module: str) -> Any:
    try:
        with quiet_stderr():  # torchao reports each optional native library it lacks (CUDA kernels)
            return importlib.import_module(module)
    except Exception as error:  # an optional package: report, never crash the run
        raise Unavailable(f"{module} is not installed ({type(error).__name__}: {error})") from None


def _ours(compile: bool) -> Callable[[list[torch.Tensor], Workload], Built]:
    def build(params: list[torch.Tensor], workload: Workload) -> Built:
        compiled_adamw = _import("compiled_adamw")
        optimizer = compiled_adamw.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY,
                                         amsgrad=workload.amsgrad, compile=compile)
        return Built(optimizer, optimizer.step)
    return build


def _torch(**options: Any) -> Callable[[list[torch.Tensor], Workload], Built]:
    def build(params: list[torch.Tensor], workload: Workload) -> Built:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=workload.amsgrad,
                                      **options)
        return Built(optimizer, optimizer.step)
    return build


def _torch_compiled(params: list[torch.Tensor], workload: Workload) -> Built:
    """PyTorch's compiled-optimizer recipe: a tensor lr (no recompile when it changes), the step
    under torch.compile, capturable on CUDA."""
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(LR), weight_decay=WEIGHT_DECAY,
                                  amsgrad=workload.amsgrad, capturable=params[0].is_cuda)

    @torch.compile(fullgraph=False)
    def step() -> None:
        optimizer.step()

    return Built(optimizer, step)


def _heavyball(params: list[torch.Tensor], workload: Workload) -> Built:
    heavyball = _import("heavyball")
    if workload.amsgrad:
        raise Unavailable("heavyball.AdamW has no AMSGrad")
    optimizer = heavyball.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    grads = [p.grad for p in params]

    def step() -> None:
        # heavyball sets p.grad to None after stepping: without this, every step after the first
        # would find no grads and do nothing.
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    return Built(optimizer, step)


def _torchao(params: list[torch.Tensor], workload: Workload) -> Built:
    optim = _import("torchao.optim")
    optimizer = optim._AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=workload.amsgrad)
    return Built(optimizer, optimizer.step)


def _torchopt(params: list[torch.Tensor], workload: Workload) -> Built:
    torchopt = _import("torchopt")
    if workload.amsgrad:
        raise Unavailable("torchopt.AdamW has no AMSGrad")
    optimizer = torchopt.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return Built(optimizer, optimizer.step, supports_schedulers=False)


def _graph_replayed(build: Callable[[list[torch.Tensor], Workload], Built]) -> Callable[..., Built]:
    """``build``'s step captured alone in a CUDA graph (PyTorch's recipe: warm-up on a side
    stream, then capture); the timed step is one replay."""
    def graphed(params: list[torch.Tensor], workload: Workload) -> Built:
        if not params[0].is_cuda:
            raise Unavailable("graph replay needs CUDA")
        built = build(params, workload)
        compiled_adamw = _import("compiled_adamw")
        if isinstance(built.optimizer, compiled_adamw.AdamW):
            compiled_adamw.check_capturable(built.optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                built.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            built.step()
        return Built(built.optimizer, graph.replay, supports_schedulers=False)
    return graphed


def _torch_capturable(params: list[torch.Tensor], workload: Workload) -> Built:
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(LR, device=params[0].device),
                                  weight_decay=WEIGHT_DECAY, amsgrad=workload.amsgrad, capturable=True,
                                  foreach=True)
    return Built(optimizer, optimizer.step)


CONTENDERS = [
    Contender("ours", _ours(compile=True), compiled=True, note="compiled_adamw.AdamW"),
    Contender("ours-eager", _ours(compile=False), compiled=False, note="compile=False"),
    Contender("torch-forloop", _torch(foreach=False), compiled=False),
    Contender("torch-foreach", _torch(foreach=True), compiled=False),
    Contender("torch-fused", _torch(fused=True), compiled=False, note="the baseline of every ratio"),
    Contender("torch-compiled", _torch_compiled, compiled=True,
              note="torch.compile(opt.step), tensor lr (PyTorch's compiled-optimizer recipe)"),
    Contender("heavyball", _heavyball, compiled=True, note="heavyball.AdamW"),
    Contender("torchao", _torchao, compiled=True, note="torchao.optim._AdamW (full precision)"),
    Contender("torchopt", _torchopt, compiled=False, note="torchopt.AdamW"),
    Contender("ours-graph-replay", _graph_replayed(_ours(compile=True)), compiled=False,
              note="CUDA only: our step captured in a CUDA graph, one replay"),
    Contender("torch-capturable-graph-replay", _graph_replayed(_torch_capturable), compiled=False,
              note="CUDA only: torch.optim.AdamW(capturable=True, foreach=True) captured, one replay"),
]
BASELINE = "torch-fused"


def by_name(names: list[str] | None) -> list[Contender]:
    if not names:
        return list(CONTENDERS)
    known = {c.name: c for c in CONTENDERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]
