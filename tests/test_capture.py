"""CUDA graph capture: the guard on any machine; capture/replay and reduce-overhead on CUDA."""

from __future__ import annotations

import pytest
import torch

from compiled_adamw import AdamW
from compiled_adamw.capture import CapturedIteration, CaptureError, check_capturable

from .helpers import batch, model_and_twin

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _stepped(device: str = "cpu", **kwargs) -> tuple[torch.nn.Module, AdamW]:
    model, _ = model_and_twin()
    model.to(device)
    optimizer = AdamW(model.parameters(), lr=1e-2, compile=device != "meta", **kwargs)
    x, y = (t.to(device) for t in batch(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    return model, optimizer


def test_a_stepped_optimizer_with_grads_passes():
    _, optimizer = _stepped()
    check_capturable(optimizer, device_type="cpu")


def test_a_float_in_a_group_is_already_on_the_device():
    """Note [floats between replays]: the assignment writes the device vector a replay reads."""
    _, optimizer = _stepped()
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.param_groups[0]["betas"] = (0.8, optimizer.param_groups[0]["betas"][1])
    check_capturable(optimizer, device_type="cpu")
    assert optimizer._settings[0].vector[:2].tolist() == [0.5, 0.8]


def test_a_param_without_grad_is_named():
    model, optimizer = _stepped()
    model[2].bias.grad = None
    with pytest.raises(CaptureError, match=r"param_groups\[0\]\['params'\]\[3\] has no grad"):
        check_capturable(optimizer, device_type="cpu")


def test_state_on_the_wrong_device_is_named():
    _, optimizer = _stepped(device="meta")
    group = optimizer.param_groups[0]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: eps is a tensor on cpu, but the group's params are on meta"):
        group["eps"] = torch.tensor(1e-6)
    first = group["params"][0]
    optimizer.state[first]["step"] = torch.tensor(3.0)  # a host step, put there by hand
    with pytest.raises(CaptureError, match=r"state of param_groups\[0\]\['params'\]\[0\]: 'step' is a tensor on cpu"):
        check_capturable(optimizer, device_type="meta")


def test_params_off_the_capture_device_and_differentiable_are_named():
    _, optimizer = _stepped()
    with pytest.raises(CaptureError, match=r"param_groups\[0\]\['params'\]\[0\] is on cpu, not on cuda"):
        check_capturable(optimizer)
    params = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    differentiable = AdamW(params, differentiable=True)
    with pytest.raises(CaptureError, match="differentiable=True"):
        check_capturable(differentiable, device_type="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_capture_without_cuda_says_so():
    _, optimizer = _stepped()
    with pytest.raises(CaptureError, match="needs a CUDA device"):
        CapturedIteration(optimizer, lambda: None)


# ---- on CUDA -----------------------------------------------------------------------------------

CAPTURE_CONFIGS = {
    "default": dict(),
    "amsgrad": dict(amsgrad=True),
    "bfloat16": dict(dtype=torch.bfloat16),
    "several-groups": dict(groups=True),
}


def _cuda_model(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    model, twin = model_and_twin()
    return model.to("cuda", dtype), twin.to("cuda", dtype)


def _optimizer(model: torch.nn.Module, config: dict) -> AdamW:
    options = dict(lr=torch.tensor(1e-2, device="cuda"), amsgrad=config.get("amsgrad", False))
    if config.get("groups"):
        first, *rest = model.parameters()
        return AdamW([{"params": [first], "weight_decay": 0.1}, {"params": rest}], **options)
    return AdamW(model.parameters(), **options)


@needs_cuda
@pytest.mark.parametrize("name", list(CAPTURE_CONFIGS))
def test_replay_equals_eager_with_lr_changing_every_step(name):
    """Forward, backward (grads produced inside the graph) and step captured together; 24 replays
    with OneCycleLR changing lr (and beta1) between them."""
    config = CAPTURE_CONFIGS[name]
    dtype = config.get("dtype", torch.float32)
    model, twin = _cuda_model(dtype)
    captured_optimizer, eager_optimizer = _optimizer(model, config), _optimizer(twin, config)
    static_x, static_y = (t.to("cuda", dtype) for t in batch(0))

    def iteration(m=model, o=captured_optimizer):
        o.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(static_x), static_y)
        loss.backward()
        o.step()
        return loss

    captured = CapturedIteration(captured_optimizer, iteration, warmup=3)
    for _ in range(3):  # the same warm-up steps, eagerly
        iteration(twin, eager_optimizer)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=40)
                  for o in (captured_optimizer, eager_optimizer)]
    for step in range(24):
        x, y = (t.to("cuda", dtype) for t in batch(step + 1))
        static_x.copy_(x)
        static_y.copy_(y)
        captured()
        iteration(twin, eager_optimizer)
        for scheduler in schedulers:
            scheduler.step()
    torch.cuda.synchronize()
    tolerance = dict(rtol=2**-6, atol=2**-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **tolerance)
        for key, value in eager_optimizer.state[q].items():
            torch.testing.assert_close(captured_optimizer.state[p][key], value, **tolerance)


@needs_cuda
def test_a_float_assigned_between_replays_takes_effect():
    model, twin = _cuda_model(torch.float32)
    optimizer, reference = _optimizer(model, {}), _optimizer(twin, {})
    static_x, static_y = (t.to("cuda") for t in batch(0))

    def iteration(m=model, o=optimizer):
        o.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(m(static_x), static_y).backward()
        o.step()

    captured = CapturedIteration(optimizer, iteration)
    for _ in range(3):
        iteration(twin, reference)
    for lr in (0.05, 0.001, 0.02):
        for o in (optimizer, reference):
            o.param_groups[0]["lr"] = lr
        captured()
        iteration(twin, reference)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_reduce_overhead_runs_under_cuda_graphs_without_skips_or_rerecording():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    model, _ = _cuda_model(torch.float32)
    optimizer = _optimizer(model, {})
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-2, total_steps=30)

    @torch.compile(mode="reduce-overhead")
    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    counters.clear()
    for step in range(12):
        x, y = (t.to("cuda") for t in batch(step))
        train_step(x, y)
        scheduler.step()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    rerecords = {function: n for per_node in manager.num_rerecord.values() for function, n in per_node.items()}
    assert sum(rerecords.values()) == 0, f"re-recorded after warm-up: {rerecords}"
