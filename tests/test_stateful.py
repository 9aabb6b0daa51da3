"""Ours against torch.optim.AdamW under random sequences of operations (hypothesis, derandomized).

Both optimizers own identical params of mixed shapes, dtypes and groups; every rule applies the
same operation to both, and after each one everything a user can read back is compared: params,
grads, every state entry, the groups and the state_dict. The budget is bounded so the suite stays
fast; ``HYPOTHESIS_PROFILE=soak`` runs many more examples, always the same ones, and
``HYPOTHESIS_PROFILE=explore`` as many new ones at each run (random seeds; run outside pytest, under
Dynamo's default recompile limit, which the suite raises, such runs found the ninth compiled
optimizer failing: Note [a step frame per optimizer]).
"""

from __future__ import annotations

import copy
import io
import os

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from compiled_adamw import AdamW, flat_bucket

from .configs import TOLERANCES
from .helpers import through_disk

settings.register_profile("ci", max_examples=200, stateful_step_count=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", max_examples=300, stateful_step_count=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=300, stateful_step_count=40, derandomize=False, database=None,
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (shape, dtype, group): 0-dim, empty, channels-last, complex and float64 params across groups.
PARAMS = [((3, 4), torch.float32, 0), ((), torch.float32, 0), ((2, 3, 2, 2), torch.float32, 0),
          ((5,), torch.complex64, 1), ((0,), torch.float32, 1), ((2, 3), torch.float64, 1)]
ADDED = [((4, 2), torch.float32), ((3,), torch.float64)]  # the group add_param_group brings mid-run
KEYS = st.sampled_from(["lr", "weight_decay", "eps", "betas"])
COPIES = st.sampled_from(["deepcopy", "torch.save"])
STATE_RESETS = st.sampled_from(["clear", "delete", "empty"])
ENTRY_WRITES = st.sampled_from(["step in place", "step", "exp_avg", "exp_avg_sq in place"])
SIDES = ("ours", "torch")
# Note [where memory lives]: as shipped, every param here is small, so they are gathered into one
# chunk; with tiny chunks the params of 8 real elements or more get calls of their own (grads read
# in place, or through temporaries where strides differ) and the small ones split across chunks.
LAYOUTS = {"as shipped": {}, "tiny chunks": {"DIRECT_ELEMENTS": 8, "CHUNK_ELEMENTS": 32}}


def _tensor(shape, dtype, generator):
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=generator, dtype=torch.float64))
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _plain(value):
    """A group value as a number (a tensor hyperparameter compares by value)."""
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, torch.Tensor) else value


def _comparable_group(group: dict, ignored: tuple[str, ...]) -> dict:
    return {k: _plain(v) for k, v in group.items() if k not in ("params", "eps_root", *ignored)}


def _unless_fresh(state: dict) -> dict:
    """A param's state, or {} where it is what a first step starts from (step 0, zero moments): a
    step that a GradScaler skips makes such state on ours, as on torch's fused AdamW (both are
    stepped and skip inside, Note [AMP inside the step]), and none on torch's for-loop AdamW,
    which is not stepped."""
    fresh = float(state.get("step", 0)) == 0 and all(
        not value.any() for key, value in state.items() if key != "step")
    return {} if fresh else state


def _assert_close(mine, theirs, what: str) -> None:
    """NaN where torch has NaN: eps=0 with a zero grad on fresh state divides 0 by 0 in both."""
    real = mine.dtype.to_real() if mine.dtype.is_complex else mine.dtype
    torch.testing.assert_close(mine, theirs, **TOLERANCES[real]["torch"], equal_nan=True, msg=lambda m: f"{what}: {m}")


