"""Small shared tools for the behaviour tests."""

from __future__ import annotations

import contextlib
import copy
import io

import torch

from compiled_adamw import AdamW


def model_and_twin(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model, copy.deepcopy(model)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, scheduler=None) -> None:
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step(loss.item()) if isinstance(
                scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """Everything a failed call must leave untouched: params, grads, state and group values."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state": {i: {k: v.clone() for k, v in optimizer.state[p].items()}
                  for i, p in enumerate(params) if p in optimizer.state},
        "groups": [{k: (v if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
                   for g in optimizer.param_groups],
    }


def assert_same(before: dict, after: dict) -> None:
    torch.testing.assert_close(after["params"], before["params"], rtol=0, atol=0)
    torch.testing.assert_close(after["grads"], before["grads"], rtol=0, atol=0)
    torch.testing.assert_close(after["state"], before["state"], rtol=0, atol=0)
    for old, new in zip(before["groups"], after["groups"]):
        assert old.keys() == new.keys()
        for key in old:
            if key != "params":
                torch.testing.assert_close(new[key], old[key], rtol=0, atol=0, equal_nan=True)


def assert_models_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def ours(model: torch.nn.Module, **kwargs) -> AdamW:
    return AdamW(model.parameters(), lr=1e-2, **kwargs)


# The ways a user compiles our step: the step itself, ``torch.compile(opt.step)``; a function
# whose whole body is ``opt.step()`` (the compiled-optimizer recipe's); a function of theirs that
# does more (here it also counts its calls): all three trace no param or grad (Note [a step alone
# with the params]); and a function that also reads the grads (their norms), whose trace takes
# them all (Note [one opaque step in a user's trace]).
USERS_COMPILES = ("step-alone", "function-that-only-steps", "users-function", "function-that-reads-grads")


def compiled_by_user(optimizer: torch.optim.Optimizer, how: str, **options):
    """``optimizer.step`` compiled with ``fullgraph=True`` as ``how`` (one of ``USERS_COMPILES``) says."""
    if how == "step-alone":
        return torch.compile(optimizer.step, fullgraph=True, **options)
    calls = torch.zeros(())
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def function_that_only_steps():
        optimizer.step()

    def users_function():
        optimizer.step()
        calls.add_(1)

    def function_that_reads_grads():
        grad_norm = torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])).norm()
        optimizer.step()
        return grad_norm

    functions = {"function-that-only-steps": function_that_only_steps, "users-function": users_function,
                 "function-that-reads-grads": function_that_reads_grads}
    return torch.compile(functions[how], fullgraph=True, **options)


def inductor_noting_our_ops(ops: list[str]):
    """Inductor as a ``torch.compile`` backend that first appends to ``ops`` each of our ops in the
    graph Dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: torch.fx.GraphModule, example_inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if "compiled_adamw" in str(node.target))
        return compile_fx(graph, example_inputs)

    return backend


def through_disk(obj, **load_kwargs):
    """``obj`` after ``torch.save`` and ``torch.load`` (``weights_only=True`` unless overridden)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **{"weights_only": True, **load_kwargs})


@contextlib.contextmanager
def counting_host_reads():
    """Counts the Tensor methods that read a value back to the host."""
    reads = []
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in names:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
