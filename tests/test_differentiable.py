"""Autograd through the step: gradcheck, hypergradients over unrolled steps, the functional API
under torch.func and torch.compile, eps_root, and the memory of truncated unrolls."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch._dynamo.testing

from compiled_adamw import AdamW, functional
from compiled_adamw.inner_loop import unroll

from .oracle import OracleAdamW

F64 = torch.float64
HYPERPARAMETERS = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=0.1, weight_decay=0.05)
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


def _flag_id(flags: tuple[bool, bool]) -> str:
    return "-".join(name for name, on in zip(("amsgrad", "maximize"), flags) if on) or "plain"


def _one_step(amsgrad: bool, maximize: bool, compile: bool | None, param, grad, exp_avg, exp_avg_sq,
              max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay):
    """One step of the optimizer class from the given state, as a function of every input
    (torch's own gradcheck of differentiable optimizers does the same)."""
    p = param.clone()
    p.grad = grad
    optimizer = AdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                      amsgrad=amsgrad, maximize=maximize, differentiable=True, compile=compile)
    optimizer.state[p].update(step=torch.tensor(3.0), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                              **({"max_exp_avg_sq": max_exp_avg_sq} if amsgrad else {}))
    optimizer.step()
    state = optimizer.state[p]
    return (p, state["exp_avg"], state["exp_avg_sq"], *([state["max_exp_avg_sq"]] if amsgrad else []))


def _step_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    param, grad, exp_avg = (torch.randn(5, generator=generator, dtype=F64) for _ in range(3))
    exp_avg_sq = torch.rand(5, generator=generator, dtype=F64) + 0.5
    # Away from ties with the new exp_avg_sq, where max is not differentiable.
    new_exp_avg_sq = 0.99 * exp_avg_sq + 0.01 * grad**2
    max_exp_avg_sq = new_exp_avg_sq + torch.tensor([0.3, -0.3, 0.2, -0.2, 0.4], dtype=F64)
    scalars = [torch.tensor(v, dtype=F64) for v in HYPERPARAMETERS.values()]
    return tuple(x.requires_grad_() for x in (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *scalars))


@pytest.mark.parametrize("flags", FLAGS, ids=_flag_id)
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_gradcheck_one_step(flags, compile):
    """With respect to param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, betas, eps, wd."""
    fn = functools.partial(_one_step, *flags, compile)
    # gradcheck backpropagates with retain_graph=True, which torch's donated buffers forbid.
    with torch._functorch.config.patch(donated_buffer=False):
        assert torch.autograd.gradcheck(fn, _step_inputs())


@pytest.mark.parametrize("flags", FLAGS, ids=_flag_id)
def test_default_settings_pass_gradcheck_gradgradcheck_and_batched_grads(flags):
    """``AdamW(differentiable=True)`` as a user builds it (Note [differentiable runs eagerly by
    default]): the standard checks, with retain_graph, create_graph and vmap, pass as they are."""
    fn = functools.partial(_one_step, *flags, None)
    assert torch.autograd.gradcheck(fn, _step_inputs(), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, _step_inputs(), check_batched_grad=True)


# ---- hypergradients over an unrolled least-squares problem -------------------------------------

K = 6


def _problem():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(32, 5, generator=generator, dtype=F64), torch.randn(32, 1, generator=generator, dtype=F64)
    valid = torch.randn(16, 5, generator=generator, dtype=F64), torch.randn(16, 1, generator=generator, dtype=F64)
    w0 = torch.randn(5, 1, generator=generator, dtype=F64)
    return train, valid, w0


def _loss(w, data):
    x, y = data
    return ((x @ w - y) ** 2).mean()


def _betas():
    # float64 tensors: with float betas, torch's differentiable path computes 1 - beta2**step in
    # float32 (its step is a float32 tensor), 1e-5 off for beta2 = 0.999. Ours uses float64.
    return torch.tensor(0.9, dtype=F64), torch.tensor(0.999, dtype=F64)


def _unrolled_with(optimizer_class, **kwargs):
    def validation_loss(lr, w0):
        train, valid, _ = _problem()
        w = w0.clone()
        optimizer = optimizer_class([w], lr=lr, betas=_betas(), weight_decay=0.1, differentiable=True, **kwargs)
        for _ in range(K):
            (w.grad,) = torch.autograd.grad(_loss(w, train), w, create_graph=True)
            optimizer.step()
        return _loss(w, valid)
    return validation_loss