class OursAgainstTorch(RuleBasedStateMachine):
    differentiable = False
    keys_that_differ: tuple[str, ...] = ()  # group keys not compared

    @initialize(amsgrad=st.booleans(), seed=st.integers(0, 2**16), layout=st.sampled_from(sorted(LAYOUTS)))
    def build(self, amsgrad: bool, seed: int, layout: str) -> None:
        self.shipped = {name: getattr(flat_bucket, name) for name in LAYOUTS[layout]}
        for name, value in LAYOUTS[layout].items():
            setattr(flat_bucket, name, value)
        self.amsgrad = amsgrad
        self.generator = torch.Generator().manual_seed(seed)
        values = [_tensor(shape, dtype, self.generator) for shape, dtype, _ in PARAMS]
        self.params = {side: [self._param(v) for v in values] for side in SIDES}
        # Group 1's lr is a tensor of the user's (float64, so torch's for-loop reads it exactly).
        self.lr_tensors = {side: torch.tensor(3e-2, dtype=torch.float64) for side in SIDES}
        self.optimizers = {side: self._optimizer(side) for side in SIDES}
        self.schedulers = {side: torch.optim.lr_scheduler.ExponentialLR(self.optimizers[side], gamma=0.9)
                           for side in SIDES}
        self.scalers = {side: torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=2) for side in SIDES}
        self.added = False
        self.compiled_steps: dict[AdamW, object] = {}

    def teardown(self) -> None:
        for name, value in getattr(self, "shipped", {}).items():
            setattr(flat_bucket, name, value)

    def _groups(self, side: str) -> list[dict]:
        params = self.params[side]
        return [{"params": [p for p, (_, _, g) in zip(params, PARAMS) if g == 0]},
                {"params": [p for p, (_, _, g) in zip(params, PARAMS) if g == 1], "lr": self.lr_tensors[side],
                 "weight_decay": 0.1}]

    def _param(self, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.Parameter(values.clone())

    def _optimizer(self, side: str, groups: list[dict] | None = None):
        groups = self._groups(side) if groups is None else groups
        if side == "ours":
            return AdamW(groups, lr=1e-2, amsgrad=self.amsgrad, foreach=False, differentiable=self.differentiable)
        return torch.optim.AdamW(groups, lr=1e-2, amsgrad=self.amsgrad, foreach=False)

    # ---- operations ------------------------------------------------------------------------

    @rule(present=st.integers(0, 2 ** (len(PARAMS) + len(ADDED)) - 1),
          how=st.sampled_from(["eager", "compiled by the user", "closure"]), transposed=st.booleans())
    def step(self, present: int, how: str, transposed: bool = False) -> None:
        """A fresh grad for the params whose bit is set in ``present``; the others keep theirs.
        ``how``: ours steps through ``torch.compile(opt.step, fullgraph=True)`` (Note [a step
        alone with the params]), or both step with a closure that sets the grads and returns a
        loss, which ``step`` returns. ``transposed``: the grads of params of 2 dims or more have
        transposed strides (a layout of their own, which ``p.grad = ...`` accepts)."""
        grads = [_tensor(p.shape, p.dtype, self.generator) if present >> i & 1 else None
                 for i, p in enumerate(self.params["ours"])]
        grads = [g.mT.contiguous().mT if transposed and g is not None and g.dim() >= 2 else g for g in grads]
        losses = []
        for side in SIDES:
            params, optimizer = self.params[side], self.optimizers[side]

            def closure() -> torch.Tensor:
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g.clone()
                return torch.tensor(float(present))

            if how == "closure":
                losses.append(optimizer.step(closure))
                continue
            closure()
            # A compiled step cannot follow groups changed by hand (Note [groups changed by hand]).
            if side == "ours" and how == "compiled by the user" and optimizer._groups_as_built():
                if optimizer not in self.compiled_steps:
                    # A differentiable step runs outside the graph (Note [a differentiable step in
                    # a user's compile]), as torch's does: no fullgraph there.
                    self.compiled_steps[optimizer] = torch.compile(optimizer.step, fullgraph=not self.differentiable)
                self.compiled_steps[optimizer]()
            else:
                optimizer.step()
        assert all(torch.equal(loss, torch.tensor(float(present))) for loss in losses)

    @rule(present=st.integers(0, 2 ** (len(PARAMS) + len(ADDED)) - 1), overflow=st.booleans())
    def step_with_a_grad_scaler(self, present: int, overflow: bool) -> None:
        """``scaler.step(opt)`` (Note [AMP inside the step]: ours unscales and skips inside the
        step, torch's unscales the grads in place first), on fresh grads for the params whose bit
        is set, every grad multiplied by the scale as a scaled loss's backward would; ``overflow``
        puts an inf into the first float32 grad, and both skip the step. Afterwards every grad
        holds its unscaled values again on both sides. Complex params lose their grads first:
        torch's unscaling has no complex kernel (ours uses it too)."""
        fresh = [_tensor(p.shape, p.dtype, self.generator) if present >> i & 1 and not p.is_complex() else None
                 for i, p in enumerate(self.params["ours"])]
        for p in (p for side in SIDES for p in self.params[side] if p.is_complex()):
            p.grad = None
        if all(g is None and p.grad is None for p, g in zip(self.params["ours"], fresh)):
            return  # GradScaler refuses a step that checked no grad
        for side in SIDES:
            params, scaler = self.params[side], self.scalers[side]
            scaler.scale(torch.ones(()))  # makes the scale, as the first scaled loss would
            grads = [g.clone() if g is not None else None if p.grad is None else p.grad.clone()
                     for p, g in zip(params, fresh)]
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = scaler.scale(g)
            if overflow:
                first = next((p for p in params if p.grad is not None and p.dtype == torch.float32
                              and p.numel()), None)
                if first is not None:
                    first.grad[(0,) * first.grad.dim()] = float("inf")
            scaler.step(self.optimizers[side])
            scaler.update()
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g

    @rule(max_norm=st.floats(0.01, 2.0))
    def clip_then_step(self, max_norm: float) -> None:
        """Ours clips inside its step (Note [clipping inside the step]), torch's clip_grad_norm_
        scales the grads first; torch's grads then get their unclipped values back, which ours'
        keep."""
        ours, theirs = self.optimizers["ours"], self.optimizers["torch"]
        with_grads = [q for q in self.params["torch"] if q.grad is not None]
        unclipped = [q.grad.clone() for q in with_grads]
        norms = ours.clip_grad_norm_(max_norm), torch.nn.utils.clip_grad_norm_(with_grads, max_norm)
        ours.step()
        theirs.step()
        for q, grad in zip(with_grads, unclipped):
            q.grad.copy_(grad)
        torch.testing.assert_close(*norms)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none: bool) -> None:
        for side in SIDES:
            self.optimizers[side].zero_grad(set_to_none=set_to_none)

    @rule(group=st.integers(0, 1), key=KEYS, value=st.floats(0.0, 0.2))
    def assign_a_float(self, group: int, key: str, value: float) -> None:
        for side in SIDES:
            target = self.optimizers[side].param_groups[group]
            target[key] = (value * 4.5, float(_plain(target["betas"][1]))) if key == "betas" else value

    @rule(group=st.integers(0, 1), key=KEYS, value=st.floats(0.0, 0.2))
    def assign_a_tensor(self, group: int, key: str, value: float) -> None:
        """A hyperparameter replaced by a tensor of the user's (float64, which torch's for-loop
        reads exactly); betas become two tensors, as torch requires."""
        for side in SIDES:
            target = self.optimizers[side].param_groups[group]
            tensor = torch.tensor(value, dtype=torch.float64)
            target[key] = (tensor * 4.5, torch.tensor(_plain(target["betas"][1]), dtype=torch.float64)) \
                if key == "betas" else tensor

    @rule(group=st.integers(0, 1))
    def toggle_maximize(self, group: int) -> None:
        for side in SIDES:
            target = self.optimizers[side].param_groups[group]
            target["maximize"] = not target["maximize"]

    @rule(value=st.floats(0.0, 0.1))
    def change_the_users_lr_tensor_in_place(self, value: float) -> None:
        for side in SIDES:
            self.lr_tensors[side].fill_(value)

    @rule()
    def scheduler_step(self) -> None:
        for side in SIDES:
            self.schedulers[side].step()

    @rule(saved=st.booleans())
    def round_trip_into_the_same_optimizer(self, saved: bool) -> None:
        for side in SIDES:
            state_dict = self.optimizers[side].state_dict()
            self.optimizers[side].load_state_dict(through_disk(state_dict) if saved else state_dict)

    @rule()
    def round_trip_into_a_fresh_optimizer(self) -> None:
        for side in SIDES:
            old, scheduler = self.optimizers[side], self.schedulers[side]
            state_dict = through_disk(old.state_dict())
            groups = [{"params": g["params"]} for g in old.param_groups]
            fresh = self._optimizer(side, groups)
            fresh_scheduler = torch.optim.lr_scheduler.ExponentialLR(fresh, gamma=0.9)
            fresh_scheduler.load_state_dict(scheduler.state_dict())
            fresh.load_state_dict(state_dict)
            self.optimizers[side], self.schedulers[side] = fresh, fresh_scheduler

    @rule(how=COPIES)
    def continue_with_a_copy(self, how: str) -> None:
        """Params and optimizer copied together (``copy.deepcopy``, or ``torch.save`` and
        ``torch.load`` of both): the copies train from here, the originals are dropped."""
        for side in SIDES:
            together = (self.params[side], self.optimizers[side], self.lr_tensors[side])
            if how == "deepcopy":
                together = copy.deepcopy(together)
            else:
                buffer = io.BytesIO()
                torch.save(together, buffer)
                buffer.seek(0)
                together = torch.load(buffer, weights_only=False)
            scheduler = torch.optim.lr_scheduler.ExponentialLR(together[1], gamma=0.9)
            scheduler.load_state_dict(self.schedulers[side].state_dict())
            self.params[side], self.optimizers[side], self.lr_tensors[side] = together
            self.schedulers[side] = scheduler

    @rule(into_ours=st.booleans())
    def cross_load(self, into_ours: bool) -> None:
        source, target = ("torch", "ours") if into_ours else ("ours", "torch")
        state_dict = through_disk(self.optimizers[source].state_dict())
        self.optimizers[target].load_state_dict(state_dict)
        # The source reloads its own checkpoint too, so both sides hold the same (rounded) values.
        self.optimizers[source].load_state_dict(state_dict)
        for side in SIDES:  # a loaded tensor lr is the checkpoint's, no longer the user's
            group = self.optimizers[side].param_groups[1]
            if isinstance(group["lr"], torch.Tensor):
                self.lr_tensors[side] = group["lr"]

    @rule(present=st.integers(0, 2 ** (len(PARAMS) + len(ADDED)) - 1))
    def accumulate_grads(self, present: int) -> None:
        """A second backward before the step: fresh grads add to those there, in place."""
        grads = [_tensor(p.shape, p.dtype, self.generator) if present >> i & 1 else None
                 for i, p in enumerate(self.params["ours"])]
        for side in SIDES:
            for p, g in zip(self.params[side], grads):
                if g is not None:
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)

    @rule(factor=st.floats(0.25, 4.0))
    def scale_the_grads_in_place(self, factor: float) -> None:
        for side in SIDES:
            for p in self.params[side]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    @rule(index=st.integers(0, len(PARAMS) + len(ADDED) - 1), transposed=st.booleans())
    def re_point_a_param(self, index: int, transposed: bool) -> None:
        """``p.data = ...``, as ZeRO's buckets do: the param's values move to memory of someone
        else's, in the param's layout or with transposed strides."""
        for side in SIDES:
            params = self.params[side]
            if index < len(params):
                values = params[index].data
                params[index].data = values.mT.contiguous().mT if transposed and values.dim() >= 2 else values.clone()

    @rule()
    def write_the_params_in_place(self) -> None:
        """``model.load_state_dict``: new values copied into the params."""
        values = [_tensor(p.shape, p.dtype, self.generator) for p in self.params["ours"]]
        with torch.no_grad():
            for side in SIDES:
                for p, v in zip(self.params[side], values):
                    p.copy_(v)

    @rule(index=st.integers(0, len(PARAMS) + len(ADDED) - 1), reset=STATE_RESETS, then_step=st.booleans())
    def reset_the_state(self, index: int, reset: str, then_step: bool) -> None:
        """Note [state the user writes]: ``optimizer.state`` cleared, or param ``index``'s entry
        deleted or emptied: torch starts such params afresh."""
        self._write_the_state(index, reset, 0, then_step, only_with_state=False)

    @rule(index=st.integers(0, len(PARAMS) + len(ADDED) - 1), write=ENTRY_WRITES, count=st.integers(0, 5),
          then_step=st.booleans())
    def write_a_state_entry(self, index: int, write: str, count: int, then_step: bool) -> None:
        """Note [state the user writes]: a count or a moment replaced, or written in place (a
        rule of its own: drawn as one of seven kinds of write beside the resets, a count written
        in place and then stepped came up once in a CI run)."""
        self._write_the_state(index, write, count, then_step, only_with_state=True)

    def _write_the_state(self, index: int, write: str, count: int, then_step: bool, *, only_with_state: bool) -> None:
        """Writes into a param that has state on both sides where ``only_with_state`` (not fresh
        state on ours alone: _unless_fresh), the ``index``-th of them modulo their number: drawn
        among all params, most writes found none. ``then_step``: what was written is compared,
        and every param steps on a fresh grad (the step is one rule of 22, so a write was rarely
        followed by one)."""
        params = self.params["ours"]
        candidates = [i for i in range(len(params)) if not only_with_state or all(
            _unless_fresh(self.optimizers[side].state.get(self.params[side][i], {})) for side in SIDES)]
        if not candidates:
            return
        index = candidates[index % len(candidates)]
        value = _tensor(params[index].shape, params[index].dtype, self.generator)
        for side in SIDES:
            optimizer, p = self.optimizers[side], self.params[side][index]
            state = optimizer.state
            if write == "clear":
                state.clear()
            elif write == "delete":
                state.pop(p, None)
            elif write == "empty":
                state[p] = {}
            elif write == "step":
                state[p]["step"] = torch.tensor(float(count))
            elif write == "step in place":
                state[p]["step"].fill_(count)
            elif write == "exp_avg":
                state[p]["exp_avg"] = value.clone()
            else:
                state[p]["exp_avg_sq"].mul_(count)
        if then_step:
            self.everything_readable_agrees()
            self.step(present=2 ** len(params) - 1, how="eager")

    @rule(group=st.integers(0, 2))
    def move_a_group_to_the_end_by_hand(self, group: int) -> None:
        """Note [groups changed by hand]: a group taken out of ``param_groups`` and appended again
        as a plain dict."""
        for side in SIDES:
            groups = self.optimizers[side].param_groups
            if group < len(groups):
                groups.append(dict(groups.pop(group)))

    @rule(source=st.integers(0, 2), into=st.integers(0, 2))
    def move_a_param_between_groups_by_hand(self, source: int, into: int) -> None:
        """Note [groups changed by hand]: a param popped from one group's "params" list and
        appended to another's (or the same one's)."""
        for side in SIDES:
            groups = self.optimizers[side].param_groups
            if max(source, into) < len(groups) and groups[source]["params"]:
                groups[into]["params"].append(groups[source]["params"].pop())

    @precondition(lambda self: not self.added)
    @rule()
    def add_a_param_group(self) -> None:
        values = [_tensor(shape, dtype, self.generator) for shape, dtype in ADDED]
        for side in SIDES:
            new = [self._param(v) for v in values]
            self.params[side].extend(new)
            self.optimizers[side].add_param_group({"params": new, "lr": 5e-3})
        self.added = True

    # ---- what a user reads back --------------------------------------------------------------

    @invariant()
    def everything_readable_agrees(self) -> None:
        if not hasattr(self, "optimizers"):
            return
        ours, theirs = self.optimizers["ours"], self.optimizers["torch"]
        for i, (p, q) in enumerate(zip(self.params["ours"], self.params["torch"])):
            _assert_close(p.detach(), q.detach(), f"param {i}")
            assert (p.grad is None) == (q.grad is None), f"param {i}: grad None on one side only"
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), f"param {i}: grads differ"
            mine, their = _unless_fresh(ours.state.get(p, {})), _unless_fresh(theirs.state.get(q, {}))
            assert set(mine) == set(their), f"param {i}: state keys {set(mine)} vs {set(their)}"
            for key, value in their.items():
                if key == "step":
                    assert float(mine[key]) == float(value), f"param {i}: step"
                else:
                    _assert_close(mine[key], value, f"param {i} {key}")
        ignored = self.keys_that_differ
        assert [_comparable_group(g, ignored) for g in ours.param_groups] == \
            [_comparable_group(g, ignored) for g in theirs.param_groups]
        mine, their = ours.state_dict(), theirs.state_dict()
        assert [_comparable_group(g, ignored) for g in mine["param_groups"]] == \
            [_comparable_group(g, ignored) for g in their["param_groups"]]
        assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in their["param_groups"]]
        mine, their = ({index: _unless_fresh(values) for index, values in state_dict["state"].items()}
                       for state_dict in (mine, their))
        assert {i for i, values in mine.items() if values} == {i for i, values in their.items() if values}
        for index, values in their.items():
            assert mine.get(index, {}).keys() == values.keys(), f"state_dict state[{index}] keys"


