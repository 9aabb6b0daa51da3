"""Compiler behaviour: one graph per kernel, no graph break, no recompile, kernel counts, no sync."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
import weakref
from typing import Any, Callable

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from compiled_adamw import AdamW, kernels, metadata_check, opaque_step

from .helpers import (USERS_COMPILES, assert_models_close, batch, compiled_by_user, inductor_noting_our_ops,
                      model_and_twin, ours, train)


def _cache_entries(compiled) -> int:
    return len(_debug_get_cache_entry_list(compiled.compiled._torchdynamo_orig_callable.__code__))


def test_scheduled_run_compiles_each_kernel_once_without_graph_breaks():
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40, cycle_momentum=True)
                  for o in (optimizer, reference)]
    train(model, optimizer, range(1), schedulers[0])
    train(twin, reference, range(1), schedulers[1])
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = dict(counters["graph_break"])  # other tests' compiles count here too
    for start in range(1, 40, 3):
        for o in (optimizer, reference):  # floats assigned to the group, as a user would
            o.param_groups[0]["weight_decay"] = 0.01 * start
            o.param_groups[0]["eps"] = 1e-8 * start
        train(model, optimizer, range(start, start + 3), schedulers[0])
        train(twin, reference, range(start, start + 3), schedulers[1])
    assert counters["stats"]["unique_graphs"] == graphs_before, "a hyperparameter change recompiled"
    assert dict(counters["graph_break"]) == breaks_before, dict(counters["graph_break"])
    assert _cache_entries(kernels._compiled_update("cpu", torch.float32, False, False, False, False)) == 1
    assert_models_close(model, twin)


def test_partial_grads_and_new_step_counts_do_not_recompile():
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    graphs_before = counters["stats"]["unique_graphs"]
    for step in range(2, 8):  # the first layer's bias has no grad on odd steps: runs split
        for m, o in ((model, optimizer), (twin, reference)):
            x, y = batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            if step % 2:
                m[0].bias.grad = None
            o.step()
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert optimizer.state[model[0].bias]["step"].item() == reference.state[twin[0].bias]["step"].item() == 5
    assert_models_close(model, twin)


def test_a_large_param_stepped_where_it_lives_compiles_nothing_more():
    """A large param re-pointed away from home is read and written in place by the kernel that
    steps params at home (Note [where memory lives]): what it passes must look the same to that
    kernel's guards (a view of the param would require grad, and compile a second graph)."""
    def make() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(70_000, generator=generator)),
                torch.nn.Parameter(torch.randn(8, generator=generator))]

    params, references = make(), make()
    optimizer, reference = AdamW(params, lr=0.1), torch.optim.AdamW(references, lr=0.1)

    def step(number: int) -> None:
        for p, q in zip(params, references):
            p.grad = torch.full_like(p, float(number)).sin_()
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()

    step(1)
    graphs_before = counters["stats"]["unique_graphs"]
    params[0].data, references[0].data = params[0].data.clone(), references[0].data.clone()
    for number in range(2, 5):
        step(number)
    assert counters["stats"]["unique_graphs"] == graphs_before
    torch.testing.assert_close(params, references)


def test_after_its_first_call_a_kernel_runs_past_dynamos_frame_hook():
    """Note [calls past Dynamo's frame hook]: later steps run the code Dynamo compiled, after its
    guards pass, without calling the ``torch.compile``'d function -- unless the user set another
    stance; the numbers stay torch's."""
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(model, optimizer, range(1))
    train(twin, reference, range(1))
    kernel = kernels._compiled_update("cpu", torch.float32, False, False, False, False)
    through_torch_compile = []
    original = kernel.compiled
    kernel.compiled = lambda *args, **kwargs: through_torch_compile.append(args) or original(*args, **kwargs)
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    try:
        train(model, optimizer, range(1, 4))
        for step in range(4, 6):  # the op's body, run by a user's compiled graph, goes past it too
            x, y = batch(step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            compiled_step()
        assert through_torch_compile == []
        with torch.compiler.set_stance("force_eager"):  # a stance is the user's word: it is kept
            train(model, optimizer, range(6, 7))
        assert len(through_torch_compile) == 1
    finally:
        kernel.compiled = original
    train(twin, reference, range(1, 7))
    assert_models_close(model, twin)


def test_a_call_whose_guards_fail_compiles_through_torch_compile_and_is_right():
    """A call that Dynamo's guards reject (float64 windows for a float32 kernel's graph) is not
    given the wrong graph: it goes through ``torch.compile``, which compiles a graph for it, and
    the next such call runs past the hook with that graph."""
    kernel = kernels._compiled_update.__wrapped__("cpu", torch.float32, False, False, False, False)
    hyperparameters = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)

    def windows(dtype):
        torch.manual_seed(0)
        return [torch.randn(40, dtype=dtype), torch.randn(40, dtype=dtype), torch.zeros(40, dtype=dtype),
                torch.zeros(40, dtype=dtype), None, torch.tensor(1.0)]

    def stepped(dtype, update):
        tensors = windows(dtype)
        update(*tensors, hyperparameters)
        return tensors

    eager = functools.partial(kernels.apply_update_, amsgrad=False, maximize=False, scaled=False)
    graphs_before = counters["stats"]["unique_graphs"]
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float64, torch.float32):
        for ours_, expected in zip(stepped(dtype, kernel), stepped(dtype, eager)):
            torch.testing.assert_close(ours_, expected)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    assert _cache_entries(kernel) == 2


