"""torch.optim conventions: state dict interop, hooks, closure, zero_grad, every LR scheduler."""

from __future__ import annotations


import pytest
import torch


from .helpers import USERS_COMPILES, assert_models_close, batch, compiled_by_user, model_and_twin, ours, through_disk, train


def _torch_keys(groups: list[dict]) -> list[dict]:
    """Groups without eps_root: our key, which torch keeps from our checkpoints and we default
    (to 0) when loading torch's."""
    return [{k: v for k, v in g.items() if k != "eps_root"} for g in groups]


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_state_dict_round_trip_with_torch(direction):
    model, twin = model_and_twin()
    first = ours(model, amsgrad=True) if direction == "ours-to-torch" else torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    train(model, first, range(5))
    twin.load_state_dict(model.state_dict())
    second = (torch.optim.AdamW(twin.parameters(), lr=1e-2, amsgrad=True) if direction == "ours-to-torch"
              else ours(twin, amsgrad=True))
    second.load_state_dict(through_disk(first.state_dict(), map_location="cpu"))
    assert _torch_keys(second.state_dict()["param_groups"]) == _torch_keys(first.state_dict()["param_groups"])
    assert float(second.param_groups[0]["eps_root"]) == 0.0
    train(model, first, range(5, 10))
    train(twin, second, range(5, 10))
    assert_models_close(model, twin)


def test_loading_writes_into_the_existing_tensors():
    """A captured CUDA graph keeps reading the same memory across a load."""
    model, twin = model_and_twin()
    optimizer = ours(model)
    train(model, optimizer, range(1))  # state exists, as when a step has been captured
    vector, state_before = optimizer._settings[0].vector, optimizer._buckets[0][0].exp_avg
    reference = torch.optim.AdamW(twin.parameters(), lr=0.5)
    train(twin, reference, range(2))
    optimizer.load_state_dict(reference.state_dict())
    assert optimizer._settings[0].vector is vector and vector[0].item() == 0.5
    assert optimizer.param_groups[0]["lr"] == 0.5
    first = next(iter(model.parameters()))
    assert optimizer.state[first]["exp_avg"].untyped_storage().data_ptr() == state_before.untyped_storage().data_ptr()


def test_model_load_state_dict_and_param_identity_survive():
    model, twin = model_and_twin(seed=1)
    parameters = list(model.parameters())
    optimizer = ours(model)
    assert [p for g in optimizer.param_groups for p in g["params"]] == parameters
    model.load_state_dict(twin.state_dict())  # copies into the flat buffer in place
    assert_models_close(model, twin)
    train(model, optimizer, range(2))
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(twin, reference, range(2))
    assert_models_close(model, twin)


def test_params_reassigned_after_construction_are_adopted():
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    model.load_state_dict(twin.state_dict(), assign=False)
    model[0].weight.data = model[0].weight.data.clone()  # what model.to() does to each param
    train(model, optimizer, range(3))
    train(twin, reference, range(3))
    assert_models_close(model, twin)


@pytest.mark.parametrize("where", ["home", "re-pointed", "eager-kernels", *USERS_COMPILES])
def test_a_step_bumps_the_params_versions_so_a_stale_backward_fails_as_with_torch(where):
    """torch's step writes the params in place, which bumps their version counters: a backward
    through a graph that saved a param before the step then raises instead of using the new
    values. Ours writes through aliases, so it bumps them itself -- wherever the param lives,
    whichever path steps it."""
    model, twin = model_and_twin()
    if where == "re-pointed":
        model[0].weight.data = model[0].weight.data.t().contiguous().t()  # away from home, another layout
    optimizer = ours(model, compile=where != "eager-kernels")
    ours_step = compiled_by_user(optimizer, where) if where in USERS_COMPILES else optimizer.step
    for m, step in ((model, ours_step), (twin, torch.optim.AdamW(twin.parameters(), lr=1e-2).step)):
        x, y = batch(0)
        torch.nn.functional.mse_loss(m(x), y).backward()
        stale = (m[0].weight ** 2).sum() + (m[2].bias ** 2).sum()  # saves both params
        versions = [p._version for p in m.parameters()]
        step()
        assert all(p._version > v for p, v in zip(m.parameters(), versions))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.backward()


