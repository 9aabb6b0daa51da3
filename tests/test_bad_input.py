"""Bad input: a clear error naming the problem, raised before anything is mutated."""

from __future__ import annotations

import math

import pytest
import torch

from compiled_adamw import AdamW

from .helpers import assert_models_close, assert_same, batch, compiled_by_user, model_and_twin, ours, snapshot, train


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=math.nan), "lr"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "lr"),
    (dict(betas=(1.0, 0.999)), "beta1"),
    (dict(betas=(0.9, -0.1)), "beta2"),
    (dict(betas=(0.9, math.nan)), "beta2"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay=torch.tensor(math.nan)), "weight_decay"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    model, _ = model_and_twin()
    with pytest.raises(ValueError, match=name):
        AdamW(model.parameters(), **kwargs)


def test_bad_param_group_is_not_added():
    model, _ = model_and_twin()
    optimizer = AdamW(model[0].parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr"):
        optimizer.add_param_group({"params": model[2].parameters(), "lr": -1.0})
    assert len(optimizer.param_groups) == 1 and len(optimizer._buckets) == 1
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*int64"):
        optimizer.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert len(optimizer.param_groups) == 1


def _trained_pair():
    model, twin = model_and_twin()
    optimizer, reference = ours(model), ours(twin)
    train(model, optimizer, range(3))
    train(twin, reference, range(3))
    x, y = batch(3)
    for m in (model, twin):
        torch.nn.functional.mse_loss(m(x), y).backward()
    return model, optimizer, twin, reference


def _recovers(model, optimizer, twin, reference):
    """After the failure the optimizer steps exactly like one that never failed."""
    optimizer.step()
    reference.step()
    train(model, optimizer, range(4, 6))
    train(twin, reference, range(4, 6))
    assert_models_close(model, twin)


@pytest.mark.parametrize("key, value, name", [
    ("lr", -0.5, "lr"), ("eps", math.nan, "eps"), ("weight_decay", -1.0, "weight_decay"),
    ("betas", (0.9, 1.5), "beta2"), ("lr", torch.ones(2), "lr"), ("betas", (0.9,), "betas"),
])
def test_invalid_value_assigned_to_a_group_is_refused_at_once(key, value, name):
    """Torch would store it and step with it; ours names the group and key at the assignment and
    keeps the group as it was."""
    model, optimizer, twin, reference = _trained_pair()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=rf"param_groups\[0\].*{name}"):
        optimizer.param_groups[0][key] = value
    assert_same(before, snapshot(optimizer))
    _recovers(model, optimizer, twin, reference)


@pytest.mark.parametrize("where", ["eager", "users-function"])
def test_sparse_grad_fails_the_step_cleanly(where):
    """``users-function``: inside a user's compile, a grad without a storage of its own leaves the
    trace's check of what the graph touches to the step, which names it (Note [a step alone with
    the params])."""
    model, optimizer, twin, reference = _trained_pair()
    step = optimizer.step if where == "eager" else compiled_by_user(optimizer, where)
    good = model[2].bias.grad
    model[2].bias.grad = good.to_sparse()
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[3\].*sparse"):
        step()
    assert_same(before, snapshot(optimizer))
    assert torch.is_grad_enabled(), "the step turns grad mode off while it runs, and back on when it raises"
    model[2].bias.grad = good
    _recovers(model, optimizer, twin, reference)


def test_param_reshaped_after_a_step_fails_the_step_cleanly():
    model, optimizer, twin, reference = _trained_pair()
    weight = model[0].weight
    good_data, good_grad = weight.data, weight.grad
    weight.grad = None
    weight.data = good_data.reshape(-1)  # same memory, another shape: the state no longer fits
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] changed shape"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))
    weight.data, weight.grad = good_data, good_grad
    _recovers(model, optimizer, twin, reference)


def _corrupt(name):
    def shape(sd):
        sd["state"][0]["exp_avg"] = torch.zeros(3)
    def missing(sd):
        del sd["state"][1]["exp_avg_sq"]
    def groups(sd):
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    def params(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    def hyper(sd):
        sd["param_groups"][0]["lr"] = -1.0
    def no_lr(sd):
        del sd["param_groups"][0]["lr"]
    def unknown(sd):
        sd["state"][2]["momentum_buffer"] = torch.zeros(1)
    def dtype(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.int32)
    return {"shape": (shape, r"state\[0\].*'exp_avg'.*shape"), "missing": (missing, r"state\[1\].*'exp_avg_sq'"),
            "groups": (groups, "2 parameter groups"), "params": (params, r"param_groups\[0\] has 3 params"),
            "hyper": (hyper, r"param_groups\[0\].*lr"), "no_lr": (no_lr, r"loaded param_groups\[0\] has no 'lr'"),
            "unknown": (unknown, "momentum_buffer"),
            "dtype": (dtype, r"state\[0\].*'exp_avg'.*int32")}[name]


@pytest.mark.parametrize("problem", ["shape", "missing", "groups", "params", "hyper", "no_lr", "unknown", "dtype"])
def test_bad_checkpoint_fails_load_cleanly(problem):
    model, optimizer, twin, reference = _trained_pair()
    checkpoint = reference.state_dict()
    checkpoint = {"state": {k: dict(v) for k, v in checkpoint["state"].items()},
                  "param_groups": [dict(g) for g in checkpoint["param_groups"]]}
    corrupt, message = _corrupt(problem)
    corrupt(checkpoint)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))
    _recovers(model, optimizer, twin, reference)