@pytest.mark.parametrize("inputs_as_we_build_them", ["right", "reordered"])
def test_an_in_place_kernel_calls_inductors_graph_once_its_inputs_are_verified(inputs_as_we_build_them, monkeypatch):
    """Note [calls into Inductor's graph]: from the call after the first, a kernel hands Inductor's
    graph its inputs itself, once one call through Dynamo's code showed them to be exactly the
    inputs we build; a graph whose inputs we would build otherwise ("reordered", made up here)
    is never called so, and the numbers are the same either way. The grad here is a view with a
    base, as a large param's grad is: it compiles once (Note [inputs without a view base])."""
    if inputs_as_we_build_them == "reordered":
        build = kernels._InductorGraph.of
        monkeypatch.setattr(kernels._InductorGraph, "of", staticmethod(
            lambda *args: (lambda found: found and found._replace(inputs=found.inputs[::-1]))(build(*args))))
    kernel = kernels._compiled_update.__wrapped__("cpu", torch.float32, False, False, False, False)
    hyperparameters = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)
    ours_, eager = ([torch.randn(40, generator=torch.Generator().manual_seed(0)),
                     torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).view(-1),
                     torch.zeros(40), torch.zeros(40)] for _ in range(2))
    assert ours_[1]._base is not None
    for step in (1.0, 2.0, 3.0, 4.0):
        kernel(*ours_, None, torch.tensor(step), hyperparameters)
        kernels.apply_update_(*eager, None, torch.tensor(step), hyperparameters, amsgrad=False, maximize=False,
                              scaled=False)
    assert _cache_entries(kernel) == 1
    assert [entry.direct for entry in kernel._entries] == [inputs_as_we_build_them == "right"]
    torch.testing.assert_close(ours_, eager)


