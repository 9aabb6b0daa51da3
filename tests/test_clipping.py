"""``AdamW.clip_grad_norm_``: torch's clip_grad_norm_ contract, with the clipping done inside the
next step's elementwise pass (Note [clipping inside the step]): the numbers of
``torch.nn.utils.clip_grad_norm_`` + torch.optim.AdamW, no write to the grads, no host sync."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiled_adamw import AdamW

from .helpers import assert_models_close, batch, counting_host_reads, inductor_noting_our_ops, model_and_twin


def _clipped_steps(model, optimizer, steps: range, max_norm: float, norm_type: float, *, ours: bool) -> list:
    norms = []
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if ours:
            norms.append(optimizer.clip_grad_norm_(max_norm, norm_type))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type))
        optimizer.step()
    return norms


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clips", "does-not-clip"])
def test_clipped_steps_match_torchs_clip_grad_norm_and_adamw(max_norm, norm_type):
    model, twin = model_and_twin()
    optimizer, reference = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    norms = _clipped_steps(model, optimizer, range(6), max_norm, norm_type, ours=True)
    reference_norms = _clipped_steps(twin, reference, range(6), max_norm, norm_type, ours=False)
    torch.testing.assert_close(norms, reference_norms, rtol=1e-5, atol=0)
    assert all(n > max_norm for n in norms) == (max_norm == 0.05), "the case does not test what it says"
    assert_models_close(model, twin)


def _backward(model, optimizer, step: int) -> None:
    x, y = batch(step)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_the_grads_keep_their_values_and_a_clip_counts_once_and_only_for_its_grads():
    model, twin = model_and_twin()
    optimizer, reference = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    _clipped_steps(model, optimizer, range(3), 0.05, 2.0, ours=True)
    _clipped_steps(twin, reference, range(3), 0.05, 2.0, ours=False)
    grads = [(p.grad, p.grad._version, p.grad.clone()) for p in model.parameters()]
    assert optimizer.clip_grad_norm_(0.05) > 0.05  # what the last step clipped
    for p, (grad, version, values) in zip(model.parameters(), grads):
        assert p.grad is grad and p.grad._version == version and torch.equal(p.grad, values)
    # A step after the next backward uses no clip; nor does one after a clip dropped by zero_grad.
    optimizer.zero_grad()
    for step in (3, 4):
        for m, o in ((model, optimizer), (twin, reference)):
            if o is optimizer and step == 4:
                _backward(m, o, step)
                o.clip_grad_norm_(1e-3)
            _backward(m, o, step)
            o.step()
    assert_models_close(model, twin)


def test_a_copy_made_between_clip_and_step_clips_as_the_original():
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _clipped_steps(model, optimizer, range(2), 0.05, 2.0, ours=True)
    x, y = batch(2)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.clip_grad_norm_(0.05)
    twin, copied = copy.deepcopy((model, optimizer))
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()  # deepcopy leaves a Parameter's grad behind
    for o in (optimizer, copied):
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), "the copy stepped differently from the original"


def test_a_nonfinite_norm_raises_only_when_asked():
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    assert torch.isnan(optimizer.clip_grad_norm_(1.0))
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_clipping_and_stepping_read_nothing_on_the_host():
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    _clipped_steps(model, optimizer, range(2), 0.05, 2.0, ours=True)  # compiles
    x, y = batch(2)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with counting_host_reads() as reads:
        optimizer.clip_grad_norm_(0.05)
        optimizer.step()
    assert reads == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unscale_clip_step_with_a_grad_scaler_and_an_overflow_matches_torch(dtype):
    """Hugging Face's and Lightning's order: unscale, clip (the norm of the unscaled grads), step."""
    model, twin = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(6):
        for m, o, scaler in ((model, optimizer, scalers[0]), (twin, reference, scalers[1])):
            x, y = batch(step)
            o.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = torch.nn.functional.mse_loss(m(x), y)
            scaler.scale(loss).backward()
            if step == 2:
                m[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(o)
            if o is optimizer:
                norm = o.clip_grad_norm_(0.05)
            else:
                reference_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(o)
            scaler.update()
        if step != 2:
            torch.testing.assert_close(norm, reference_norm, rtol=1e-5, atol=0)
            assert norm > 0.05
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    assert_models_close(model, twin)


_OPS_OF = {"in-users-function": {"compiled_adamw.grad_norm", "compiled_adamw.step_alone"},
           "in-a-function-that-also-reads-the-grads": {"compiled_adamw.step"},
           "eagerly-before-the-step-compiled-alone": {"compiled_adamw.step_alone"}}


@pytest.mark.parametrize("clipped_where", _OPS_OF)
def test_clip_and_step_inside_a_users_fullgraph_compile(clipped_where):
    """The coefficient reaches the step as a graph input either way: computed in the user's graph,
    or pending from an eager ``clip_grad_norm_`` when ``torch.compile(opt.step)`` runs. Where the
    rest of the graph touches no grad, the norm is an op that reads the grads where they are, as
    the step does (Note [a step alone with the params]); where it does, both are traced with the
    grads as inputs."""
    model, twin = model_and_twin()
    optimizer, reference = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    grad_sum = torch.zeros(())

    def clip_then_step():
        norm = optimizer.clip_grad_norm_(0.05)
        if clipped_where == "in-a-function-that-also-reads-the-grads":
            grad_sum.copy_(model[0].weight.grad.sum())
        optimizer.step()
        return norm

    ops = []
    backend = inductor_noting_our_ops(ops)
    compiled_step = torch.compile(optimizer.step, fullgraph=True, backend=backend)

    def clip_eagerly_then_step_compiled():
        norm = optimizer.clip_grad_norm_(0.05)
        compiled_step()
        return norm

    clipped_step = (clip_eagerly_then_step_compiled if clipped_where == "eagerly-before-the-step-compiled-alone"
                    else torch.compile(clip_then_step, fullgraph=True, backend=backend))
    for step in range(3):
        x, y = batch(step)
        for m, o in ((model, optimizer), (twin, reference)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        norm = clipped_step()
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05), rtol=1e-5, atol=0)
        reference.step()
    assert_models_close(model, twin)
    assert set(ops) == _OPS_OF[clipped_where], ops


def test_a_nonfinite_norm_raises_inside_a_users_compile_before_the_step():
    """The norm's op checks it when the graph runs (``error_if_nonfinite``, Note [a step alone with
    the params]), before the step could write anything."""
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2)

    def clip_then_step():
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
        optimizer.step()

    compiled = torch.compile(clip_then_step, fullgraph=True)
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    compiled()
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled()
    torch.testing.assert_close([p.detach() for p in model.parameters()], before, rtol=0, atol=0)