def _unrolled_functional(lr, w0):
    train, valid, _ = _problem()
    params, state = {"w": w0}, functional.init({"w": w0})
    for _ in range(K):
        grads = torch.func.grad(lambda p: _loss(p["w"], train))(params)
        params, state = functional.update(params, grads, state, lr=lr, betas=_betas(), weight_decay=0.1)
    return _loss(params["w"], valid)


UNROLLS = {
    "class-compiled": _unrolled_with(AdamW, compile=True),
    "class-eager": _unrolled_with(AdamW, compile=False),
    "functional": _unrolled_functional,
}


@pytest.mark.parametrize("name", list(UNROLLS))
def test_hypergradient_matches_finite_differences_and_torch(name):
    _, _, w0 = _problem()
    lr = torch.tensor(0.05, dtype=F64)
    validation_loss = UNROLLS[name]
    lr_, w0_ = lr.clone().requires_grad_(), w0.clone().requires_grad_()
    ours = torch.autograd.grad(validation_loss(lr_, w0_), [lr_, w0_])

    lr_, w0_ = lr.clone().requires_grad_(), w0.clone().requires_grad_()
    reference = torch.autograd.grad(_unrolled_with(torch.optim.AdamW)(lr_, w0_), [lr_, w0_])
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)

    # Central differences in float64: along lr, and along a random direction of w0.
    def value(lr, w0):
        return validation_loss(lr, w0.requires_grad_()).detach()

    h = 1e-6
    direction = torch.randn(w0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    dlr = (value(lr + h, w0.clone()) - value(lr - h, w0.clone())) / (2 * h)
    dw = (value(lr, w0 + h * direction) - value(lr, w0 - h * direction)) / (2 * h)
    torch.testing.assert_close(ours[0], dlr, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((ours[1] * direction).sum(), dw, rtol=1e-6, atol=1e-8)


def test_torch_func_grad_through_the_unroll_equals_autograd():
    _, _, w0 = _problem()
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (expected,) = torch.autograd.grad(_unrolled_functional(lr, w0), lr)
    actual = torch.func.grad(_unrolled_functional)(lr.detach(), w0)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


# ---- the functional API ------------------------------------------------------------------------

def _tree(generator, dtype=torch.float32):
    return {"weight": torch.randn(3, 4, generator=generator, dtype=dtype),
            "bias": torch.randn(4, generator=generator, dtype=dtype),
            "scale": torch.randn((), generator=generator, dtype=dtype),
            "phase": torch.randn(2, generator=generator, dtype=torch.complex64)}


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_functional_equals_the_optimizer_step_for_step(amsgrad):
    generator = torch.Generator().manual_seed(3)
    start = _tree(generator)
    options = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, eps_root=1e-4, maximize=True)
    plain = {k: v.clone() for k, v in start.items()}
    differentiable = {k: v.clone() for k, v in start.items()}
    optimizers = [AdamW(plain.values(), amsgrad=amsgrad, **options),
                  AdamW(differentiable.values(), amsgrad=amsgrad, differentiable=True, **options)]
    params, state = start, functional.init(start, amsgrad=amsgrad)
    oracle = OracleAdamW([p.numpy() for p in start.values()], amsgrad=amsgrad, maximize=True)
    for _ in range(5):
        grads = _tree(generator)
        for tensors in (plain, differentiable):
            for name, p in tensors.items():
                p.grad = grads[name].clone()
        for optimizer in optimizers:
            optimizer.step()
        params, state = functional.update(params, grads, state, **options)
        oracle.step([g.numpy() for g in grads.values()], lr=0.02, betas=(0.8, 0.95), eps=1e-6,
                    weight_decay=0.1, eps_root=1e-4)
    for name in start:
        for tensors, optimizer in zip((plain, differentiable), optimizers):
            torch.testing.assert_close(params[name], tensors[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state.exp_avg[name], optimizer.state[tensors[name]]["exp_avg"],
                                       rtol=1e-5, atol=1e-6)
    assert state.step.item() == 5
    assert (state.max_exp_avg_sq is not None) == amsgrad
    exact = dict(zip(start, oracle.params))
    for name, p in params.items():
        real = torch.view_as_real(p) if p.is_complex() else p
        np.testing.assert_allclose(real.double().numpy(), exact[name], rtol=1e-5, atol=1e-6)


def test_functional_update_mutates_nothing():
    generator = torch.Generator().manual_seed(4)
    params, grads = _tree(generator), _tree(generator)
    state = functional.init(params, amsgrad=True)
    before = [t.clone() for t in (*params.values(), *grads.values(), *state.exp_avg.values())]
    functional.update(params, grads, state, lr=0.1)
    after = [*params.values(), *grads.values(), *state.exp_avg.values()]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert state.step.item() == 0


def test_functional_rejects_mismatched_structures():
    params = {"a": torch.zeros(2)}
    with pytest.raises(ValueError, match="grads must have the structure of params"):
        functional.update(params, {"b": torch.zeros(2)}, functional.init(params))
    with pytest.raises(ValueError, match="invalid lr"):
        functional.update(params, params, functional.init(params), lr=-1.0)


def test_vmap_over_tasks_equals_a_loop():
    """A batch of tasks, each with its own params, grads, state and learning rate."""
    tasks, generator = 4, torch.Generator().manual_seed(5)
    params = {"w": torch.randn(tasks, 3, 2, generator=generator), "b": torch.randn(tasks, 2, generator=generator)}
    lrs = torch.tensor([0.01, 0.02, 0.05, 0.1])
    state = functional.init(params)
    state_dims = functional.AdamWState(step=None, exp_avg=0, exp_avg_sq=0, max_exp_avg_sq=None)

    def task_update(p, g, s, lr):
        return functional.update(p, g, s, lr=lr, weight_decay=0.1)

    batched = torch.func.vmap(task_update, in_dims=(0, 0, state_dims, 0), out_dims=(0, state_dims))
    looped = [({k: v[i] for k, v in params.items()}, functional.init({k: v[i] for k, v in params.items()}))
              for i in range(tasks)]
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        params, state = batched(params, grads, state, lrs)
        looped = [task_update(p, {k: v[i] for k, v in grads.items()}, s, lrs[i])
                  for i, (p, s) in enumerate(looped)]
    for i, (p, s) in enumerate(looped):
        for name in params:
            torch.testing.assert_close(params[name][i], p[name], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(state.exp_avg_sq[name][i], s.exp_avg_sq[name], rtol=1e-6, atol=1e-7)


def test_functional_update_compiles_once_with_tensor_hyperparameters():
    generator = torch.Generator().manual_seed(6)
    params = _tree(generator)
    state = functional.init(params)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(functional.update, backend=counter, fullgraph=True)
    eager_params, eager_state = params, state
    for step in range(4):
        grads = _tree(generator)
        options = dict(lr=torch.tensor(0.01 * (step + 1)), weight_decay=torch.tensor(0.1 / (step + 1)))
        params, state = compiled(params, grads, state, **options)
        eager_params, eager_state = functional.update(eager_params, grads, eager_state, **options)
    torch.testing.assert_close(params, eager_params, rtol=1e-5, atol=1e-6)
    # The first call sees fresh zeros as state, later calls the previous outputs: one more graph
    # at most, and none for a changed hyperparameter value.
    assert counter.frame_count <= 2


# ---- eps_root ----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps_root, finite", [(0.0, False), (1e-16, True)])
def test_eps_root_keeps_meta_gradients_finite_where_a_gradient_entry_is_zero(eps_root, finite):
    w0 = torch.tensor([1.0, 2.0], dtype=F64)
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    params, state = {"w": w0}, functional.init({"w": w0})
    for _ in range(3):
        grads = {"w": params["w"] * torch.tensor([1.0, 0.0], dtype=F64)}  # the second entry is always 0
        params, state = functional.update(params, grads, state, lr=lr, eps_root=eps_root)
    (hypergradient,) = torch.autograd.grad(params["w"].sum(), lr)
    assert bool(torch.isfinite(hypergradient)) == finite
    # Either way the forward value is right: where v = 0, m = 0 and only weight decay acts.
    assert params["w"][1].item() == 2.0 * (1 - 0.1 * 0.01) ** 3


# ---- the inner-loop helper and its memory ------------------------------------------------------

def _graph_size(*outputs: torch.Tensor) -> int:
    """Autograd nodes reachable from ``outputs``: what backpropagating through them keeps alive."""
    seen, stack = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return len(seen)


def _regression():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(8)
    return model, torch.randn(16, 3, generator=generator), torch.randn(16, 1, generator=generator)


def test_truncated_unrolls_keep_memory_bounded():
    model, x, y = _regression()
    lr = torch.tensor(0.01, requires_grad=True)

    def graph_after(steps, truncate_every):
        adapted = unroll(model, torch.nn.functional.mse_loss, x, y, steps=steps, lr=lr,
                         truncate_every=truncate_every)
        return _graph_size(*adapted.params.values(), *adapted.state.exp_avg.values())

    assert graph_after(4, 2) == graph_after(8, 2) == graph_after(20, 2)
    assert graph_after(8, None) > graph_after(4, None)  # without truncation it grows with K


def test_truncation_cuts_gradients_to_the_initial_params_only():
    model, x, y = _regression()
    lr = torch.tensor(0.01, requires_grad=True)
    adapted = unroll(model, torch.nn.functional.mse_loss, x, y, steps=4, lr=lr, truncate_every=2)
    loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, adapted.params, x), y)
    hypergradient, *initial = torch.autograd.grad(loss, [lr, *model.parameters()], allow_unused=True)
    assert hypergradient is not None and torch.isfinite(hypergradient)
    assert all(g is None for g in initial)


def test_update_saves_about_five_param_sized_tensors_per_step():
    """The memory cost per unrolled step that inner_loop.py documents."""
    params = {"w": torch.randn(1000, dtype=F64, requires_grad=True)}
    grads = {"w": torch.randn(1000, dtype=F64, requires_grad=True)}
    state = functional.init(params)._replace(exp_avg={"w": torch.randn(1000, dtype=F64, requires_grad=True)},
                                             exp_avg_sq={"w": torch.rand(1000, dtype=F64, requires_grad=True)})
    for lr, documented in ((1e-3, 5), (torch.tensor(1e-3, requires_grad=True), 9)):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr(), t.storage_offset()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional.update(params, grads, state, lr=lr)
        assert sum(saved.values()) <= documented * 1000 * 8 + 1024, (lr, sum(saved.values()))


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_changing_inputs_in_place_after_the_step_leaves_the_meta_gradient_alone(compile):
    """The step keeps copies of the inputs its backward needs (Note [concatenated inputs]):
    zero_grad(set_to_none=False), which zeroes the grads in place, does not corrupt the
    meta-gradient. (The state tensors are the step's outputs; changing one of those in place makes
    the backward raise, as anywhere in autograd.)"""
    def hypergradient(disturb: bool) -> torch.Tensor:
        train, _, w0 = _problem()
        w = w0.clone().requires_grad_().clone()
        lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
        optimizer = AdamW([w], lr=lr, differentiable=True, compile=compile)
        for _ in range(2):
            (w.grad,) = torch.autograd.grad(_loss(w, train), w, create_graph=True)
            optimizer.step()
        if disturb:
            optimizer.zero_grad(set_to_none=False)
        return torch.autograd.grad(w.sum(), lr)[0]

    torch.testing.assert_close(hypergradient(disturb=True), hypergradient(disturb=False), rtol=0, atol=0)


def test_functional_inputs_changed_in_place_after_the_update_leave_its_gradient_alone():
    def gradient(disturb: bool) -> torch.Tensor:
        grads = {"w": torch.linspace(-1, 2, 6, dtype=F64).requires_grad_()}
        params = {"w": torch.linspace(0, 1, 6, dtype=F64)}
        new_params, state = functional.update(params, grads, functional.init(params), lr=0.1)
        later, _ = functional.update(new_params, grads, state, lr=0.1)
        if disturb:
            with torch.no_grad():
                grads["w"].mul_(2)
                params["w"].mul_(2)
        return torch.autograd.grad(later["w"].sum(), grads["w"])[0]

    torch.testing.assert_close(gradient(disturb=True), gradient(disturb=False), rtol=0, atol=0)


def test_differentiable_state_dict_round_trip_with_torch():
    """Params stepped together hold views of one vector of step counts (Note [differentiable
    runs]); a checkpoint holds a tensor per param, since torch.optim.AdamW increments its step
    tensors in place. Loaded into
    torch and into ours, both continue exactly as ours does."""
    generator = torch.Generator().manual_seed(9)
    start = [torch.randn(3, 2, generator=generator, dtype=F64), torch.randn(4, generator=generator, dtype=F64)]
    grads = [[torch.randn(p.shape, generator=generator, dtype=F64) for p in start] for _ in range(6)]
    mine = [p.clone() for p in start]
    optimizer = AdamW(mine, lr=0.05, differentiable=True)

    def step(pairs, index):
        for params, o in pairs:
            for p, g in zip(params, grads[index]):
                p.grad = g
            o.step()

    for index in range(3):
        step([(mine, optimizer)], index)
    assert optimizer.state[mine[0]]["step"]._base is optimizer.state[mine[1]]["step"]._base is not None
    checkpoint = optimizer.state_dict()
    assert checkpoint["state"][0]["step"]._base is checkpoint["state"][1]["step"]._base is None
    theirs, reloaded_params = [p.detach().clone() for p in mine], [p.detach().clone() for p in mine]
    continued = torch.optim.AdamW(theirs, lr=0.05)
    continued.load_state_dict(copy.deepcopy(checkpoint))  # as if saved and loaded: no aliasing
    # The checkpoint says differentiable=True, and torch's differentiable path computes
    # 1 - beta**step in float32 (1e-5 off for beta2 = 0.999); its plain path matches ours.
    continued.param_groups[0]["differentiable"] = False
    reloaded = AdamW(reloaded_params, lr=0.05, differentiable=True)
    reloaded.load_state_dict(copy.deepcopy(checkpoint))
    assert reloaded.state[reloaded_params[0]]["step"]._base is reloaded.state[reloaded_params[1]]["step"]._base
    for index in range(3, 6):
        step([(theirs, continued), (reloaded_params, reloaded), (mine, optimizer)], index)
    torch.testing.assert_close(theirs, [p.detach() for p in mine], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(reloaded_params, mine, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("write", ["in-place", "replaced"])
def test_a_step_count_written_is_its_params_alone(write):
    """Note [differentiable runs], Note [state the user writes]: a count written into one param's
    state, in place or replaced, changes that param's steps only, as with torch.optim.AdamW."""
    start = [torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64), torch.randn(2, dtype=F64)]
    mine, theirs = [p.clone() for p in start], [p.clone() for p in start]
    optimizers = AdamW(mine, lr=0.05, differentiable=True), torch.optim.AdamW(theirs, lr=0.05)
    for index in range(4):
        for params, o in zip((mine, theirs), optimizers):
            for p in params:
                p.grad = torch.full_like(p, float(index + 1))
            o.step()
            if index == 1:
                state = o.state[params[0]]
                state["step"].zero_() if write == "in-place" else state.__setitem__("step", torch.tensor(0.0))
    torch.testing.assert_close([p.detach() for p in mine], theirs, rtol=1e-12, atol=1e-13)
    assert [float(optimizers[0].state[p]["step"]) for p in mine] == [2.0, 4.0, 4.0]


def test_differentiable_bad_input_is_named_before_anything_changes():
    leaf = torch.randn(3, dtype=F64, requires_grad=True)
    other = torch.randn(2, dtype=F64, requires_grad=True).clone()
    optimizer = AdamW([other, leaf], lr=0.1, differentiable=True)
    other.grad, leaf.grad = torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)
    before = other.detach().clone()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] is a leaf tensor that requires grad"):
        optimizer.step()
    other.grad = torch.ones(2, dtype=F64).to_sparse()
    leaf.grad = None
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] has a sparse grad"):
        optimizer.step()
    torch.testing.assert_close(other.detach(), before, rtol=0, atol=0)
    assert not optimizer.state


