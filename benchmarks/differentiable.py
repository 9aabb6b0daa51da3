"""The differentiable step: time and memory per unrolled inner step of a K-step inner loop on a
small MLP, with the meta-gradient (to the initial weights) backpropagated through all K steps."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from .contenders import Unavailable, _import

__all__ = ["UNROLLS", "run"]

LR = 1e-2


def _mlp_loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    w1, b1, w2, b2, w3, b3 = params
    hidden = torch.tanh(torch.tanh(x @ w1 + b1) @ w2 + b2)
    return ((hidden @ w3 + b3 - y) ** 2).mean()


def _problem(scale: float, seed: int = 0) -> tuple[list[Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    width = max(8, int(256 * scale**0.5))
    generator = torch.Generator().manual_seed(seed)
    shapes = [(32, width), (width,), (width, width), (width,), (width, 1), (1,)]
    params = [torch.randn(s, generator=generator) / max(s[0], 1) ** 0.5 for s in shapes]
    data = [torch.randn(64, 32, generator=generator), torch.randn(64, 1, generator=generator),
            torch.randn(64, 32, generator=generator), torch.randn(64, 1, generator=generator)]
    return params, (data[0], data[1]), (data[2], data[3])


Unrolled = tuple[Tensor, list[Tensor]]  # the validation loss, and the tensors to differentiate it by


def _optimizer_class(make: Callable[..., Any]) -> Callable[..., Unrolled]:
    """Inner steps by an optimizer class in torch's differentiable mode: non-leaf params, grads
    with create_graph=True set as .grad, then step(). The step updates params in place, so the
    forward uses clones of them: otherwise the grad's own graph (which saved the params) would be
    invalidated by the update. Users of torch's differentiable mode need the same workaround."""
    def unroll(initial: list[Tensor], train, valid, steps: int) -> Unrolled:
        params = [p.clone() for p in initial]
        optimizer = make(params)
        for _ in range(steps):
            loss = _mlp_loss([p.clone() for p in params], *train)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        return _mlp_loss(params, *valid), initial
    return unroll


def _ours(compile: bool) -> Callable[..., Unrolled]:
    def make(params: list[Tensor]) -> Any:
        return _import("compiled_adamw").AdamW(params, lr=LR, differentiable=True, compile=compile)
    return _optimizer_class(make)


def _ours_functional(initial: list[Tensor], train, valid, steps: int) -> Unrolled:
    functional = _import("compiled_adamw.functional")
    params, state = list(initial), functional.init(list(initial))
    for _ in range(steps):
        grads = torch.func.grad(lambda p: _mlp_loss(p, *train))(params)
        params, state = functional.update(params, grads, state, lr=LR)
    return _mlp_loss(params, *valid), initial


def _torch(initial: list[Tensor], train, valid, steps: int) -> Unrolled:
    return _optimizer_class(lambda params: torch.optim.AdamW(params, lr=LR, differentiable=True))(
        initial, train, valid, steps)


class _Module(torch.nn.Module):
    def __init__(self, initial: list[Tensor]):
        super().__init__()
        self.weights = torch.nn.ParameterList(initial)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return _mlp_loss(list(self.weights), x, y)


def _torchopt(initial: list[Tensor], train, valid, steps: int) -> Unrolled:
    torchopt = _import("torchopt")
    module = _Module([p.detach().clone() for p in initial])  # torchopt steps the module itself
    starting_params = list(module.parameters())
    optimizer = torchopt.MetaAdamW(module, lr=LR)
    for _ in range(steps):
        optimizer.step(module(*train))
    return module(*valid), starting_params


def _higher(initial: list[Tensor], train, valid, steps: int) -> Unrolled:
    higher = _import("higher")
    module = _Module([p.detach().clone() for p in initial])
    inner = torch.optim.AdamW(module.parameters(), lr=LR)
    with higher.innerloop_ctx(module, inner, copy_initial_weights=False) as (model, optimizer):
        for _ in range(steps):
            optimizer.step(model(*train))
        return model(*valid), list(module.parameters())


UNROLLS: dict[str, Callable[..., Unrolled]] = {
    "ours-compiled": _ours(compile=True),
    "ours-eager": _ours(compile=False),
    "ours-functional": _ours_functional,
    "torch-differentiable": _torch,
    "torchopt-MetaAdamW": _torchopt,
    "higher": _higher,
}
BASELINE = "torch-differentiable"


def graph_saved_bytes(output: Tensor) -> int:
    """Bytes of the distinct tensors that the autograd graph behind ``output`` keeps for backward:
    the memory an unroll holds until the meta-gradient is taken."""
    seen, stack, storages = set(), [output.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        saved = [getattr(node, name, None) for name in dir(node) if name.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()) or ()) if hasattr(node, "saved_tensors") else []
        for tensor in saved:
            if isinstance(tensor, Tensor) and tensor.device.type != "meta":
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
                storages[key] = tensor.numel() * tensor.element_size()
    return sum(storages.values())


def _measure(unroll: Callable[..., Unrolled], steps: int, scale: float, repetitions: int) -> dict[str, Any]:
    initial, train, valid = _problem(scale)
    leaves = [p.clone().requires_grad_() for p in initial]
    loss, wrt = unroll(leaves, train, valid, steps)  # warm-up (compiles)
    torch.autograd.grad(loss, wrt, allow_unused=True)
    loss, wrt = unroll(leaves, train, valid, steps)
    saved_bytes = graph_saved_bytes(loss)
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        loss, wrt = unroll(leaves, train, valid, steps)
        meta_grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        seconds.append(time.perf_counter() - start)
    present = [g.norm() for g in meta_grads if g is not None]
    return {"ms_per_inner_step": 1e3 * statistics.median(seconds) / steps,
            "saved_bytes_per_inner_step": saved_bytes / steps,
            "param_bytes": sum(p.numel() * p.element_size() for p in initial),
            "validation_loss": loss.item(),
            "meta_grad_norm": float(torch.stack(present).norm()) if present else None}


def _family(name: str) -> str:
    return name.split("-")[0]


def run(steps: int, *, scale: float = 1.0, repetitions: int = 5, contenders: list[str] | None = None) -> dict[str, Any]:
    """Every unroll, or those of the same family (ours, torch, torchopt, higher) as ``contenders``;
    the baseline always."""
    families = None if contenders is None else {_family(name) for name in contenders} | {_family(BASELINE)}
    rows = []
    for name, unroll in UNROLLS.items():
        if families is not None and _family(name) not in families:
            continue
        try:
            row = {"name": name, "status": "ok", **_measure(unroll, steps, scale, repetitions)}
        except Unavailable as reason:
            row = {"name": name, "status": f"unavailable: {reason}"}
        except Exception as error:  # a contender's failure is a row, not a crash
            row = {"name": name, "status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        rows.append(row)
    baseline = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    for row in rows:
        if baseline and row["status"] == "ok":
            row["time_vs_torch"] = row["ms_per_inner_step"] / baseline["ms_per_inner_step"]
            row["memory_vs_torch"] = row["saved_bytes_per_inner_step"] / baseline["saved_bytes_per_inner_step"]
    return {"inner_steps": steps, "baseline": BASELINE, "contenders": rows}
