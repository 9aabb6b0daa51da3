"""A flat bucket: the params of one group that share a device and dtype, their AdamW state, and
where each step reads and writes them.

Note [where memory lives]: the one place that decides where params', grads' and state's memory
is, for every path (our own layout, someone else's buckets, autograd's fresh grads).

* **State is ours.** ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) of all params live in
  flat, aligned buffers; ``optimizer.state[p]`` holds views of them in torch.optim.AdamW's format,
  with the strides torch would give (``zeros_like(p, memory_format=torch.preserve_format)``).
  Segments start at multiples of ``ALIGNMENT`` elements, so a kernel over several params sees an
  aligned window whose length is never 0 or 1 (Dynamo would specialize those and recompile).
* **A param's home is ours, but the param owns its bytes.** When a bucket is built, each dense
  param's values are copied into ``flat_param`` and the param is re-pointed (``p.data = alias``)
  to its segment through a tensor with a storage object of its own (DLPack aliasing): the same
  ``Parameter``, shape and strides; ``torch.save`` of part of a model writes that part's bytes;
  ``model.load_state_dict`` copies in place. Our kernels write through aliases, which autograd
  does not see, so a step bumps the version counters of the params it stepped and of the state
  buffers itself, as torch's in-place step does (``_count_writes``). A param that is not dense
  (a strided slice) is left where it is, and so is a sharded param (a ``DTensor``, FSDP2's): its
  local shard is FSDP's memory, which FSDP all-gathers from, so re-pointing it would make FSDP
  gather stale values.
* **A sharded param is stepped as its local shard** (:func:`memory_of`). The update is
  elementwise, so each rank steps its shard with the same kernels; the state's buffers are the
  shards' (flat, ours) and ``optimizer.state[p]`` holds them as DTensors with the param's mesh and
  placements, which is what ``torch.distributed.checkpoint`` saves and reshards.
* **A param re-pointed by someone else is stepped where it now lives**, never taken back: ZeRO's
  bucket views, ``load_state_dict(assign=True)``, ``p.data = p.data.contiguous()``. A step
  notices a move by comparing each param's data pointer, shape and strides with what the last
  step found, in one C call for all of them (Note [a step that looks once] in
  ``metadata_check.py``); only then does it look closer (``_find_away``) and remember the new
  places. A small one is stepped in its chunk's kernel call, staged through its home segment
  (which nobody else uses while it is away): one ``_foreach_copy_`` in per chunk, one back. A
  large one gets its own call: if its strides match its state's, the kernel reads and writes its
  memory directly; otherwise (another layout, a non-dense param) its values pass through a
  temporary in the state's layout and are copied back, keeping the param's own strides. (Measured, grads held
  fixed: 1,000 params of 1,024 elements re-pointed by hand stepped in 24 ms with a call each,
  4.0-4.6 ms staged, against torch fused's 4.7-5.0 ms in the same runs.) A param away from home
  whose memory is inside flat_param (transposed in place) is never staged: it would be copied
  onto itself. Only a change of dtype, device or shape (``model.half()``,
  ``model.to(...)``) makes the optimizer rebuild the group's buckets, carrying the state over as
  ``load_state_dict`` would (cast to the new dtype, moved to the new device).
* **Grads are autograd's, read where they are and never written.** ``p.grad`` is never re-pointed
  or modified (torch's invariant: a step leaves ``p.grad._version`` alone), and a None grad stays
  None. A param of ``DIRECT_ELEMENTS`` or more gets a kernel call of its own that reads its grad
  in place: no copy. Smaller params are stepped together, a chunk of at most ``CHUNK_ELEMENTS``
  per kernel call, their grads gathered by one copy (Note [one cat per chunk]) into a chunk-sized
  scratch buffer, so the copies stay in cache and the optimizer holds no param-sized grad buffer.
  The bucket lays out its small params first, so that they form as few chunks as possible.

Note [calls prepared once]: a kernel call's windows of the flat buffers depend only on which
params it steps, so each distinct list of calls is prepared once (as base-less aliases, Note
[inputs without a view base]) and kept; a step then only fetches the grads and calls. This keeps
the Python a step runs per call to a few attribute reads, which matters for models of many
params.

Note [step cohorts]: torch keeps one step count per param, and a param whose grad is None is not
stepped. A kernel call uses one step count for all its params, which is right only if their
counts are equal. The host knows when they are: params that have always been stepped together
share a *cohort* id. A step runs the kernel over maximal runs of params that have a grad and share
a cohort; the stepped ones then move to a fresh cohort. When every param has a grad (the usual
case) there is one run per bucket. Cohorts are rebuilt from the step values when state is loaded,
and when a step finds that the user wrote a step count (Note [state the user writes] in
``written_state.py``).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import Tensor

from .kernels import without_base
from .metadata_check import unchanged_check
from .written_state import WatchedState

__all__ = ["ALIGNMENT", "CHUNK_ELEMENTS", "DIRECT_ELEMENTS", "STATE_KEYS", "FlatBucket", "StepPlan",
           "bucket_key", "check_grad", "group_into_buckets", "is_sharded", "memory_of"]

ALIGNMENT = 16
CHUNK_ELEMENTS = 1 << 18
DIRECT_ELEMENTS = 1 << 16
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

_DTensor = None
if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as _DTensor


def is_sharded(tensor: Tensor | None) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def memory_of(tensor: Tensor) -> Tensor:
    """The tensor whose memory a step reads and writes: a DTensor's local shard (call it under
    ``torch.no_grad()``: then it is the shard itself, not an autograd node), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def bucket_key(param: Tensor) -> tuple[torch.device, torch.dtype, bool]:
    return param.device, param.dtype, is_sharded(param)


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
    Our own kernels receive base-less aliases (Note [inputs without a view base]), unmarked.
    State buffers made while a user's compile traces the first step are that graph's outputs,
    which Dynamo does not let us mark."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(buffer)
    return buffer


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _own_storage(view: Tensor) -> Tensor:
    """The memory of ``view`` through a tensor with a storage object of its own (which keeps the
    buffer alive): saving it writes its bytes only, and its version counter is its own."""
    if view.device.type not in ("cpu", "cuda"):
        return view
    return torch.from_dlpack(view)


