"""Flat storage: the params of one group that share a device and dtype, with their AdamW state.

Note [flat buffers]: the step is one elementwise kernel per bucket over a few flat tensors (param,
grad, exp_avg, exp_avg_sq, and max_exp_avg_sq for amsgrad) whose length is symbolic in the
compiled graph, so compile time does not depend on how many params a group has and small tensors
cost no per-tensor launch. To get there:

* each param is re-pointed into ``flat_param`` (``p.data = view``): it stays the same
  ``Parameter`` object with the same shape and strides, and ``model.load_state_dict`` (which copies
  in place) keeps working. If something re-points a param elsewhere (``model.to(...)``,
  ``load_state_dict(assign=True)``), the next step notices and adopts its new values.
* each grad is expected at its view of ``flat_grad``. A grad found elsewhere (autograd allocates a
  fresh one after ``zero_grad(set_to_none=True)``) is copied there once and ``p.grad`` is re-pointed
  to that view, so that further backward passes accumulate in place. ``zero_grad(set_to_none=False)``
  keeps every grad in place: the zero-copy path.
* the state of param ``i`` (``exp_avg``, ..., ``step``) is a view into the flat state buffers; those
  views are what ``optimizer.state`` and ``state_dict()`` hold, in torch.optim.AdamW's format.
* segments start at multiples of ``ALIGNMENT`` elements, so every kernel sees aligned, non-empty
  slices (a length of 0 or 1 would make Dynamo specialize and recompile).

Note [step cohorts]: torch keeps one step count per param, and a param whose grad is None is not
stepped. The elementwise kernel uses one step count for a contiguous run of params, which is right
only if their counts are equal. The host knows when they are: params that have always been stepped
together share a *cohort* id. A step runs the kernel once per maximal run of params that have a
grad and share a cohort; the stepped ones then move to a fresh cohort. When every param has a grad
(the usual case) there is one run per bucket. Cohorts are rebuilt from the step values when state
is loaded; writing to ``state[p]["step"]`` by hand is not supported.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, MutableMapping, NamedTuple

import torch
from torch import Tensor


__all__ = ["ALIGNMENT", "FlatBucket", "StepPlan", "bucket_key", "check_grad", "group_into_buckets"]

ALIGNMENT = 16
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def bucket_key(param: Tensor) -> tuple[torch.device, torch.dtype]:
    return param.device, param.dtype


def check_grad(name: str, grad: Tensor, device: torch.device, dtype: torch.dtype, shape: torch.Size) -> None:
    """RuntimeError naming param ``name`` unless ``grad`` fits a param of this device, dtype and shape."""
    if grad.layout != torch.strided:
        raise RuntimeError(f"{name} has a sparse grad ({grad.layout}); AdamW does not support sparse gradients")
    if (grad.device, grad.dtype, grad.shape) != (device, dtype, shape):
        raise RuntimeError(f"{name}: its grad is {grad.dtype} {tuple(grad.shape)} on {grad.device}, but the "
                           f"param is {dtype} {tuple(shape)} on {device}")


def _static(buffer: Tensor) -> Tensor:
    """Note [static buffers]: the buffers live as long as the optimizer and never move. Marking them
    so tells a user's ``torch.compile(mode="reduce-overhead")`` that the step's in-place writes go
    to fixed addresses, which CUDA graphs (cudagraph trees) need in order not to skip the graph.
    Our own kernels receive base-less aliases (Note [inputs without a view base]), unmarked."""
    torch._dynamo.mark_static_address(buffer)
    return buffer


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StepPlan(NamedTuple):
    """What one step of a bucket will do, decided (and validated) before anything is mutated."""

    runs: list[tuple[int, int]]  # [first, last) param indices, each run sharing one step count
    present: list[bool]  # which params have a grad
    grads_to_copy: list[tuple[int, Tensor]]  # grads that are not at their view of flat_grad
    params_to_relink: list[int]  # params that were re-pointed away from flat_param


class FlatBucket:
    """Params of one (group, device, dtype) and their state in flat, aligned buffers."""

    def __init__(self, params: list[Tensor], positions: list[int], *, amsgrad: bool):
        self.params = params
        self.positions = positions  # index of each param in its group's "params"
        self.device, self.dtype = bucket_key(params[0])
        self.real_dtype = self.dtype.to_real() if self.dtype.is_complex else self.dtype
        real_per_element = 2 if self.dtype.is_complex else 1
        self.layouts = [(p.shape, torch.empty_like(p, device="meta").stride()) for p in params]
        self.starts, self.ends, self.padded_ends = [], [], []
        offset = 0
        for p in params:
            size = p.numel() * real_per_element
            self.starts.append(offset)
            self.ends.append(offset + size)
            offset += _round_up(size, ALIGNMENT)
            self.padded_ends.append(offset)
        self.length = offset
        self.flat_param = self._zeros()
        self.flat_grad = self._zeros()
        self.exp_avg = self._zeros()
        self.exp_avg_sq = self._zeros()
        self.max_exp_avg_sq = self._zeros() if amsgrad else None
        self.steps = _static(torch.zeros(len(params), dtype=torch.float32, device=self.device))
        self.cohorts = [0] * len(params)
        self.has_state = [False] * len(params)
        self.grad_views = [self.view(self.flat_grad, i) for i in range(len(params))]
        self.grad_ptrs = [g.data_ptr() for g in self.grad_views]
        self.param_ptrs = [0] * len(params)
        with torch.no_grad():
            for i in range(len(params)):
                self._link_param(i)

    def _zeros(self) -> Tensor:
        return _static(torch.zeros(self.length, dtype=self.real_dtype, device=self.device))

    def view(self, buffer: Tensor, i: int) -> Tensor:
        """Param ``i``'s segment of ``buffer``, with the param's dtype, shape and strides."""
        segment = buffer[self.starts[i] : self.ends[i]]
        if self.dtype.is_complex:
            segment = segment.view(self.dtype)
        shape, stride = self.layouts[i]
        return segment.as_strided(shape, stride)

    def _link_param(self, i: int) -> None:
        param, view = self.params[i], self.view(self.flat_param, i)
        view.copy_(param.detach())
        param.data = view
        self.param_ptrs[i] = param.data_ptr()

    # ---- state ------------------------------------------------------------------------------

    def state_views(self, i: int) -> dict[str, Tensor]:
        """Param ``i``'s state in torch.optim.AdamW's format, as live views of the flat buffers."""
        state = {"step": self.steps[i]}
        for key in STATE_KEYS:
            buffer = getattr(self, key)
            if buffer is not None:
                state[key] = self.view(buffer, i)
        return state

    def set_amsgrad(self, amsgrad: bool) -> None:
        if amsgrad and self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = self._zeros()
        elif not amsgrad:
            self.max_exp_avg_sq = None

    def load_state(self, loaded: Mapping[Tensor, Mapping[str, Tensor]],
                   state: MutableMapping[Tensor, dict]) -> None:
        """Copy validated ``loaded[param]`` tensors into the buffers; ``state`` gets the views."""
        for i, param in enumerate(self.params):
            values = loaded.get(param)
            self.has_state[i] = values is not None
            for key in ("step", *STATE_KEYS):
                buffer = self.steps[i] if key == "step" else getattr(self, key)
                if buffer is None:
                    continue
                target = buffer if key == "step" else self.view(buffer, i)
                if values is not None and key in values:
                    target.copy_(values[key])
                else:
                    target.zero_()
            if values is not None:
                state[param] = self.state_views(i)
            else:
                state.pop(param, None)
        cohort_of_step: dict[float, int] = {}
        self.cohorts = [cohort_of_step.setdefault(s, len(cohort_of_step)) for s in self.steps.tolist()]

    # ---- one step -----------------------------------------------------------------------------

    def plan(self, where: Callable[[int], str], *, tracing: bool) -> StepPlan:
        """Inspect params and grads and decide the step; raises before anything is mutated."""
        grads = [p.grad for p in self.params]
        present = [g is not None for g in grads]
        grads_to_copy, params_to_relink = [], []
        if tracing:
            # Pointers cannot be read while tracing: copy every grad (a no-op copy where it is
            # already in place) and trust the links made when the params were adopted.
            grads_to_copy = [(i, g) for i, g in enumerate(grads) if g is not None]
        elif not self._all_in_place(grads, present):
            for i, (param, grad) in enumerate(zip(self.params, grads)):
                if param.data_ptr() != self.param_ptrs[i]:
                    self._check_relink(i, where)
                    params_to_relink.append(i)
                if grad is not None and (grad.layout != torch.strided
                                         or grad.data_ptr() != self.grad_ptrs[i]):
                    self._check_grad(i, grad, where)
                    grads_to_copy.append((i, grad))
        return StepPlan(self._runs(present), present, grads_to_copy, params_to_relink)

    def _all_in_place(self, grads: list[Tensor | None], present: list[bool]) -> bool:
        """The common case, checked at C speed: every param linked, every grad at its view.

        A grad without a data pointer (sparse) raises here and is diagnosed by the slow path."""
        try:
            if list(map(Tensor.data_ptr, self.params)) != self.param_ptrs:
                return False
            if all(present):
                return list(map(Tensor.data_ptr, grads)) == self.grad_ptrs
            return all(g is None or g.data_ptr() == ptr for g, ptr in zip(grads, self.grad_ptrs))
        except RuntimeError:
            return False

    def _check_relink(self, i: int, where: Callable[[int], str]) -> None:
        param = self.params[i]
        if (param.device, param.dtype, param.shape) != (self.device, self.dtype, self.layouts[i][0]):
            raise RuntimeError(
                f"{where(self.positions[i])} changed from {self.dtype} {tuple(self.layouts[i][0])} on "
                f"{self.device} to {param.dtype} {tuple(param.shape)} on {param.device} after it was "
                "given to the optimizer; create the optimizer after moving or casting the model"
            )

    def _check_grad(self, i: int, grad: Tensor, where: Callable[[int], str]) -> None:
        check_grad(where(self.positions[i]), grad, self.device, self.dtype, self.layouts[i][0])

    def _runs(self, present: list[bool]) -> list[tuple[int, int]]:
        """Maximal runs of params that have a grad and share a cohort (Note [step cohorts])."""
        if all(present) and self.cohorts.count(self.cohorts[0]) == len(self.cohorts):
            return [(0, len(present))]
        runs: list[tuple[int, int]] = []
        start = None
        for i, (has_grad, cohort) in enumerate(zip(present, self.cohorts)):
            if start is not None and not (has_grad and cohort == self.cohorts[start]):
                runs.append((start, i))
                start = None
            if has_grad and start is None:
                start = i
        if start is not None:
            runs.append((start, len(present)))
        return runs

    def execute(
        self,
        plan: StepPlan,
        state: MutableMapping[Tensor, dict],
        coefficients: Callable[[Tensor], Tensor],
        update: Callable[..., None],
        *,
        tracing: bool,
    ) -> None:
        """Carry out ``plan``: move grads in place, then one kernel call per run."""
        for i in plan.params_to_relink:
            self._link_param(i)
        if plan.grads_to_copy:
            indices = [i for i, _ in plan.grads_to_copy]
            torch._foreach_copy_([self.grad_views[i] for i in indices],
                                 [g for _, g in plan.grads_to_copy])
            if not tracing:
                for i in indices:
                    self.params[i].grad = self.grad_views[i]
        if not all(self.has_state):
            for i in itertools.compress(range(len(self.params)), plan.present):
                if not self.has_state[i]:
                    self.has_state[i] = True
                    state[self.params[i]] = self.state_views(i)
        for first, last in plan.runs:
            self.steps[first:last].add_(1)
            scalars = coefficients(self.steps[first])
            lo, hi = self.starts[first], self.padded_ends[last - 1]
            if hi > lo:
                window = slice(lo, hi)
                update(
                    self.flat_param[window], self.flat_grad[window], self.exp_avg[window],
                    self.exp_avg_sq[window],
                    None if self.max_exp_avg_sq is None else self.max_exp_avg_sq[window],
                    scalars,
                )
        self._advance_cohorts(plan.present)

    def _advance_cohorts(self, present: list[bool]) -> None:
        if all(present):
            return
        fresh: dict[int, int] = {}
        next_id = max(self.cohorts) + 1
        for i in itertools.compress(range(len(present)), present):
            self.cohorts[i] = fresh.setdefault(self.cohorts[i], next_id + len(fresh))

    def zero_grads(self) -> bool:
        """Zero every grad with one fill if all of them are in place; False if some are not."""
        grads = [p.grad for p in self.params]
        if any(g is not None and (g.layout != torch.strided or g.data_ptr() != ptr)
               for g, ptr in zip(grads, self.grad_ptrs)):
            return False
        for g in grads:
            if g is not None and g.grad_fn is not None:
                g.detach_()
            elif g is not None:
                g.requires_grad_(False)
        self.flat_grad.zero_()
        return True


def group_into_buckets(params: Iterable[Tensor], *, amsgrad: bool) -> list[FlatBucket]:
    """One bucket per (device, dtype) among ``params``, in order of first appearance."""
    by_key: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for position, p in enumerate(params):
        members, positions = by_key.setdefault(bucket_key(p), ([], []))
        members.append(p)
        positions.append(position)
    return [FlatBucket(ps, pos, amsgrad=amsgrad) for ps, pos in by_key.values()]