def test_a_call_that_looks_as_before_skips_dynamos_guard_check():
    """Note [calls that look as before]: once a call of an in-place kernel passed Dynamo's guards
    and ran into Inductor's graph, later calls whose tensors have the same metadata are not
    checked by Dynamo again; tensors that differ -- another length, strides or dtype, a tensor
    where None was -- still are, compile where those guards fail, and step as eager does."""
    kernel = kernels._compiled_update.__wrapped__("cpu", torch.float32, False, False, False, False)
    hyperparameters = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)
    checked = []

    class CountingGuards:
        def __init__(self, guards):
            self.guards = guards

        def check(self, frame_locals):
            checked.append(len(frame_locals["param"]))
            return self.guards.check(frame_locals)

    def windows(length, dtype=torch.float32, stride=1):
        generator = torch.Generator().manual_seed(length)
        return [torch.randn(length * stride, generator=generator, dtype=dtype)[::stride],
                torch.randn(length * stride, generator=generator, dtype=dtype)[::stride],
                torch.zeros(length, dtype=dtype), torch.zeros(length, dtype=dtype)]

    def step_both(ours_, eager, steps, unused_max_exp_avg_sq=None):
        for step in steps:
            kernel(*ours_, unused_max_exp_avg_sq, torch.tensor(float(step)), hyperparameters)
            kernels.apply_update_(*eager, None, torch.tensor(float(step)), hyperparameters, amsgrad=False,
                                  maximize=False, scaled=False)
        torch.testing.assert_close(ours_, eager)

    ours_, eager = windows(40), windows(40)
    step_both(ours_, eager, [1])  # compiles
    for entry in kernel._entries:
        entry.guards = CountingGuards(entry.guards)
    step_both(ours_, eager, range(2, 6))  # the first of these is checked, and verified; then it looks
    step_both(windows(40), windows(40), [1])  # other tensors that look the same
    assert checked == [40]
    step_both(windows(56), windows(56), [1, 2])  # another length passes Dynamo's guards once
    assert checked == [40, 56]
    graphs_before = counters["stats"]["unique_graphs"]
    step_both(windows(40), windows(40), [1], unused_max_exp_avg_sq=torch.zeros(40))  # a tensor where None was
    assert checked == [40, 56, 40]
    step_both(windows(40, stride=2), windows(40, stride=2), [1, 2])
    step_both(windows(40, dtype=torch.float64), windows(40, dtype=torch.float64), [1, 2])
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_a_step_under_a_users_torch_function_mode_compiles_nothing_and_autocast_compiles_once():
    """Note [calls that look as before]: Dynamo guards its cache entries on the torch function mode
    stack, so a kernel call under a user's mode would compile again; a call whose tensors look as
    before runs Inductor's graph, which the mode does not reach, so a step inside a user's
    ``TorchFunctionMode`` compiles nothing. Autocast changes the dispatch keys the tensors are
    checked with: the first step under it goes through Dynamo's guards and compiles once, the
    next looks as before. Every step is torch's."""

    class Watching(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(model, optimizer, range(2))
    train(twin, reference, range(2))

    def step_both_under(context_for_step, step):
        for m, o in ((model, optimizer), (twin, reference)):
            x, y = batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            with context_for_step():
                o.step()

    graphs_before = counters["stats"]["unique_graphs"]
    step_both_under(Watching, 2)
    assert counters["stats"]["unique_graphs"] == graphs_before
    for step in (3, 4):
        step_both_under(lambda: torch.autocast("cpu", dtype=torch.bfloat16), step)
    assert counters["stats"]["unique_graphs"] == graphs_before + 1
    assert_models_close(model, twin)


def test_without_dynamos_tensor_guards_every_kernel_call_is_checked_by_dynamo(monkeypatch):
    """Where ``TensorGuards`` is missing (Note [a step that looks once]), no call looks as before
    (Note [calls that look as before]): each is checked by Dynamo's guards, nothing is kept call
    after call, and the numbers are eager's."""
    monkeypatch.setattr(metadata_check, "TensorGuards", None)
    kernel = kernels._compiled_update.__wrapped__("cpu", torch.float32, False, False, False, False)
    hyperparameters = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)
    ours_, eager = ([torch.randn(40, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
                    + [torch.zeros(40), torch.zeros(40)] for _ in range(2))
    for step in range(1, 6):
        kernel(*ours_, None, torch.tensor(float(step)), hyperparameters)
        kernels.apply_update_(*eager, None, torch.tensor(float(step)), hyperparameters, amsgrad=False, maximize=False,
                              scaled=False)
    assert [entry.direct for entry in kernel._entries] == [True]
    assert kernel._looked == {}
    torch.testing.assert_close(ours_, eager)

def test_without_dynamos_cache_entries_every_call_goes_through_torch_compile(monkeypatch):
    """Dynamo's cache entries are its internals: where they cannot be read, every kernel call
    goes through ``torch.compile``, with the same numbers."""
    monkeypatch.delattr(kernels._eval_frame, "_debug_get_cache_entry_list")
    kernel = kernels._compiled_update.__wrapped__("cpu", torch.float32, False, False, False, False)
    through_torch_compile = []
    original = kernel.compiled
    kernel.compiled = lambda *args, **kwargs: through_torch_compile.append(args) or original(*args, **kwargs)
    hyperparameters = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)
    ours_, eager = ([torch.randn(40, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
                    + [torch.zeros(40), torch.zeros(40)] for _ in range(2))
    for step in (1.0, 2.0, 3.0):
        kernel(*ours_, None, torch.tensor(step), hyperparameters)
        kernels.apply_update_(*eager, None, torch.tensor(step), hyperparameters, amsgrad=False, maximize=False,
                              scaled=False)
    assert len(through_torch_compile) == 3
    torch.testing.assert_close(ours_, eager)


def test_reset_forgets_the_kernels_compiled_code():
    """``kernels.reset()`` is ``torch._dynamo.reset()`` for our kernels too: the next step compiles."""
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(model, optimizer, range(1))
    kernels.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    train(model, optimizer, range(1, 3))
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    train(twin, reference, range(3))
    assert_models_close(model, twin)


def test_each_step_is_one_kernel_with_its_scalars_outside_the_loop():
    """One C++ kernel per call, whatever the param count; the scalars (``beta ** step``...) are
    computed before its elementwise loop, not in it (Note [scalars once per call]); and the loop
    is parallel although the kernel was first compiled for a short window (Note [parallel at any
    length])."""
    params = [torch.zeros(n) for n in (3, 100, 17, 1)]
    update = kernels._compiled_update.__wrapped__("cpu", torch.float32, True, False, False, False)
    hyperparameters = torch.tensor([1e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0, 0.0], dtype=torch.float64)
    flat = torch.cat(params)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, (code,) = run_and_get_code(update, flat, flat + 1, flat.clone(), flat.clone(), flat.clone(),
                                      torch.tensor(1.0), hyperparameters)
    assert code.count("async_compile.cpp_pybinding(") == 1
    kernel = code.split("cpp_pybinding")[1].split("'''")[1]
    scalars, loop = kernel.split("<static_cast<int64_t>(ks0)", 1)  # the loop over the symbolic length
    assert "std::pow" in scalars
    assert "pow" not in loop, "the scalar math was inlined into the elementwise loop"
    if torch.get_num_threads() > 1:  # compiled for 121 elements, the loop still runs on every thread
        assert "#pragma omp parallel" in kernel, "the elementwise loop is serial"


@pytest.mark.parametrize("how", USERS_COMPILES)
def test_step_inside_a_users_fullgraph_compile_with_a_scheduler_attached(how, monkeypatch):
    """PyTorch's compiled-optimizer tutorial, with OneCycleLR (beta1 cycling) attached: torch's
    scheduler wraps ``opt.step`` in a function Dynamo refuses to trace (torch's AdamW fails here);
    ours traces in one graph at the first call, and nothing compiles again -- neither the user's
    graph nor our kernels -- while lr and beta1 change every step (Note [one opaque step in a
    user's trace]: the first step's state creation is not traced). The graph's writes to the
    step counts are not mistaken for the user's (Note [state the user writes]): no step loads
    the state again, which would read the counts on the host."""
    loads = []
    monkeypatch.setattr(AdamW, "_load_written_state", lambda self: loads.append(self))
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40) for o in (optimizer, reference)]
    compiled_step = compiled_by_user(optimizer, how)

    breaks_before = dict(counters["graph_break"])
    for step in range(20):
        for m, o, do_step, scheduler in ((model, optimizer, compiled_step, schedulers[0]),
                                         (twin, reference, reference.step, schedulers[1])):
            x, y = batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            do_step()
            scheduler.step()
        if step == 0:
            graphs_after_first_call = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first_call, "a later call compiled again"
    assert dict(counters["graph_break"]) == breaks_before, dict(counters["graph_break"])
    assert loads == []
    assert_models_close(model, twin)
    torch.testing.assert_close(optimizer.state_dict()["state"], reference.state_dict()["state"])


def _optimizer_with_grads(n_params: int) -> AdamW:
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_params)]
    for p in params:
        p.grad = torch.randn(8)
    return AdamW(params, lr=1e-2)