def dense_memory(tensor: Tensor, length: int, real_dtype: torch.dtype) -> Tensor:
    """The memory of a dense ``tensor`` (no gaps, no overlaps) as a 1-D tensor of its ``length``
    real elements, in memory order, not requiring grad: itself if it is one, a view where one will
    do (0.5 us; a kernel call gives its inputs no view base only when it compiles, Note [inputs
    without a view base]), else an alias (2.3 us). A param's view would require grad, even under
    ``no_grad``, which our kernels' guards reject (a second compile), so a param gets the alias."""
    if tensor.is_contiguous() and not tensor.is_complex() and not tensor.requires_grad:
        return tensor if tensor.dim() == 1 else tensor.view(-1)
    offset = tensor.storage_offset() * (2 if tensor.is_complex() else 1)
    alias = torch.empty(0, dtype=real_dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), offset, (length,), (1,))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _dense_strides(tensor: Tensor) -> tuple[int, ...]:
    """The strides torch gives this param's state: its own if it is dense, else contiguous ones."""
    return torch.empty_like(tensor, device="meta", memory_format=torch.preserve_format).stride()


class StepPlan(NamedTuple):
    """What one step of a bucket will do, decided (and validated) before anything is mutated."""

    runs: list[tuple[int, int]]  # [first, last) param indices, each run sharing one step count
    present: list[bool]  # which params have a grad
    grads: list[Tensor | None]  # dense grads: a sharded param's are its grad's local shard
    memories: list[Tensor]  # what each param's step writes: the param, or its local shard
    away: frozenset[int]  # params that live somewhere else than their home (stepped there)
    tangled: frozenset[int]  # those of them whose memory overlaps our flat_param: never staged
    changed: bool  # a param changed dtype, device or shape: the group's buckets must be rebuilt