def test_all_six_hooks_closure_and_zero_grad():
    model, _ = model_and_twin()
    optimizer = ours(model)
    calls = []
    optimizer.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    optimizer.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    optimizer.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    optimizer.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    optimizer.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    x, y = batch(0)

    def closure():
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]

    grads = [p.grad for p in model.parameters()]
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads)), "zeroed in place"
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_group_holds_the_floats_assigned_and_the_step_uses_them():
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for o in (optimizer, reference):
        o.param_groups[0]["lr"], o.param_groups[0]["betas"] = 0.1, (0.8, 0.99)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["betas"] == (0.8, 0.99) and type(group["lr"]) is float
    assert optimizer._settings[0].vector[:3].tolist() == [0.1, 0.8, 0.99], "written at once"
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    assert_models_close(model, twin)


def _scheduler_factories():
    s = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: s.LambdaLR(o, lambda e: 0.9**e),
        "MultiplicativeLR": lambda o: s.MultiplicativeLR(o, lambda e: 0.95),
        "StepLR": lambda o: s.StepLR(o, step_size=2, gamma=0.5),
        "MultiStepLR": lambda o: s.MultiStepLR(o, milestones=[2, 4]),
        "ConstantLR": lambda o: s.ConstantLR(o, factor=0.5, total_iters=3),
        "LinearLR": lambda o: s.LinearLR(o, start_factor=0.2, total_iters=4),
        "ExponentialLR": lambda o: s.ExponentialLR(o, gamma=0.8),
        "PolynomialLR": lambda o: s.PolynomialLR(o, total_iters=6, power=2.0),
        "CosineAnnealingLR": lambda o: s.CosineAnnealingLR(o, T_max=5),
        "CosineAnnealingWarmRestarts": lambda o: s.CosineAnnealingWarmRestarts(o, T_0=3),
        "CyclicLR": lambda o: s.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2, cycle_momentum=False),
        "CyclicLR-beta1": lambda o: s.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2,
                                               base_momentum=0.8, max_momentum=0.9),
        "OneCycleLR": lambda o: s.OneCycleLR(o, max_lr=0.05, total_steps=10),
        "SequentialLR": lambda o: s.SequentialLR(o, [s.ConstantLR(o, factor=0.5, total_iters=2),
                                                     s.ExponentialLR(o, gamma=0.9)], milestones=[2]),
        "ChainedScheduler": lambda o: s.ChainedScheduler([s.ConstantLR(o, factor=0.5, total_iters=2),
                                                          s.ExponentialLR(o, gamma=0.9)]),
        "ReduceLROnPlateau": lambda o: s.ReduceLROnPlateau(o, patience=0, factor=0.5),
    }


@pytest.mark.parametrize("name", list(_scheduler_factories()))
def test_every_lr_scheduler(name):
    factory = _scheduler_factories()[name]
    model, twin = model_and_twin()
    optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(model, optimizer, range(8), factory(optimizer))
    train(twin, reference, range(8), factory(reference))
    ours_group, torch_group = optimizer.param_groups[0], reference.param_groups[0]
    assert {k: v for k, v in ours_group.items() if k not in ("params", "eps_root")} == \
        {k: v for k, v in torch_group.items() if k != "params"}
    vector = optimizer._settings[0].vector.tolist()
    assert vector[:3] == [torch_group["lr"], *torch_group["betas"]], "the step uses what the group holds"
    assert_models_close(model, twin)


def test_a_model_built_under_a_float64_default_dtype_steps_as_torchs():
    """Torch's step counts follow a float64 default dtype; ours stay float32 (README's known limits)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, twin = model_and_twin()
        optimizer, reference = ours(model), torch.optim.AdamW(twin.parameters(), lr=1e-2)
        train(model, optimizer, range(3))
        train(twin, reference, range(3))
    finally:
        torch.set_default_dtype(default)
    assert model[0].weight.dtype == torch.float64
    assert_models_close(model, twin)
    mine, theirs = optimizer.state_dict()["state"], reference.state_dict()["state"]
    assert {values["step"].dtype for values in mine.values()} == {torch.float32}
    assert {values["step"].dtype for values in theirs.values()} == {torch.float64}
    torch.testing.assert_close(mine, {i: {**values, "step": values["step"].float()} for i, values in theirs.items()})
