"""Build the record of one configuration: what Dynamo and Inductor make of our step.

For each configuration, a fresh optimizer takes one step with the default (compiled) path in a
reset compiler, then a OneCycleLR run. The record states the number of graphs Dynamo compiled,
graph breaks, the Inductor kernels generated, recompiles over the scheduled run, and each graph
as Inductor receives it (post-grad ATen, with its op counts).
"""

from __future__ import annotations

import collections
import contextlib
import re
from typing import Any, Callable, Iterator

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from compiled_adamw import AdamW, kernels

__all__ = ["CONFIGURATIONS", "record"]

SCHEDULED_STEPS = 20
SHAPES = [(4, 3), (5,), (2, 3, 2, 2)]


# Each configuration's optimizer options; bfloat16 and several-groups differ in params and groups;
# the compiled-* ones in how the step is called: by the user's torch.compile of ``opt.step``
# (Note [a step alone with the params]) or of a function that also clips the grads with torch's
# ``clip_grad_norm_`` (Note [one opaque step in a user's trace]).
_OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "differentiable": {"differentiable": True, "compile": True},
    "bfloat16": {},
    "several-groups": {},
    "compiled-alone": {},
    "compiled-in-a-function": {},
}
CONFIGURATIONS = list(_OPTIONS)


def _params(name: str) -> list[torch.Tensor]:
    dtype = torch.bfloat16 if name == "bfloat16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in SHAPES]
    return [p.clone() for p in params] if name == "differentiable" else params


def _optimizer(name: str, params: list[torch.Tensor]) -> AdamW:
    if name == "several-groups":
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "lr": 5e-3}]
        return AdamW(groups, lr=1e-2)
    return AdamW(params, lr=1e-2, **_OPTIONS[name])


@contextlib.contextmanager
def _recording_post_grad_graphs() -> Iterator[list[torch.fx.Graph]]:
    graphs: list[str] = []

    def keep(graph: torch.fx.Graph) -> None:
        graphs.append(_readable(graph))

    with torch._inductor.config.patch(post_grad_custom_pre_pass=keep, fx_graph_cache=False):
        yield graphs


def _readable(graph: torch.fx.Graph) -> str:
    """The graph's code without comments (they hold absolute source paths) or blank lines, and with
    our op's optimizer handle (a count of the optimizers this process made) written as a name."""
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    code = module.print_readable(print_output=False, include_stride=False, include_device=False)
    lines = [re.sub(r"\bhandle = \d+", "handle = HANDLE", line.rstrip()) for line in code.splitlines()]
    return "\n".join(line for line in lines if line.strip() and not line.strip().startswith("#"))


def _op_counts(code: str) -> str:
    ops = collections.Counter(re.findall(r"torch\.ops\.(\w+\.\w+(?:\.\w+)?)\(", code))
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))


def _kernels(sources: list[str]) -> int:
    return sum(source.count("cpp_pybinding(") + source.count("async_compile.triton(") for source in sources)


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def _first_step(name: str, optimizer: AdamW, params: list[torch.Tensor]) -> Callable[[], None]:
    if name == "compiled-alone":
        return torch.compile(optimizer.step, fullgraph=True)
    if name == "compiled-in-a-function":

        def users_function() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1e3)  # larger than the grads' norms: same numbers
            optimizer.step()

        return torch.compile(users_function, fullgraph=True)
    if name != "differentiable":
        return optimizer.step

    def step_and_backward() -> None:
        optimizer.step()
        torch.stack([p.float().sum() for p in params]).sum().backward()  # compiles the backward too

    return step_and_backward


def record(name: str) -> str:
    """The text of ``graphs/<name>.txt``."""
    kernels.reset()
    params = _params(name)
    optimizer = _optimizer(name, params)
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    _set_grads(params, 0)
    first_step = _first_step(name, optimizer, params)
    later_step = first_step if name.startswith("compiled-") else optimizer.step
    with _recording_post_grad_graphs() as graphs:
        _, sources = run_and_get_code(first_step)
    compiled = counters["stats"]["unique_graphs"] - graphs_before
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-2, total_steps=SCHEDULED_STEPS + 1)
    for step in range(1, SCHEDULED_STEPS + 1):
        _set_grads(params, step)
        # A compiled step is called in the grad mode of its first call: Dynamo guards on it.
        with contextlib.nullcontext() if name == "differentiable" or name.startswith("compiled-") else torch.no_grad():
            later_step()
        scheduler.step()
    recompiles = counters["stats"]["unique_graphs"] - graphs_before - compiled
    breaks = sum(counters["graph_break"].values()) - breaks_before
    groups = len(optimizer.param_groups)
    lines = [
        f"# graphs/{name}.txt: generated by `python -m graphs`; do not edit by hand.",
        f"# torch {torch.__version__.split('+')[0]}, cpu. compiled_adamw.AdamW over {len(SHAPES)} params "
        f"{SHAPES} in {groups} group(s), {params[0].dtype}, options {_OPTIONS[name]}.",
        "",
        "summary:",
        f"  graphs Dynamo compiled for the first step: {compiled}",
        f"  graph breaks: {breaks}",
        f"  Inductor kernels generated: {_kernels(sources)}",
        f"  recompiles over {SCHEDULED_STEPS} OneCycleLR steps (lr and beta1 change every step): {recompiles}",
        "",
    ]
    for index, code in enumerate(graphs, 1):
        lines += [f"graph {index} (post-grad ATen, as Inductor receives it)", f"  ops: {_op_counts(code)}",
                  code, ""]
    return "\n".join(lines)