class _Call(NamedTuple):
    """One kernel call over params [first, last) (Note [calls prepared once])."""

    first: int
    last: int
    param: Tensor | None  # the window of flat_param; None: the param lives elsewhere
    state: tuple[Tensor, Tensor, Tensor | None]  # windows of exp_avg, exp_avg_sq, max_exp_avg_sq
    gather: Callable[[list[Tensor]], object] | None  # copies the grads into ``grad``; None: read in place
    grad: Tensor | None  # the scratch window, for gathered grads
    staged: list[int]  # params of a gathered call that live elsewhere, staged in their home segments
    stages: list[Tensor]  # those segments of flat_param


class FlatBucket:
    """Params of one (group, device, dtype) and their state in flat, aligned buffers."""

    def __init__(self, params: list[Tensor], positions: list[int], *, amsgrad: bool):
        self.sharded = is_sharded(params[0])
        memories = [memory_of(p) for p in params]
        real_per_element = 2 if params[0].is_complex() else 1
        sizes = [m.numel() * real_per_element for m in memories]
        # Small params first (Note [where memory lives]); each group keeps its order.
        order = sorted(range(len(params)), key=lambda i: sizes[i] >= DIRECT_ELEMENTS)
        self.params = [params[i] for i in order]
        self.positions = [positions[i] for i in order]  # index of each param in its group's "params"
        self.sizes = [sizes[i] for i in order]
        params, memories = self.params, [memories[i] for i in order]
        self.device, self.dtype, _ = bucket_key(params[0])
        self.real_dtype = self.dtype.to_real() if self.dtype.is_complex else self.dtype
        self.shapes = [m.shape for m in memories]
        self.strides = [_dense_strides(m) for m in memories]
        self.starts, self.ends, self.padded_ends = [], [], []
        offset = 0
        for size in self.sizes:
            self.starts.append(offset)
            self.ends.append(offset + size)
            offset += _round_up(size, ALIGNMENT)
            self.padded_ends.append(offset)
        self.length = offset
        # Not zero-filled: each param's values land in it as its old memory is freed, so building
        # the bucket never holds two copies of all params at once.
        self.flat_param = _static(torch.empty(self.length, dtype=self.real_dtype, device=self.device))
        self.amsgrad = amsgrad
        # Allocated with the first state, as torch does: building the optimizer costs no state memory.
        self.exp_avg = self.exp_avg_sq = self.max_exp_avg_sq = None
        self.steps = _static(torch.zeros(len(params), dtype=torch.float32, device=self.device))
        # What ``optimizer.state[p]["step"]`` views: the same memory with a version counter of its
        # own, which only writes through those views bump (Note [state the user writes]).
        self.shown_steps = torch.empty(0, dtype=self.steps.dtype, device=self.device).set_(self.steps)
        self.step_aliases = [without_base(self.steps[i]) for i in range(len(params))]
        self.prepared: dict[tuple, list[_Call]] = {}
        self.cohorts = [0] * len(params)
        self.has_state = [False] * len(params)
        self.direct = [size >= DIRECT_ELEMENTS for size in self.sizes]
        self._lay_out_chunks()
        self.home_ptrs: list[int | None] = [None] * len(params)
        with torch.no_grad():
            for i, memory in enumerate(memories):
                self.flat_param[self.ends[i] : self.padded_ends[i]].zero_()
                if memory.stride() == self.strides[i] and not self.sharded:
                    self._bring_home(i)
                else:  # stepped where it is: its segment is only ever padding
                    self.flat_param[self.starts[i] : self.ends[i]].zero_()
        self._last_present: list[bool] | None = None  # the first plan looks closer
        self._away, self._tangled = frozenset(), frozenset()
        self._shown_steps_version = self.shown_steps._version

    def step_count_written(self) -> bool:
        """Whether a step count was written through ``optimizer.state[p]["step"]`` since the
        bucket last loaded state (Note [state the user writes])."""
        return self.shown_steps._version != self._shown_steps_version

    def _zeros(self, length: int) -> Tensor:
        return _static(torch.zeros(length, dtype=self.real_dtype, device=self.device))

    def _lay_out_chunks(self) -> None:
        """Each small param's chunk (consecutive small params, at most CHUNK_ELEMENTS long) and its
        grad's view in the chunk-sized scratch buffer."""
        self.chunk_start = [0] * len(self.params)
        chunk_lo, longest = None, 0
        for i, direct in enumerate(self.direct):
            if direct:
                chunk_lo = None
                continue
            if chunk_lo is None or self.padded_ends[i] - chunk_lo > CHUNK_ELEMENTS:
                chunk_lo = self.starts[i]
            self.chunk_start[i] = chunk_lo
            longest = max(longest, self.padded_ends[i] - chunk_lo)
        self.scratch = self._zeros(longest)
        self.scratch_views = [None if direct else self._view(self.scratch, i, self.starts[i] - self.chunk_start[i])
                              for i, direct in enumerate(self.direct)]

    def _view(self, buffer: Tensor, i: int, start: int | None = None) -> Tensor:
        """Param ``i``'s segment of ``buffer`` (from ``start``, default its own offset), with the
        param's dtype, shape and its state's strides."""
        start = self.starts[i] if start is None else start
        segment = buffer[start : start + self.sizes[i]]
        if self.dtype.is_complex:
            segment = segment.view(self.dtype)
        return segment.as_strided(self.shapes[i], self.strides[i])

    def _bring_home(self, i: int) -> None:
        param, view = self.params[i], self._view(self.flat_param, i)
        view.copy_(param.detach())
        param.data = _own_storage(view)
        self.home_ptrs[i] = param.data_ptr()

    # ---- state ------------------------------------------------------------------------------

    def state_views(self, i: int) -> dict[str, Tensor]:
        """Param ``i``'s state in torch.optim.AdamW's format, as live views of the flat buffers."""
        state = {"step": self.shown_steps[i]}
        for key in STATE_KEYS:
            buffer = getattr(self, key)
            if buffer is not None:
                state[key] = self._as_param(self._view(buffer, i), i)
        return state

    def _as_param(self, shard: Tensor, i: int) -> Tensor:
        """``shard`` as param ``i`` is: a DTensor with its mesh and placements if it is sharded."""
        if not self.sharded:
            return shard
        param = self.params[i]
        # Its own storage: a DTensor over a view at an offset reports a data_ptr, and deepcopy
        # then copies the wrapper's (unallocated) storage and fails.
        return _DTensor.from_local(_own_storage(shard), param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())

    def _allocate_state(self) -> None:
        """The state buffers, made when the first state is; calls prepared before name none."""
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq = self._zeros(self.length), self._zeros(self.length)
            self.prepared.clear()
        if self.amsgrad and self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = self._zeros(self.length)
            self.prepared.clear()

    def set_amsgrad(self, amsgrad: bool, state: WatchedState) -> None:
        """Follow ``group["amsgrad"]``; the params' state gains or loses ``max_exp_avg_sq`` with it,
        so that what ``optimizer.state`` and checkpoints hold is what the step uses."""
        if amsgrad == self.amsgrad:
            return
        self.amsgrad = amsgrad
        self.max_exp_avg_sq = None
        if self.exp_avg is not None:
            self._allocate_state()
        self.prepared.clear()
        for i in itertools.compress(range(len(self.params)), self.has_state):
            self._keep_views(i, state)

    def _keep_views(self, i: int, state: WatchedState) -> None:
        """``state[param]`` becomes param ``i``'s views, and keeps whatever else the user put there."""
        param = self.params[i]
        others = {key: value for key, value in state.get(param, {}).items() if key not in ("step", *STATE_KEYS)}
        state.keep(param, {**self.state_views(i), **others})

    def load_state(self, loaded: Mapping[Tensor, Mapping[str, Tensor]], state: WatchedState) -> None:
        """Copy validated ``loaded[param]`` values into the buffers (``copy_`` casts and moves them,
        as torch's ``load_state_dict`` does, and skips a view onto itself); ``state`` gets the
        views. An empty entry is no state: torch's step starts such a param afresh."""
        if any(loaded.get(param) for param in self.params):
            self._allocate_state()
        for i, param in enumerate(self.params):
            values = loaded.get(param) or {}
            self.has_state[i] = bool(values)
            for key in ("step", *STATE_KEYS):
                buffer = self.steps[i] if key == "step" else getattr(self, key)
                if buffer is None:
                    continue
                target = buffer if key == "step" else self._view(buffer, i)
                if key in values:
                    target.copy_(memory_of(values[key]))
                else:
                    target.zero_()
            if values:
                self._keep_views(i, state)
            elif param in state:
                state.keep(param, {})
        cohort_of_step: dict[float, int] = {}
        self.cohorts = [cohort_of_step.setdefault(s, len(cohort_of_step)) for s in self.steps.tolist()]
        self._shown_steps_version = self.shown_steps._version

    # ---- one step -----------------------------------------------------------------------------

    def plan(self, where: Callable[[int], str], grads: list[Tensor | None]) -> StepPlan:
        """Inspect params and ``grads`` (theirs, in order) and decide the step; raises before
        anything is mutated."""
        memories = self.params
        if self.sharded:
            memories = list(map(memory_of, memories))
            grads = [None if g is None else memory_of(g) for g in grads]
        present = [g is not None for g in grads]
        given = list(itertools.compress(grads, present))
        if self._as_last_seen(memories, present, given):
            away, tangled, changed = self._away, self._tangled, False
        else:
            away, tangled, changed = self._find_away(memories, where)
            for i, (memory, grad) in enumerate(zip(memories, grads)):
                if grad is not None:
                    check_grad(where(self.positions[i]), grad, memory.device, memory.dtype, memory.shape)
            if not changed:
                self._remember(memories, present, given, away, tangled)
        return StepPlan(self._runs(present), present, grads, memories, away, tangled, changed)

    def _as_last_seen(self, memories: list[Tensor], present: list[bool], given: list[Tensor]) -> bool:
        """Whether params and grads are as the last plan that looked closer found them (Note [a
        step that looks once] in ``metadata_check.py``): the same params have a grad, every
        param is where it was with its shape and strides, every grad still fits."""
        return (present == self._last_present and list(map(Tensor.data_ptr, memories)) == self._last_pointers
                and self._last_metadata(*memories, *given))

    def _remember(self, memories: list[Tensor], present: list[bool], given: list[Tensor],
                  away: frozenset[int], tangled: frozenset[int]) -> None:
        """What the step found, all checked: where each param is, which have grads, and what that
        means for the step. On the meta device every pointer is 0, so every step looks closer."""
        self._away, self._tangled = away, tangled
        if self.device.type == "meta":
            return
        self._last_present, self._last_pointers = present, list(map(Tensor.data_ptr, memories))
        self._last_metadata = unchanged_check([*memories, *given],
                                              strides_matter=[True] * len(memories) + [False] * len(given))

    def _find_away(self, memories: list[Tensor],
                   where: Callable[[int], str]) -> tuple[frozenset[int], frozenset[int], bool]:
        """Params away from home, those of them whose memory is in our flat_param (a param
        transposed in place at home: staging it through its home segment would copy it onto
        itself), and whether a param changed dtype, device or shape."""
        away, tangled, changed = set(), set(), False
        flat = self.flat_param.data_ptr(), self.flat_param.data_ptr() + self.flat_param.nbytes
        for i, memory in enumerate(memories):
            if (memory.device, memory.dtype, memory.shape) != (self.device, self.dtype, self.shapes[i]):
                if memory.shape != self.shapes[i] and self.has_state[i]:
                    raise RuntimeError(
                        f"{where(self.positions[i])} changed shape from {tuple(self.shapes[i])} to "
                        f"{tuple(memory.shape)} after it was stepped; its state no longer fits")
                changed = True
            elif memory.data_ptr() != self.home_ptrs[i] or memory.stride() != self.strides[i]:
                away.add(i)
                if flat[0] <= memory.data_ptr() < flat[1]:
                    tangled.add(i)
        return frozenset(away), frozenset(tangled), changed

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

    def _calls(self, first: int, last: int, away: frozenset[int], tangled: frozenset[int]) -> list[_Call]:
        """The kernel calls that step params [first, last) (Note [where memory lives])."""
        key = (first, last, away, tangled)
        if key not in self.prepared:
            self.prepared[key] = list(self._prepare_calls(first, last, away, tangled))
        return self.prepared[key]

    def _prepare_calls(self, first: int, last: int, away: frozenset[int],
                       tangled: frozenset[int]) -> Iterator[_Call]:
        i = first
        while i < last:
            j = i + 1
            gathered = not (self.direct[i] or i in tangled)
            if gathered:
                while (j < last and not self.direct[j] and j not in tangled
                       and self.chunk_start[j] == self.chunk_start[i]):
                    j += 1
                lo, hi = self.starts[i], self.padded_ends[j - 1]
            else:
                lo, hi = self.starts[i], self.ends[i]
            if hi > lo:  # empty params need no call
                window = slice(lo, hi)
                state = tuple(None if buffer is None else without_base(buffer[window])
                              for buffer in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq))
                param = None if i in away and not gathered else without_base(self.flat_param[window])
                chunk = self.chunk_start[i]
                staged = [k for k in range(i, j) if k in away] if gathered else []
                yield _Call(i, j, param, state, self._gather(i, j) if gathered else None,
                            without_base(self.scratch[lo - chunk : hi - chunk]) if gathered else None,
                            staged, [self._view(self.flat_param, k) for k in staged])
            i = j

    def _gather(self, first: int, last: int) -> Callable[[list[Tensor]], object]:
        """Note [one cat per chunk]: the copy of params [first, last)'s grads into their scratch
        views. Where their segments follow each other without padding, in row-major layout, and
        their shapes differ only in the first dim (1-D params, biases and norms' weights, whose
        lengths are multiples of ALIGNMENT), it is one ``torch.cat`` into the scratch window: on
        CPU, 1,000 grads of 1,024 elements took 0.60-0.68 ms against ``_foreach_copy_``'s
        0.87-0.98 ms, which copies tensor by tensor. The grads' dtypes and shapes are checked by
        the plan first (cat would cast or mis-place others)."""
        shapes, chunk = self.shapes[first:last], self.chunk_start[first]
        if (all(len(shape) >= 1 and shape[1:] == shapes[0][1:] for shape in shapes)
                and all(self.ends[k] == self.padded_ends[k] for k in range(first, last - 1))
                and all(self.strides[k] == _contiguous_strides(self.shapes[k]) for k in range(first, last))):
            window = without_base(self.scratch[self.starts[first] - chunk : self.ends[last - 1] - chunk])
            if self.dtype.is_complex:
                window = window.view(self.dtype)
            return functools.partial(torch.cat, out=window.view(-1, *shapes[0][1:]))
        return functools.partial(torch._foreach_copy_, self.scratch_views[first:last])

    def execute(
        self,
        plan: StepPlan,
        update: Callable[..., None],
        hyperparameters: Tensor,
        *,
        step_increment: Tensor | int,
    ) -> None:
        """Carry out ``plan``: one call of ``update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
        step, hyperparameters)`` per chunk of small params and per large param. A small param
        that lives elsewhere is stepped in its chunk, staged through its home segment (unused
        while it is away): copied in before the call and back after it."""
        grads = plan.grads
        for first, last in plan.runs:
            (self.steps if last - first == len(self.params) else self.steps[first:last]).add_(step_increment)
            scalars = self.step_aliases[first], hyperparameters
            for call in self._calls(first, last, plan.away, plan.tangled):
                if call.gather is not None:
                    staged = [plan.memories[k].detach() for k in call.staged]
                    if staged:
                        torch._foreach_copy_(call.stages, staged)
                    call.gather(grads[call.first : call.last])
                    update(call.param, call.grad, *call.state, *scalars)
                    if staged:
                        torch._foreach_copy_(staged, call.stages)
                else:
                    self._update_one(call, plan.memories[call.first], grads[call.first], scalars, update)
        self._advance_cohorts(plan.present)
        self._count_writes(plan)

    def _count_writes(self, plan: StepPlan) -> None:
        """Bump the version counters of what the step wrote -- the stepped params and the state --
        as torch's in-place step does: a backward through a graph that saved a param before the
        step then fails as it does with torch, instead of using the new values (our kernels write
        through aliases, whose writes autograd does not see)."""
        stepped = (plan.memories if plan.runs == [(0, len(self.params))]
                   else [plan.memories[i] for first, last in plan.runs for i in range(first, last)])
        state = [buffer for buffer in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq) if buffer is not None]
        torch.autograd.graph.increment_version([*stepped, *state])

    def init_state(self, state: WatchedState) -> None:
        """Give each param that has a grad and no state yet its state views."""
        if all(self.has_state):
            return
        self._allocate_state()
        for i, param in enumerate(self.params):
            if not self.has_state[i] and param.grad is not None:
                self.has_state[i] = True
                self._keep_views(i, state)

    def _update_one(self, call: _Call, memory: Tensor, grad: Tensor, scalars: tuple[Tensor, Tensor],
                    update: Callable[..., None]) -> None:
        """A call of its own for a large param: its grad and (if it lives elsewhere) its memory
        are read in place when their strides are the state's, and otherwise pass through
        temporaries in the state's layout."""
        i = call.first
        in_place = grad.stride() == self.strides[i] and (call.param is not None or memory.stride() == self.strides[i])
        if in_place and self.sizes[i] >= 2:
            update(dense_memory(memory, self.sizes[i], self.real_dtype) if call.param is None else call.param,
                   dense_memory(grad, self.sizes[i], self.real_dtype), *call.state, *scalars)
            return
        param = memory.detach()
        window = slice(self.starts[i], self.padded_ends[i])
        temporary_param, temporary_grad = (torch.zeros(window.stop - window.start, dtype=self.real_dtype,
                                                       device=self.device) for _ in range(2))
        param_view, grad_view = (self._view(t, i, 0) for t in (temporary_param, temporary_grad))
        param_view.copy_(param)
        grad_view.copy_(grad)
        state = tuple(None if buffer is None else buffer[window]
                      for buffer in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq))
        update(temporary_param, temporary_grad, *state, *scalars)
        param.copy_(param_view)

    def _advance_cohorts(self, present: list[bool]) -> None:
        if all(present):
            return
        fresh: dict[int, int] = {}
        next_id = max(self.cohorts) + 1
        for i in itertools.compress(range(len(present)), present):
            self.cohorts[i] = fresh.setdefault(self.cohorts[i], next_id + len(fresh))


def group_into_buckets(params: Iterable[Tensor], *, amsgrad: bool) -> list[FlatBucket]:
    """One bucket per (device, dtype) among ``params``, in order of first appearance."""
    by_key: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for position, p in enumerate(params):
        members, positions = by_key.setdefault(bucket_key(p), ([], []))
        members.append(p)
        positions.append(position)
    return [FlatBucket(ps, pos, amsgrad=amsgrad) for ps, pos in by_key.values()]