class DifferentiableOursAgainstTorch(OursAgainstTorch):
    """The same operations with ours in differentiable mode (Note [differentiable runs]: state
    entries replaced at each step, step counts as views of one vector per run), against torch's
    for-loop AdamW: torch's differentiable path computes its bias corrections in float32, 1e-5
    off for beta2 = 0.999, so its plain path is the reference (as in
    ``test_differentiable_state_dict_round_trip_with_torch``). The params are plain tensors (a
    differentiable step refuses leaves that require grad); the hypergradients themselves are
    ``test_differentiable.py``'s."""

    differentiable = True
    keys_that_differ = ("differentiable",)

    def _param(self, values: torch.Tensor) -> torch.Tensor:
        return values.clone()

    def cross_load(self, into_ours: bool) -> None:
        """A checkpoint of ours says ``differentiable=True``, which torch's load then follows."""
        super().cross_load(into_ours)
        for group in self.optimizers["torch"].param_groups:
            group["differentiable"] = False

    cross_load = rule(into_ours=st.booleans())(cross_load)


settings_in_use = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
OursAgainstTorch.TestCase.settings = settings_in_use
DifferentiableOursAgainstTorch.TestCase.settings = settings_in_use
TestOursAgainstTorch = OursAgainstTorch.TestCase
TestDifferentiableOursAgainstTorch = DifferentiableOursAgainstTorch.TestCase
