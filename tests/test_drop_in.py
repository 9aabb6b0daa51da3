"""A faithful drop-in: what a user reads back (groups, state_dict, copies, checkpoints) holds what
the optimizer uses, and torch's own invariants hold. One test per behaviour of issue 9."""

from __future__ import annotations

import collections
import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from compiled_adamw import AdamW

from .helpers import assert_models_close, assert_same, batch, model_and_twin, ours, snapshot, through_disk, train


def _pair(**kwargs):
    model, twin = model_and_twin()
    return model, ours(model, **kwargs), twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, **kwargs)


def _groups(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in ("params", "eps_root")} for g in optimizer.state_dict()["param_groups"]]


# ---- 1. floats assigned since the last step --------------------------------------------------

def test_state_dict_holds_floats_assigned_since_the_last_step():
    model, optimizer, twin, reference = _pair()
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    for o in (optimizer, reference):
        o.param_groups[0]["lr"] = 0.1
        o.param_groups[0]["betas"] = (0.85, 0.98)
    assert _groups(optimizer) == _groups(reference)
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.1


def _one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=12)


@pytest.mark.parametrize("make", [ours, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)], ids=["ours", "torch"])
def test_one_cycle_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(make):
    model, resumed_model = model_and_twin()
    optimizer = make(model)
    scheduler = _one_cycle(optimizer)
    train(model, optimizer, range(5), scheduler)
    checkpoint = through_disk({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict()})
    train(model, optimizer, range(5, 10), scheduler)

    resumed = make(resumed_model)
    resumed_scheduler = _one_cycle(resumed)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    train(resumed_model, resumed, range(5, 10), resumed_scheduler)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), "resuming must give the uninterrupted run exactly"
    assert _groups(optimizer) == _groups(resumed)


# ---- 2. tensor hyperparameters shared between groups ----------------------------------------

def test_a_tensor_shared_by_groups_is_never_written_through():
    model, twin = model_and_twin()
    shared = torch.tensor(0.05, dtype=torch.float64)
    optimizer = AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=shared)
    reference = torch.optim.AdamW([{"params": twin[0].parameters()}, {"params": twin[2].parameters()}],
                                  lr=torch.tensor(0.05, dtype=torch.float64), foreach=False)
    for o in (optimizer, reference):
        o.param_groups[1]["lr"] = 0.2
    assert shared.item() == 0.05 and optimizer.param_groups[0]["lr"] is shared
    train(model, optimizer, range(3))
    train(twin, reference, range(3))
    assert_models_close(model, twin)


def test_loading_groups_that_differ_gives_each_group_its_own_values():
    model, twin = model_and_twin()
    shared = torch.tensor(0.1, dtype=torch.float64)
    optimizer = AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], weight_decay=shared)
    reference = torch.optim.AdamW([{"params": twin[0].parameters(), "weight_decay": 0.1},
                                   {"params": twin[2].parameters(), "weight_decay": 0.0}], lr=1e-3)
    optimizer.load_state_dict(through_disk(reference.state_dict()))
    assert shared.item() == 0.1, "the user's tensor is not the checkpoint's to write"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [v[4].item() for v in (s.vector for s in optimizer._settings)] == [0.1, 0.0]
    train(model, optimizer, range(3))
    train(twin, reference, range(3))
    assert_models_close(model, twin)


# ---- 3. torch.distributed.checkpoint ---------------------------------------------------------

