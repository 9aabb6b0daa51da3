"""torch.amp.GradScaler without a host sync (Note [AMP inside the step]): the grads are unscaled
and an overflowing step is skipped inside the step, and the numbers are torch fused AdamW's."""

from __future__ import annotations

import pytest
import torch

from compiled_adamw import AdamW

from .helpers import assert_models_close, batch, counting_host_reads, model_and_twin


def _scaled_steps(model, optimizer, scaler, dtype, steps: range, *, clip: bool, overflow_at: int) -> None:
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("clip", [False, True], ids=["in-step-unscale", "unscale-clip-step"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_steps_with_an_overflow_match_torch_fused(dtype, clip):
    model, twin = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for m, o, scaler in ((model, optimizer, scalers[0]), (twin, reference, scalers[1])):
        _scaled_steps(m, o, scaler, dtype, range(6), clip=clip, overflow_at=2)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9, "one overflow halves the scale"
    for p, q in zip(model.parameters(), twin.parameters()):
        assert optimizer.state[p]["step"].item() == reference.state[q]["step"].item() == 5, "the skipped step"
    assert_models_close(model, twin)


def test_a_skipped_step_leaves_params_and_state_exactly_as_they_were():
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    _scaled_steps(model, optimizer, scaler, torch.bfloat16, range(2), clip=False, overflow_at=-1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    _scaled_steps(model, optimizer, scaler, torch.bfloat16, range(2, 3), clip=False, overflow_at=2)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, state[name][key]), (name, key)


@pytest.mark.parametrize("make, expected", [
    (lambda params: AdamW(params, lr=1e-2), "none"),
    (lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False), "some"),
], ids=["ours", "torch-forloop (the counter works)"])
def test_scaler_step_reads_nothing_on_the_host(make, expected):
    model, _ = model_and_twin()
    optimizer = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    _scaled_steps(model, optimizer, scaler, torch.bfloat16, range(2), clip=False, overflow_at=-1)  # compiles
    x, y = batch(2)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    with counting_host_reads() as reads:
        scaler.step(optimizer)
    assert (reads == []) == (expected == "none"), reads


def test_scaler_step_inside_a_users_compile_matches_torch_fused():
    """``scaler.step(opt)`` compiled by the user: the scaler's values reach our step as graph
    inputs (Note [one opaque step in a user's trace]), an overflowing step is skipped."""
    finals = []
    for make in (lambda params: AdamW(params, lr=1e-2), lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True)):
        model, _ = model_and_twin()
        optimizer = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        step = torch.compile(scaler.step) if isinstance(optimizer, AdamW) else scaler.step
        for index in range(6):
            x, y = batch(index)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if index == 2:
                model[0].weight.grad[0, 0] = float("inf")
            step(optimizer)
            scaler.update()
        assert scaler.get_scale() == 2.0**9
        finals.append([p.detach() for p in model.parameters()])
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


def test_one_scaler_for_two_optimizers_one_of_which_has_no_grads_matches_torch_fused():
    """A GradScaler hands an optimizer none of whose params has a grad found_inf as the int 0
    (a sum of no tensors); torch's fused AdamW steps nothing then, and so does ours."""
    model, twin = model_and_twin()
    frozen = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    sides = [(model, AdamW(model.parameters(), lr=1e-2), AdamW(frozen[:1])),
             (twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True), torch.optim.AdamW(frozen[1:], fused=True))]
    for m, trained, idle in sides:
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        for step in range(3):
            x, y = batch(step)
            trained.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            scaler.step(trained)
            scaler.step(idle)
            scaler.update()
        assert not idle.state
    assert_models_close(model, twin)
