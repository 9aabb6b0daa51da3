"""The one-call check that a step finds params and grads as the last step left them (Note [a step
that looks once] in ``compiled_adamw/metadata_check.py``)."""

from __future__ import annotations

import weakref

import pytest
import torch

from compiled_adamw import AdamW, flat_bucket, metadata_check
from compiled_adamw.metadata_check import unchanged_check

from .helpers import model_and_twin, train

_CHANGES = {
    "reshaped in place": lambda t: t.data.reshape(-1),
    "another dtype": lambda t: t.data.double(),
    "sparse": lambda t: t.data.to_sparse(),
    "requires grad": lambda t: t.data.requires_grad_(),
    "a subclass": lambda t: torch.nn.Parameter(t.data, requires_grad=False),
    "transposed": lambda t: t.data.t(),
}


@pytest.mark.parametrize("change", _CHANGES)
def test_each_kind_of_change_is_seen(change):
    tensors = [torch.randn(3, 3), torch.randn(3, 3)]
    check = unchanged_check(tensors, strides_matter=[True, True])
    assert check(*tensors) and check(torch.randn(3, 3), torch.zeros(3, 3))
    assert not check(tensors[0], _CHANGES[change](tensors[1]))


def test_strides_are_compared_only_where_they_matter():
    tensors = [torch.randn(3, 3), torch.randn(3, 3)]
    check = unchanged_check(tensors, strides_matter=[True, False])
    assert check(tensors[0], tensors[1].t()), "a grad of other strides still fits"
    assert not check(tensors[0].t(), tensors[1])


def _steps_looking_closer(monkeypatch, optimizer, model, steps):
    looked = []
    original = flat_bucket.FlatBucket._find_away
    monkeypatch.setattr(flat_bucket.FlatBucket, "_find_away",
                        lambda self, *args: looked.append(1) or original(self, *args))
    train(model, optimizer, steps)
    return len(looked)


def test_a_steady_loop_looks_closer_only_at_its_first_step(monkeypatch):
    """Fresh grads each step (the default loop) and nothing moved: one C check per step."""
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2, compile=False)
    assert _steps_looking_closer(monkeypatch, optimizer, model, range(5)) == 1
    next(model.parameters()).data = next(model.parameters()).data.clone()
    assert _steps_looking_closer(monkeypatch, optimizer, model, range(5, 8)) == 1, "a move is seen once"


def test_without_dynamos_tensor_guards_every_step_looks_closer_and_steps_as_torch(monkeypatch):
    monkeypatch.setattr(metadata_check, "TensorGuards", None)
    model, twin = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2, compile=False)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    assert _steps_looking_closer(monkeypatch, optimizer, model, range(4)) == 4
    train(twin, reference, range(4))
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()))


def test_what_a_step_remembers_keeps_no_grad_alive():
    """The check holds metadata, not tensors: a grad set to None by ``zero_grad`` is freed (a
    remembered grad would be a param-sized buffer the optimizer holds)."""
    model, _ = model_and_twin()
    optimizer = AdamW(model.parameters(), lr=1e-2, compile=False)
    train(model, optimizer, range(1))  # a first step looks closer, and remembers what it found
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad()
    assert all(grad() is None for grad in grads)