@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_dcp_round_trip_resumes_exactly(trained, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results = {}
    for name, make in (("ours", ours), ("torch", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))):
        model, resumed_model = model_and_twin()
        optimizer = make(model)
        train(model, optimizer, range(3 if trained else 0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            model_state, optimizer_state = get_state_dict(model, optimizer)
            assert optimizer_state["param_groups"][0]["lr"] == 1e-2
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path / name)
            resumed = AdamW(resumed_model.parameters(), lr=0.5) if name == "ours" else \
                torch.optim.AdamW(resumed_model.parameters(), lr=0.5)
            model_state, optimizer_state = get_state_dict(resumed_model, resumed)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(loaded, checkpoint_id=tmp_path / name)
            set_state_dict(resumed_model, resumed, model_state_dict=loaded["model"],
                           optim_state_dict=loaded["optimizer"])
        assert resumed.param_groups[0]["lr"] == 1e-2 and type(resumed.param_groups[0]["lr"]) is float
        before = [p.detach().clone() for p in resumed_model.parameters()]
        train(resumed_model, resumed, range(3, 6))
        train(model, optimizer, range(3, 6))
        for p, q in zip(model.parameters(), resumed_model.parameters()):
            assert torch.equal(p, q), f"{name}: the resumed run differs from the uninterrupted one"
        assert any(not torch.equal(p, b) for p, b in zip(resumed_model.parameters(), before)), "params did not move"
        results[name] = [p.detach() for p in resumed_model.parameters()]
    torch.testing.assert_close(results["ours"], results["torch"], rtol=1e-5, atol=1e-6)


# ---- 4. params re-pointed by someone else ----------------------------------------------------

def test_params_re_pointed_into_zero_buckets_are_stepped_there(one_process_group):
    model, twin = model_and_twin()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdamW, parameters_as_bucket_view=True, lr=1e-2)
    reference = ZeroRedundancyOptimizer(twin.parameters(), optimizer_class=torch.optim.AdamW,
                                        parameters_as_bucket_view=True, lr=1e-2)
    pointers = [p.data_ptr() for p in model.parameters()]
    train(model, zero, range(4))
    train(twin, reference, range(4))
    assert [p.data_ptr() for p in model.parameters()] == pointers, "a param was taken back from ZeRO's bucket"
    bucket = zero._buckets[0][0]  # what ZeRO broadcasts
    for p in model.parameters():
        offset = (p.data_ptr() - bucket.data_ptr()) // p.element_size()
        assert torch.equal(bucket[offset : offset + p.numel()], p.detach().reshape(-1))
    assert_models_close(model, twin)


def test_params_re_pointed_by_hand_are_stepped_where_they_live():
    model, optimizer, twin, reference = _pair()
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    for m in (model, twin):
        m[0].weight.data = m[0].weight.data.clone()  # the same Parameter, new memory
    pointer = model[0].weight.data_ptr()
    before = model[0].weight.detach().clone()
    train(model, optimizer, range(2, 5))
    train(twin, reference, range(2, 5))
    assert model[0].weight.data_ptr() == pointer and not torch.equal(model[0].weight, before)
    assert_models_close(model, twin)


# ---- 5. the same new param twice -------------------------------------------------------------

def test_the_same_param_twice_in_a_new_group_is_refused():
    model, _ = model_and_twin()
    optimizer = AdamW(model[0].parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is the same tensor as "
                                         r"param_groups\[1\]\['params'\]\[0\]"):
        optimizer.add_param_group({"params": [model[2].weight, model[2].weight]})
    assert len(optimizer.param_groups) == len(optimizer._buckets) == len(optimizer._settings) == 1


# ---- 6. impossible step counts ---------------------------------------------------------------

@pytest.mark.parametrize("step", [-1.0, math.nan, math.inf, 2.5])
def test_a_checkpoint_step_that_is_no_count_is_refused(step):
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(2))
    checkpoint = copy.deepcopy(optimizer.state_dict())
    checkpoint["state"][1]["step"] = torch.tensor(step)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"state\[1\].*'step'.*whole number"):
        optimizer.load_state_dict(checkpoint)
    assert_same(before, snapshot(optimizer))


# ---- 7. a grad reshaped behind the param's back ----------------------------------------------

def test_a_grad_reshaped_in_place_is_named_not_stepped():
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(1))
    x, y = batch(1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grad = model[0].weight.grad
    grad.data = grad.data.reshape(-1)  # same memory, another shape
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\]: its grad is torch.float32 \(48,\)"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


# ---- 8. copies step ---------------------------------------------------------------------------

_COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": lambda obj: through_disk(obj, weights_only=False),
}


@pytest.mark.parametrize("how", list(_COPIES))
def test_a_copy_of_model_and_optimizer_trains_exactly_as_the_original(how):
    model, optimizer, _, _ = _pair(amsgrad=True)
    scheduler = _one_cycle(optimizer)
    train(model, optimizer, range(3), scheduler)
    copied_model, copied, copied_scheduler = _COPIES[how]((model, optimizer, scheduler))
    assert [p for g in copied.param_groups for p in g["params"]] == list(copied_model.parameters())
    assert copied_scheduler.optimizer is copied
    train(model, optimizer, range(3, 6), scheduler)
    train(copied_model, copied, range(3, 6), copied_scheduler)
    for p, q in zip(model.parameters(), copied_model.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("how", list(_COPIES))
def test_a_copy_of_the_optimizer_alone_steps_like_torchs_copy(how):
    model, optimizer, twin, reference = _pair()
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    copied, copied_reference = _COPIES[how](optimizer), _COPIES[how](reference)
    for o in (copied, copied_reference):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    assert_models_close(*(torch.nn.ParameterList(o.param_groups[0]["params"]) for o in (copied, copied_reference)))
    assert_models_close(model, twin)  # the originals are untouched by the copies' steps


# ---- 9. older and neighbouring checkpoints ---------------------------------------------------

def test_an_older_checkpoint_gets_torchs_defaults():
    model, optimizer, twin, reference = _pair()
    train(twin, reference, range(2))
    checkpoint = copy.deepcopy(reference.state_dict())
    for key in ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
        del checkpoint["param_groups"][0][key]
    model.load_state_dict(twin.state_dict())
    optimizer.load_state_dict(checkpoint)
    reference.load_state_dict(checkpoint)
    assert _groups(optimizer) == _groups(reference)
    train(model, optimizer, range(2, 4))
    train(twin, reference, range(2, 4))
    assert_models_close(model, twin)


def test_an_adam_checkpoint_loads_as_adamw():
    model, optimizer, twin, _ = _pair()
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    train(twin, adam, range(2))
    optimizer.load_state_dict(adam.state_dict())
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is True
    assert optimizer.state_dict()["param_groups"][0]["decoupled_weight_decay"] is True


# ---- 10. state-dict hooks that add entries ---------------------------------------------------

@pytest.mark.parametrize("differentiable", [False, True])
def test_state_dict_hooks_may_add_entries_that_are_not_dicts(differentiable):
    params = [torch.randn(3, 2).requires_grad_(not differentiable)]
    if differentiable:
        params = [params[0].clone()]
    optimizer = AdamW(params, differentiable=differentiable)
    reference = torch.optim.AdamW([torch.randn(3, 2)], differentiable=differentiable)
    for o in (optimizer, reference):
        o.register_state_dict_post_hook(lambda o, sd: sd["state"].__setitem__("note", 1))
        o.param_groups[0]["params"][0].grad = torch.ones(3, 2)
        o.step()
        state_dict = o.state_dict()
        assert state_dict["state"]["note"] == 1
        o.load_state_dict(state_dict)
        o.step()
    assert optimizer.state["note"] == reference.state["note"] == 1


# ---- 11. casting or moving the model after building the optimizer ----------------------------

@pytest.mark.parametrize("cast", ["double", "half", "to-bfloat16"])
def test_casting_the_model_before_the_first_step_is_adopted(cast):
    """As if the optimizer had been built after the cast, the ordering torch documents."""
    apply = {"double": lambda m: m.double(), "half": lambda m: m.half(), "to-bfloat16": lambda m: m.to(torch.bfloat16)}[cast]
    model, twin = model_and_twin()
    optimizer = ours(model)
    apply(model)
    reference = ours(apply(twin))
    dtype = next(model.parameters()).dtype
    for step in range(3):
        x, y = (t.to(dtype) for t in batch(step))
        for m, o in ((model, optimizer), (twin, reference)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert all(v.dtype == dtype for s in optimizer.state.values() for k, v in s.items() if k != "step")
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == dtype and torch.equal(p, q)


def test_casting_the_model_after_a_step_casts_the_state_as_loading_would():
    model, optimizer, twin, reference = _pair()
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    model.double()
    twin.double()
    cast_reference = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    cast_reference.load_state_dict(reference.state_dict())  # torch's way to cast the state
    for step in range(2, 4):
        x, y = (t.double() for t in batch(step))
        for m, o in ((model, optimizer), (twin, cast_reference)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    # The first two steps ran in float32, where ours and torch's differ by float32 rounding.
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == torch.float64


# ---- 12. strides -----------------------------------------------------------------------------

def test_params_keep_their_strides():
    def make() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(3, 8, generator=generator)[:, ::2]),  # not dense
                torch.nn.Parameter(torch.randn(4, 3, generator=generator).t())]  # transposed

    params, references = make(), make()
    optimizer, reference = AdamW(params, lr=0.1), torch.optim.AdamW(references, lr=0.1)
    assert params[0].stride() == (8, 2) and params[1].stride() == (1, 3)
    for step in range(4):
        if step == 2:
            for p in (params[1], references[1]):
                p.data = p.data.contiguous()
        for p, q in zip(params, references):
            p.grad = torch.full_like(p, step + 1.0)
            q.grad = torch.full_like(q, step + 1.0)
        optimizer.step()
        reference.step()
    assert params[0].stride() == (8, 2) and params[1].stride() == (4, 1)
    torch.testing.assert_close(params, references)


def test_a_square_param_transposed_in_place_is_stepped_by_its_elements():
    """Same pointer, same shape, other strides: the state pairs with the param's elements."""
    def make() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 4, generator=generator)),
                torch.nn.Parameter(torch.randn(3, generator=generator))]

    params, references = make(), make()
    optimizer, reference = AdamW(params, lr=0.1), torch.optim.AdamW(references, lr=0.1)
    for step in range(4):
        if step == 2:
            for p in (params[0], references[0]):
                p.data = p.data.t()
        for p, q in zip(params, references):
            grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + step
            p.grad, q.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(params, references)