def _traced_graphs(compile_and_call: Callable[[Callable], Any]) -> list[torch.fx.GraphModule]:
    """The graphs Dynamo hands the backend that ``compile_and_call(backend)`` compiles with."""
    graphs = []

    def keep_graph(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # each optimizer's graph as if first
        compile_and_call(keep_graph)
    return graphs


def _traced_graph(n_params: int, how: str) -> torch.fx.GraphModule:
    optimizer = _optimizer_with_grads(n_params)
    (graph,) = _traced_graphs(lambda backend: compiled_by_user(optimizer, how, backend=backend)())
    return graph


@pytest.mark.parametrize("how", USERS_COMPILES)
def test_a_users_trace_has_the_same_operations_for_10_and_for_200_params(how):
    """Note [a step alone with the params]: where nothing else in the user's graph touches a param
    or a grad, the graph is the same whatever the param count, inputs included; Note [one opaque
    step in a user's trace]: where something does, only our op's inputs (grads and params) grow."""
    graphs = [[(node.op, str(node.target)) for node in _traced_graph(n_params, how).graph.nodes]
              for n_params in (10, 200)]
    alone = how != "function-that-reads-grads"
    operations = [[node for node in graph if node[0] not in ("placeholder", "output")
                   and (alone or "compiled_adamw" in node[1])] for graph in graphs]  # the norms are the user's
    assert operations[0] == operations[1]
    op = "compiled_adamw.step_alone" if alone else "compiled_adamw.step"
    assert sum(target == op for _, target in operations[0]) == 1
    inputs = [sum(kind == "placeholder" for kind, _ in graph) for graph in graphs]
    assert inputs[0] == inputs[1] if alone else min(inputs[0] - 20, inputs[1] - 400) >= 0, inputs


_COMPILER_RUNTIME = ("torch/_dynamo/", "torch/_functorch/", "torch/_inductor/", "torch/_compile.py", "torch/compiler/",
                     "<string>", "/torchinductor")


def _python_calls_in_a_step(n_params: int, how: str) -> int:
    """Python function calls (not C calls) made by one steady step over ``n_params`` params,
    leaving out the compiler's runtime (Dynamo's guards and the wrappers of a compiled graph:
    which cache entry serves the user's frame depends on the optimizers compiled before in this
    process)."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_params)]
    optimizer = AdamW(params, lr=1e-2)
    step = optimizer.step if how == "eager" else compiled_by_user(optimizer, how)
    calls = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(8)
        calls.clear()
        sys.setprofile(lambda frame, event, arg: calls.append(1) if event == "call" and not any(
            part in frame.f_code.co_filename for part in _COMPILER_RUNTIME) else None)
        try:
            step()
        finally:
            sys.setprofile(None)
    return len(calls)


@pytest.mark.parametrize("how", ("eager",) + USERS_COMPILES)
def test_a_steady_step_runs_no_python_per_param(how):
    """Per-param work is C calls (foreach copies, one metadata check, version bumps): Python per
    param is what made 1,000 small params slow (Note [a step that looks once]) and, inside a
    user's compile, torch.library.custom_op's per-tensor wrapper (Note [one opaque step in a
    user's trace])."""
    assert _python_calls_in_a_step(10, how) == _python_calls_in_a_step(200, how)


@pytest.mark.parametrize("fence_params", [opaque_step.FENCE_PARAMS, 1], ids=["one-op", "fenced"])
def test_the_same_compiled_function_sees_the_stepped_params_and_the_grads_it_changed(fence_params, monkeypatch):
    """The op declares the params it writes and takes the grads the graph computed: torch's
    in-place clip_grad_norm_ before the step, and params read both before and after it in one
    graph (Inductor fuses the two reads into one kernel unless the op's writes order them:
    declaring only our flat buffers as written made the average here silently wrong). "fenced":
    every param past the first is declared written by fences (Note [fences for many params])."""
    monkeypatch.setattr(opaque_step, "FENCE_PARAMS", fence_params)
    results = []
    for optimizer_class in (AdamW, torch.optim.AdamW):
        model, _ = model_and_twin()
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        averages = [p.detach().clone() for p in model.parameters()]

        def clipped_step_and_average():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            doubled = [p.detach() * 2 for p in model.parameters()]
            optimizer.step()
            for average, p in zip(averages, model.parameters()):
                average.lerp_(p.detach(), 0.5)
            return doubled

        run = torch.compile(clipped_step_and_average, fullgraph=True) if optimizer_class is AdamW \
            else clipped_step_and_average
        for step in range(3):
            x, y = batch(step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            doubled = run()
        results.append(([p.detach() for p in model.parameters()], averages, doubled))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def _clips_the_grads(optimizer, params, tensors):
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    optimizer.step()


def _averages_the_stepped_params(optimizer, params, tensors):
    optimizer.step()
    for average, p in zip(tensors["averages"], params):
        average.lerp_(p.detach(), 0.5)


def _averages_across_a_graph_break(optimizer, params, tensors):
    optimizer.step()
    for average, p in zip(tensors["averages"], params):
        average.lerp_(p.detach(), 0.5)
    torch._dynamo.graph_break()  # the step's graph is compiled here, not at the return
    for average, p in zip(tensors["averages"], params):
        average.lerp_(p.detach(), 0.5)


def _shrinks_params_first(optimizer, params, tensors):
    params[0].detach().mul_(0.5)  # one the step's op declares written, and one a fence does
    params[-1].detach().mul_(0.5)
    optimizer.step()


def _halves_an_alias_of_a_grad(optimizer, params, tensors):
    tensors["alias"].mul_(0.5)  # the first param's grad, seen through a view made outside
    optimizer.step()


def _assigns_the_grads(optimizer, params, tensors):
    for p in params:
        p.grad = p.grad * 2
    optimizer.step()


def _drops_a_grad_first(optimizer, params, tensors):
    params[0].grad = None
    optimizer.step()


def _counts_its_calls(optimizer, params, tensors):
    optimizer.step()
    tensors["calls"].add_(1)


# Each user's function, and whether its trace may take ``step_alone``.
_USERS_FUNCTIONS = {_clips_the_grads: False, _averages_the_stepped_params: False,
                    _averages_across_a_graph_break: False, _shrinks_params_first: False,
                    _halves_an_alias_of_a_grad: False, _assigns_the_grads: False, _drops_a_grad_first: False,
                    _counts_its_calls: True}


@pytest.mark.parametrize("function", _USERS_FUNCTIONS, ids=lambda function: function.__name__.strip("_"))
def test_a_users_function_that_touches_params_or_grads_is_traced_with_them(function, monkeypatch):
    """Note [a step alone with the params]: a user's compiled function whose graph reads or writes a
    param or a grad besides the step (the param or grad itself, or an alias), or assigns a grad
    before it, is traced again with the op that takes them all, once; the others take
    ``step_alone``. Either way the numbers are those of torch's AdamW running the same function
    eagerly: a param the graph wrote before the step included (Note [a param the graph wrote
    before the step]), whether our op or a fence declares it written."""
    monkeypatch.setattr(opaque_step, "FENCE_PARAMS", 2)
    ops, runs = [], {}
    for optimizer_class in (AdamW, torch.optim.AdamW):
        model, _ = model_and_twin()
        params = list(model.parameters())
        optimizer = optimizer_class(params, lr=1e-2)
        tensors = {"averages": [p.detach().clone() for p in params], "calls": torch.zeros(())}

        def users_step():
            function(optimizer, params, tensors)

        fullgraph = function is not _averages_across_a_graph_break
        step = (torch.compile(users_step, fullgraph=fullgraph, backend=inductor_noting_our_ops(ops))
                if optimizer_class is AdamW else users_step)
        for i in range(3):
            x, y = batch(i)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            tensors["alias"] = params[0].grad.view(-1)
            step()
        runs[optimizer_class] = (params, tensors["averages"], tensors["calls"])
    expected_op = "compiled_adamw.step_alone" if _USERS_FUNCTIONS[function] else "compiled_adamw.step"
    assert set(ops) - {"compiled_adamw.written"} == {expected_op}, ops  # a fence, where it takes the params
    assert ops.count(expected_op) == 1, "compiled more than once"
    torch.testing.assert_close(runs[AdamW], runs[torch.optim.AdamW], rtol=1e-5, atol=1e-6)


def test_without_dynamos_graph_finalizers_a_users_function_takes_the_op_with_every_param(monkeypatch):
    """Note [a step alone with the params]: where an internal it needs is missing (another torch),
    the step is traced with every grad and param, and still gives torch's numbers."""
    monkeypatch.delattr(torch._dynamo.output_graph.OutputGraph, "add_graph_finalizer")
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)

    def train_with_the_step_compiled(backend):
        compiled_step = compiled_by_user(optimizer, "users-function", backend=backend)
        for step in range(3):
            x, y = batch(step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            compiled_step()

    (graph,) = _traced_graphs(train_with_the_step_compiled)
    train(twin, reference, range(3))
    assert "compiled_adamw.step" in [str(node.target) for node in graph.graph.nodes]
    assert_models_close(model, twin)


# Inside a user's compile, hooks use the params they know: Dynamo cannot read our param_groups
# (GroupSettings' docstring).
_PARAMS_OF: dict[torch.optim.Optimizer, list[torch.nn.Parameter]] = {}


def _halve_grads(optimizer, args, kwargs):
    for p in _PARAMS_OF[optimizer]:
        p.grad.mul_(0.5)


@pytest.mark.parametrize("hook", ["pre", "post", "global-pre", "global-post"])
def test_a_hook_registered_after_the_first_compiled_step_is_traced_in_order_with_it(hook):
    """Note [a step alone with the params]: ``torch.compile(opt.step)`` without hooks traces no
    param and no grad; a hook registered later is traced with the step at the next call (it
    compiles again), its reads and writes of grads or params take the op that orders them, and the
    step then sees the grads a pre-hook changed in place and a post-hook sees the stepped params,
    as with torch's AdamW called eagerly."""
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    _PARAMS_OF.update({optimizer: list(model.parameters()), reference: list(twin.parameters())})
    averages = {o: [p.detach().clone() for p in _PARAMS_OF[o]] for o in (optimizer, reference)}

    def average(o, args, kwargs):
        for running, p in zip(averages[o], _PARAMS_OF[o]):
            running.lerp_(p.detach(), 0.5)

    register = {"pre": lambda o: o.register_step_pre_hook(_halve_grads),
                "post": lambda o: o.register_step_post_hook(average),
                "global-pre": lambda o: register_optimizer_step_pre_hook(_halve_grads),
                "global-post": lambda o: register_optimizer_step_post_hook(average)}[hook]
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    handles = []
    try:
        for step in range(3):
            if step == 1:
                handles = [register(optimizer)] if hook.startswith("global") else [register(o) for o in (optimizer, reference)]
            for m, o, do_step in ((model, optimizer, compiled_step), (twin, reference, reference.step)):
                x, y = batch(step)
                o.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
                do_step()
    finally:
        for handle in handles:
            handle.remove()
        _PARAMS_OF.clear()
    assert_models_close(model, twin)
    torch.testing.assert_close(averages[optimizer], averages[reference], rtol=1e-5, atol=1e-6)


class _ClippingAdamW(AdamW):
    def __init__(self, params, **options):
        self.clipped = list(params)
        super().__init__(self.clipped, **options)

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_(self.clipped, 0.05)
        return super().step(closure)


def test_each_optimizers_compiled_step_has_a_cache_of_its_own():
    """Note [a step frame per optimizer]: under Dynamo's default recompile limit (8), nine
    optimizers, one after another, each step through ``torch.compile(opt.step, fullgraph=True)``
    as torch's AdamW steps (the ninth raised when every optimizer compiled torch's one step
    wrapper), and each is freed when its last reference goes."""
    with torch._dynamo.config.patch(recompile_limit=8):
        for _ in range(9):
            model, twin = model_and_twin()
            optimizer = AdamW(model.parameters(), lr=1e-2)
            compiled = types.SimpleNamespace(zero_grad=optimizer.zero_grad,
                                             step=torch.compile(optimizer.step, fullgraph=True))
            train(model, compiled, range(2))
            train(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), range(2))
            assert_models_close(model, twin)
            freed = weakref.ref(optimizer)
            del optimizer, compiled
            assert freed() is None, "the optimizer outlived its last reference"


def test_a_subclass_whose_step_changes_the_grads_is_stepped_with_the_changed_grads_when_compiled():
    """Note [a step alone with the params]: a subclass's step that clips the grads in place before
    ours touches them in the graph, which then takes the op with the grads as its inputs."""
    model, twin = model_and_twin()
    optimizer, reference = _ClippingAdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    for step in range(3):
        for m, o in ((model, optimizer), (twin, reference)):
            x, y = batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        compiled_step()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        reference.step()
    assert_models_close(model, twin)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_step_that_cuda_graphs_may_replay_takes_the_op_with_every_grad(mode):
    """Note [a step alone with the params]: the ops that read the grads where they are would read,
    in a replayed CUDA graph, the grads where they were when it was recorded; so where the backend
    may replay (``mode="reduce-overhead"``) the step takes the op whose inputs are the grads, and
    the ops are tagged ``cudagraph_unsafe`` for a backend that cannot be asked."""
    assert torch.Tag.cudagraph_unsafe in torch.ops.compiled_adamw.step_alone.default.tags
    assert torch.Tag.cudagraph_unsafe in torch.ops.compiled_adamw.grad_norm.default.tags
    optimizer = _optimizer_with_grads(3)
    _, code = run_and_get_code(compiled_by_user(optimizer, "users-function", mode=mode))
    op = "compiled_adamw.step_alone" if mode == "default" else "compiled_adamw.step.default"
    assert op in "".join(code)


@pytest.mark.parametrize("how", USERS_COMPILES)
def test_a_param_left_where_it_lives_is_stepped_there_inside_a_users_compile(how):
    """A param that is not dense stays in its own memory (Note [where memory lives]); a user's
    trace, which cannot read pointers, must step it there too, not in its unused flat segment."""
    model, twin = model_and_twin()
    for m in (model, twin):
        spread = torch.zeros(8, 12)
        spread[:, ::2] = m[0].weight.detach()
        m[0].weight = torch.nn.Parameter(spread[:, ::2])
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    compiled_step = compiled_by_user(optimizer, how)
    for step in range(3):
        for m, o, do_step in ((model, optimizer, compiled_step), (twin, reference, reference.step)):
            x, y = batch(step)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            do_step()
    assert not model[0].weight.is_contiguous()
    assert_models_close(model, twin)


def test_step_reads_no_tensor_value_on_the_host():
    """On the meta device any host read raises: the whole step, schedulers included, runs."""
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(3, 4), (), (0,), (5,)]]
    optimizer = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], amsgrad=True,
                      compile=False)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for step in range(4):
        for i, p in enumerate(params):
            p.grad = None if (i == 3 and step % 2) else torch.empty_like(p)
        optimizer.step()
        scheduler.step()
        optimizer.param_groups[1]["weight_decay"] = 0.5
    assert optimizer.state[params[0]]["step"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    model = torch.nn.Linear(8, 8).cuda()
    optimizer = AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    optimizer.step()  # compiles
    for _ in range(3):
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scheduler.step()  # torch's scheduler, outside the checked region


COLD_START = """
import json, torch
from torch._dynamo.utils import counters
from compiled_adamw import AdamW, kernels
params = [torch.nn.Parameter(torch.randn(64)) for _ in range({n})]
for p in params:
    p.grad = torch.randn(64)
optimizer = AdamW(params)
calls = torch.zeros(())


def users_function():
    optimizer.step()
    calls.add_(1)


step = dict(eager=optimizer.step, step_alone=torch.compile(optimizer.step, fullgraph=True),
            users_function=torch.compile(users_function, fullgraph=True))["{how}"]
for _ in range(3):
    step()
kernel = kernels._compiled_update("cpu", torch.float32, False, False, False, False)
print(json.dumps(dict(graphs=counters["stats"]["unique_graphs"], inductor=dict(counters["inductor"]),
                      direct=[entry.direct for entry in kernel._entries])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["eager", "step_alone", "users_function"])
def test_cold_first_step_compiles_the_same_graphs_at_1000_and_10000_params(tmp_path, how):
    """Compile work does not grow with the param count: in a fresh process with an empty Inductor
    cache, the first step compiles the same graphs and kernels for 1,000 and for 10,000 params,
    called eagerly, compiled by the user as ``torch.compile(opt.step)``, or in a function of theirs
    that does more (Note [a step alone with the params]: the user's graph, then our kernel).
    (Seconds depend on the machine's load: they live in the benchmark.) The kernel is called
    straight into Inductor's graph from the third step, also in a process whose caches are warm
    (Note [calls into Inductor's graph]: AOTAutograd's cache would hide the graph)."""
    compiled = []
    runs = ((1_000, "a"), (10_000, "b")) + (((1_000, "a"),) if how == "eager" else ())  # a warm process once
    for n, cache in runs:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / cache))
        out = subprocess.run([sys.executable, "-c", COLD_START.format(n=n, how=how)], env=env,
                             check=True, capture_output=True, text=True).stdout
        compiled.append(json.loads(out.splitlines()[-1]))
    assert compiled[0] == compiled[1]
    assert compiled[0]["graphs"] == (1 if how == "eager" else 2), "one kernel, and the user's graph"
    assert all(run["direct"] == [True] for run in compiled), compiled


def test_a_compiled_step_after_groups_changed_by_hand_raises_saying_what_to_do():
    """Note [groups changed by hand]: a step inside a user's compile cannot follow the change, so it
    names it instead of stepping groups that are no longer there; an eager step follows it."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    optimizer = AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2)
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    for p in params:
        p.grad = torch.ones_like(p)
    compiled_step()
    optimizer.param_groups.pop()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"param_groups was changed by hand .* call optimizer.step\(\) once outside"):
        compiled_step()
    torch.testing.assert_close([p.detach() for p in params], before, rtol=0, atol=0)
    optimizer.step()
    assert not torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