@pytest.mark.parametrize("compile", [True, False], ids=["compiled-kernel", "eager-kernel"])
def test_a_differentiable_step_inside_a_users_compile_runs_outside_the_graph_with_the_eager_numbers(compile):
    """Note [a differentiable step in a user's compile]: a user's compiled function that steps a
    differentiable AdamW gives the eager params and hypergradient (Dynamo failed with an internal
    error on our groups before); the step breaks the graph, as torch's differentiable AdamW's
    does, so ``fullgraph=True`` raises, naming what to trace instead. With ``compile=True`` our
    own kernel still compiles there, outside the user's graph."""
    w0 = torch.randn(5, dtype=F64, requires_grad=True)
    scale = torch.arange(1, 6, dtype=F64)

    def unrolled(compiled: bool):
        p = w0.clone()
        optimizer = AdamW([p], lr=0.1, differentiable=True, compile=compile)

        def inner():
            p.grad = 2 * p * scale
            optimizer.step()

        counter = torch._dynamo.testing.CompileCounter()
        step = torch.compile(inner, backend=counter) if compiled else inner
        step()
        graphs = counter.frame_count
        for _ in range(2):
            step()
        assert counter.frame_count == graphs and graphs == (1 if compiled else 0)  # compiled, once
        return p, torch.autograd.grad(p.sum(), w0)[0], optimizer

    p_eager, hypergradient_eager, _ = unrolled(compiled=False)
    p_compiled, hypergradient_compiled, optimizer = unrolled(compiled=True)
    torch.testing.assert_close(p_compiled, p_eager, rtol=0, atol=0)
    torch.testing.assert_close(hypergradient_compiled, hypergradient_eager, rtol=0, atol=0)
    assert hypergradient_eager.isfinite().all() and (hypergradient_eager != 0).all()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="trace compiled_adamw.functional.update instead"):
        torch.compile(optimizer.step, backend="eager", fullgraph=True)()