def test_a_param_that_keeps_moving_is_stepped_wherever_it_is_each_step():
    """A step remembers where each param was last seen (Note [where memory lives]): moved away,
    moved again, transposed and transposed back, each param is stepped where it is at each
    step, as torch's."""
    def make() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(4, 4, generator=generator)),
                torch.nn.Parameter(torch.randn(70_000, generator=generator))]  # a kernel call of its own

    moves = {1: lambda p: p.data.clone(), 2: lambda p: p.data.clone(), 4: lambda p: p.data.t(),
             5: lambda p: p.data.t()}
    params, references = make(), make()
    optimizer, reference = AdamW(params, lr=0.1), torch.optim.AdamW(references, lr=0.1)
    for step in range(7):
        if step in moves:
            for p in (params[0], references[0], params[1], references[1]):
                if p.dim() == 2 or step < 4:
                    p.data = moves[step](p)
        for p, q in zip(params, references):
            grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / p.numel() + step
            p.grad, q.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        torch.testing.assert_close(params, references)


# ---- 13. saving part of a model --------------------------------------------------------------

def test_saving_part_of_a_model_writes_that_parts_bytes():
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    AdamW(model.parameters())
    part = model[-1].state_dict()
    size = len(_save_bytes(part))
    part_bytes = sum(t.numel() * t.element_size() for t in part.values())
    assert size < part_bytes + 4096, f"{size} bytes written for a part of {part_bytes} bytes"


def _save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---- 14. grads are never written ---------------------------------------------------------------

@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_step_never_writes_into_a_grad(set_to_none):
    model, optimizer, _, _ = _pair()
    for step in range(3):
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        versions, values = [g._version for g in grads], [g.clone() for g in grads]
        optimizer.step()
        assert [p.grad for p in model.parameters()] == grads, "p.grad was re-pointed"
        assert [g._version for g in grads] == versions
        torch.testing.assert_close([p.grad for p in model.parameters()], values, rtol=0, atol=0)


