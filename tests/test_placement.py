"""Where the step reads and writes memory (Note [where memory lives]), in the loop every tutorial
writes: ``zero_grad()`` (set_to_none=True), backward, step."""

from __future__ import annotations

import pytest
import torch

from compiled_adamw import AdamW
from compiled_adamw.flat_bucket import CHUNK_ELEMENTS, DIRECT_ELEMENTS

from .helpers import assert_models_close


def _model_with_a_large_weight() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3))
    twin.load_state_dict(model.state_dict())
    assert model[0].weight.numel() >= DIRECT_ELEMENTS > model[2].weight.numel()
    return model, twin


def _default_loop(model, optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 512, generator=generator), torch.randn(8, 3, generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_a_large_params_grad_is_read_where_autograd_put_it(monkeypatch):
    model, twin = _model_with_a_large_weight()
    optimizer, reference = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    copied: list[int] = []
    foreach_copy = torch._foreach_copy_

    def spy(targets, sources, *args, **kwargs):
        copied.extend(s.data_ptr() for s in sources)
        return foreach_copy(targets, sources, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    for step in range(3):
        _default_loop(model, optimizer, step)
        _default_loop(twin, reference, step)
        large, small = model[0].weight.grad, model[2].weight.grad
        assert large.data_ptr() not in copied, "the large grad was copied"
        assert small.data_ptr() in copied, "small grads are gathered"
        copied.clear()
    assert_models_close(model, twin)


def test_the_optimizer_holds_no_param_sized_grad_buffer_and_makes_state_at_the_first_step():
    model, _ = _model_with_a_large_weight()
    optimizer = AdamW(model.parameters())
    (bucket,) = optimizer._buckets[0]
    assert bucket.exp_avg is None and bucket.exp_avg_sq is None, "state memory before any step"
    _default_loop(model, optimizer, 0)
    assert bucket.exp_avg.numel() == bucket.exp_avg_sq.numel() == bucket.length
    small = sum(p.numel() for p in model.parameters() if p.numel() < DIRECT_ELEMENTS)
    assert bucket.scratch.numel() <= min(CHUNK_ELEMENTS, small + 16 * 4)
    many_small = AdamW([torch.nn.Parameter(torch.zeros(1024)) for _ in range(1000)])
    assert many_small._buckets[0][0].scratch.numel() <= CHUNK_ELEMENTS < 1000 * 1024


def test_zero_grad_leaves_none_and_a_param_without_a_grad_is_not_stepped():
    model, twin = _model_with_a_large_weight()
    optimizer, reference = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for m, o in ((model, optimizer), (twin, reference)):
        _default_loop(m, o, 0)
        o.zero_grad()
        assert all(p.grad is None for p in m.parameters())
        before = m[2].weight.detach().clone()
        torch.nn.functional.mse_loss(m[0](torch.ones(2, 512)).sum(1, keepdim=True), torch.zeros(2, 1)).backward()
        o.step()  # only the first layer has grads
        assert torch.equal(m[2].weight, before) and o.state[m[2].weight]["step"].item() == 1
        assert o.state[m[0].weight]["step"].item() == 2
    assert_models_close(model, twin)


@pytest.mark.parametrize("shapes, concatenated", [
    ([(16,), (32,), (0,), (48, 2), (5,)], False),  # a 2-D param among 1-D ones
    ([(16,), (32,), (0,), (5,)], True),  # padding only after the last
    ([(5,), (16,)], False),  # padding between segments
    ([(16, 3), (32, 3), (1, 3)], True),  # shapes that differ in the first dim only
    ([(2, 3), (2, 4)], False),
    ([(), (16,)], False),
], ids=["mixed-dims", "unpadded-1d", "padded-1d", "same-trailing-dims", "other-trailing-dims", "0-dim"])
def test_small_grads_that_lie_end_to_end_are_gathered_by_one_cat(shapes, concatenated):
    """Note [one cat per chunk]; the grads are strided views, which cat and foreach copies both read."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    ours_params, torch_params = ([torch.nn.Parameter(v.clone()) for v in values] for _ in range(2))
    optimizer, reference = AdamW(ours_params, lr=1e-2), torch.optim.AdamW(torch_params, lr=1e-2)
    for step in range(3):
        grads = [torch.randn(*shape[:-1], 2 * shape[-1], generator=generator)[..., ::2] if shape else
                 torch.randn((), generator=generator) for shape in shapes]
        for params, o in ((ours_params, optimizer), (torch_params, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone() if g.dim() == 0 else g
            o.step()
    (call,) = optimizer._buckets[0][0]._calls(0, len(shapes), frozenset(), frozenset())
    assert (call.gather.func is torch.cat) == concatenated
    torch.testing.assert_close(ours_params, torch_params)