# ---- what a user reads back is what the step uses ----------------------------------------------

def test_turning_amsgrad_on_mid_run_shows_in_the_state_and_the_checkpoint():
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(2))
    optimizer.param_groups[0]["amsgrad"] = True
    train(model, optimizer, range(2, 4))
    assert all("max_exp_avg_sq" in optimizer.state[p] for p in model.parameters())
    checkpoint = through_disk(optimizer.state_dict())
    assert all("max_exp_avg_sq" in values for values in checkpoint["state"].values())
    resumed_model, _ = model_and_twin()
    resumed_model.load_state_dict(model.state_dict())
    resumed = ours(resumed_model, amsgrad=True)
    resumed.load_state_dict(checkpoint)
    train(model, optimizer, range(4, 6))
    train(resumed_model, resumed, range(4, 6))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


# ---- state the user writes (Note [state the user writes]) -----------------------------------------

def _first_param(optimizer):
    return optimizer.param_groups[0]["params"][0]


_STATE_WRITES = {
    "del state[p]": lambda o: o.state.__delitem__(_first_param(o)),
    "state[p] = {}": lambda o: o.state.__setitem__(_first_param(o), {}),
    "state.clear()": lambda o: o.state.clear(),
    "state = defaultdict(dict)": lambda o: setattr(o, "state", collections.defaultdict(dict)),
    "state[p]['step'] = tensor": lambda o: o.state[_first_param(o)].__setitem__("step", torch.tensor(1.0)),
    "state[p]['step'].zero_()": lambda o: o.state[_first_param(o)]["step"].zero_(),
    "state[p]['exp_avg'] = tensor": lambda o: o.state[_first_param(o)].__setitem__(
        "exp_avg", torch.full_like(_first_param(o), 0.5)),
    "state[p].update(exp_avg_sq=tensor)": lambda o: o.state[_first_param(o)].update(
        exp_avg_sq=torch.full_like(_first_param(o), 2.0)),
    "state[p]['exp_avg'].mul_(2)": lambda o: o.state[_first_param(o)]["exp_avg"].mul_(2),
}


@pytest.mark.parametrize("write", list(_STATE_WRITES))
def test_state_the_user_writes_is_what_the_next_steps_use(write):
    model, optimizer, twin, reference = _pair(amsgrad=True)
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    for o in (optimizer, reference):
        _STATE_WRITES[write](o)
    torch.testing.assert_close(optimizer.state_dict()["state"], reference.state_dict()["state"])
    train(model, optimizer, range(2, 4))
    train(twin, reference, range(2, 4))
    assert_models_close(model, twin)
    torch.testing.assert_close(optimizer.state_dict()["state"], reference.state_dict()["state"])


@pytest.mark.parametrize("write, problem", [
    (lambda state: state.__setitem__("exp_avg", torch.zeros(7)), r"\['exp_avg'\] has shape \(7,\), the param has \(8, 6\)"),
    (lambda state: state.__delitem__("exp_avg_sq"), " has no 'exp_avg_sq'"),
    (lambda state: state.__setitem__("step", torch.tensor(-1.0)), r"\['step'\] is -1.0; a step count is a whole number"),
], ids=["wrong-shape", "key-missing", "negative-step"])
def test_state_written_wrong_is_named_by_the_step_before_anything_changes(write, problem):
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(1))
    write(optimizer.state[model[0].weight])
    x, y = batch(1)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"optimizer.state\[param_groups\[0\]\['params'\]\[0\]\]" + problem):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


def test_a_torch_checkpoint_with_an_empty_entry_loads_as_no_state():
    """Reading ``torch_optimizer.state[p]`` for a param never stepped leaves ``{}`` there, which
    its checkpoint keeps and torch's step treats as no state."""
    model, optimizer, twin, reference = _pair()
    twin[2].bias.requires_grad_(False)
    train(twin, reference, range(2))
    assert reference.state[twin[2].bias] == {}
    optimizer.load_state_dict(through_disk(reference.state_dict()))
    model.load_state_dict(twin.state_dict())
    twin[2].bias.requires_grad_(True)
    train(model, optimizer, range(2, 4))
    train(twin, reference, range(2, 4))
    assert_models_close(model, twin)
    torch.testing.assert_close(optimizer.state_dict()["state"], reference.state_dict()["state"])


def test_the_state_and_its_checkpoint_are_torchs_plain_dicts():
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(1))
    copied = pickle.loads(pickle.dumps(optimizer.state))
    assert type(copied) is collections.defaultdict and copied.default_factory is dict
    assert {type(values) for values in copied.values()} == {dict}
    assert type(copy.deepcopy(optimizer.state[model[0].weight])) is dict
    checkpoint = through_disk(optimizer.state_dict())  # weights_only=True
    assert {type(values) for values in checkpoint["state"].values()} == {dict}
    assert {type(values) for values in optimizer.state_dict()["state"].values()} == {dict}


# ---- groups changed by hand (Note [groups changed by hand]) ---------------------------------------

def _two_groups(model, make):
    return make([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 5e-3}], lr=1e-2)


def _append_the_last_layer_by_hand(o):
    model_params = o.param_groups[1]["params"]
    del o.param_groups[1]
    o.param_groups.append({**{k: v for k, v in o.defaults.items()}, "params": model_params, "lr": 2e-2})


def _clear_the_groups_and_add_them_again(o):
    groups = [{"params": g["params"], "lr": 1e-3} for g in o.param_groups]
    o.param_groups.clear()
    for group in groups:
        o.add_param_group(group)


def _move_a_param_to_the_first_group_by_hand(o):
    o.param_groups[0]["params"].append(o.param_groups[1]["params"].pop())


_GROUP_CHANGES = {
    "a param moved between groups' lists": _move_a_param_to_the_first_group_by_hand,
    "a group's params list replaced": lambda o: o.param_groups[1].__setitem__(
        "params", list(reversed(o.param_groups[1]["params"]))),
    "a group removed": lambda o: o.param_groups.pop(0),
    "a group removed, then appended by hand": _append_the_last_layer_by_hand,
    "the groups reversed": lambda o: o.param_groups.reverse(),
    "the groups cleared, then added again": _clear_the_groups_and_add_them_again,
}


@pytest.mark.parametrize("change", list(_GROUP_CHANGES))
def test_groups_changed_by_hand_are_what_the_next_steps_use(change):
    model, twin = model_and_twin()
    optimizer, reference = _two_groups(model, AdamW), _two_groups(twin, torch.optim.AdamW)
    train(model, optimizer, range(2))
    train(twin, reference, range(2))
    for o in (optimizer, reference):
        _GROUP_CHANGES[change](o)
    train(model, optimizer, range(2, 4))
    train(twin, reference, range(2, 4))
    assert_models_close(model, twin)
    # Not the state_dict: torch's raises KeyError for state of params no longer in a group.
    assert [{k: v for k, v in g.items() if k not in ("params", "eps_root")} for g in optimizer.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in reference.param_groups]
    torch.testing.assert_close([dict(optimizer.state[p]) for p in model.parameters()],
                               [reference.state[q] for q in twin.parameters()])


def test_a_bad_group_appended_by_hand_is_named_by_the_step_before_anything_changes():
    model, optimizer, _, _ = _pair()
    train(model, optimizer, range(1))
    before = snapshot(optimizer)
    bad = {**optimizer.param_groups[0], "params": [torch.zeros(3, dtype=torch.long)]}
    optimizer.param_groups.append(bad)
    groups = list(optimizer.param_groups)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is torch.int64"):
        optimizer.step()
    assert optimizer.param_groups == groups and optimizer.param_groups[1] is bad
    optimizer.param_groups.pop()
    assert_same(before, snapshot(optimizer))
