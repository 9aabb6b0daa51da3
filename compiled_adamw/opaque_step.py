"""The step as one opaque operation inside a user's ``torch.compile``.

Note [one opaque step in a user's trace]: when ``opt.step()`` runs inside someone else's
``torch.compile`` (the compiled-optimizer tutorial, a whole compiled train step), Dynamo would
otherwise trace our bookkeeping -- a walk over every param, its state views and its kernel calls
-- so the traced graph, and the compile time, would grow with the param count, and the first step
(which creates the state) would compile a graph of its own. Instead the trace sees one call of the
custom op ``compiled_adamw::step`` per optimizer, whose inputs are what the graph may have
computed: the grads (a user may have changed them in the graph), each group's packed
hyperparameters (a scheduler may have assigned them, a clip coefficient or a GradScaler's values
may be folded in) and whose declared mutations are the params and the step counters. Its body is
the eager step itself (``AdamW._step_buckets``), with our own compiled kernels, run when the graph
runs: it checks params and grads, follows params that moved, creates the state at the first step,
and steps. So the traced graph has the same operations for 10 params as for 10,000 (only its
inputs grow, and a fence per 256 params, Note [fences for many params]), and the first call's
graph is every call's. The op is called under ``no_grad``: params that require grad are written,
as in the eager step, and AOTAutograd then skips their autograd bookkeeping (1,000 tensors:
20.1 s to compile the first call against 22.5 s without).

The op is defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: at
every call, custom_op's Python wrapper bumps the version of each written tensor one by one and
checks the outputs for aliases of the inputs, a cost per param (measured, 1,000 params of 1,024
elements, ``torch.compile(opt.step, fullgraph=True)``: 5.6 ms a call through custom_op, 3.2-3.4
ms through the library's op, our eager step 1.0-1.2 ms). The body bumps the versions of what it
wrote itself, as the eager step does (``FlatBucket._count_writes``).

Note [a param the graph wrote before the step]: the op declares the params written, but its body
steps them where they live. Where the user's graph writes a param before the step, AOTAutograd
hands the op (or a fence) the written values in memory of its own, and copies them into the param
only when the graph ends: the step would read the param's old values and the copy would then
overwrite its result. So the op and the fences compare the data pointers they are given with the
params' (one C call per list, against the last pointers seen), and where one differs they copy
the given values into the param before the step and the stepped values back into the given
memory after it. Measured where nothing differs (1,000 params, a user's function that reads the
grads, 500 calls alternating in blocks): 6.33 ms a call against 6.24 ms with the comparisons
left out, about 16 us per 256 params.

The state buffers are the body's own business, not the graph's: code in the same compiled
function that reads ``optimizer.state`` sees the values of the step before.

Note [a step alone with the params]: the grads and params are the op's inputs only so that the
rest of the user's graph stays in order with the step. Where nothing else in the graph reads or
writes a param or a grad -- ``torch.compile(opt.step)``, the compiled-optimizer recipe's ``fn``, a
train step that counts its calls or steps a scheduler -- the trace instead calls
``compiled_adamw::step_alone``, whose inputs are the packed hyperparameters, whose declared writes
are the step counters (which keep it from being dropped as dead code), and whose body reads the
grads where they are when the graph runs, as the eager step does. ``clip_grad_norm_`` traced in
such a graph likewise calls ``compiled_adamw::grad_norm``, whose body computes the grads' total
norm where they are (and raises there for ``error_if_nonfinite``), in the dtype and on the device
the grads had when traced (a graph needs them; a later change is cast to them). Nothing in the
trace walks the params: its size, and the compile's time, do not grow with the param count.

Whether anything else touches them is known only once the whole graph is traced, so the trace
takes these ops first, and a graph finalizer (Dynamo's, an internal) looks at the finished
graph's inputs: one whose memory overlaps a param's or a grad's storage (the params themselves,
the grads of torch's ``clip_grad_norm_``, a hook's or a subclass's, an alias of them) makes
Dynamo trace the frame again (``RestartAnalysis``), and the optimizer remembers the frame's code,
so that trace and every later one of that code take the op above. A tensor attribute assigned in
the graph before the step (``p.grad = ...``), which Dynamo applies only after the graph has run,
sends the step to the op above at once, and so does a backend that may replay the graph in CUDA
graphs (``mode="reduce-overhead"``): a replay would read the grads where they were when it was
recorded, while the op above takes them as inputs, which cudagraph trees copy into place. Both
ops that read the grads where they are are tagged ``cudagraph_unsafe`` for a backend we cannot
ask. Where the translator or the finalizer is missing (another torch), every step takes the op
above.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from .flat_bucket import memory_of

if TYPE_CHECKING:
    from .optimizer import AdamW

__all__ = ["grad_norm_alone", "register", "step_alone", "step_opaquely", "traced_alone"]

_optimizers: weakref.WeakValueDictionary[int, AdamW] = weakref.WeakValueDictionary()

# The dispatch keys an eager step runs under. The first run of a freshly compiled graph calls the
# op's body with autograd's and functorch's keys excluded; our kernels, compiled under those,
# would recompile at the next (ordinary) call, since Dynamo guards on the keys of their inputs.
_EAGER_DISPATCH_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
_handles = itertools.count()


def register(optimizer: AdamW) -> int:
    """A handle the op's body finds ``optimizer`` by (a graph's constant, as an int)."""
    handle = next(_handles)
    _optimizers[handle] = optimizer
    return handle


# Note [fences for many params]: the compiler's passes over an op that writes k tensors cost
# about k^2 (AOTAutograd's auto_functionalized, Inductor's re-inplacing: 4.9 s and 2.5 s for one
# op writing 2,000 params, measured beside another compile, 1.6 s and 0.7 s for 1,000 on a quiet
# machine; whole first call at 10,000 params: 312 s without fences, 164 s with). So the step op declares the writes of the
# first FENCE_PARAMS params only, and each further slice of params is declared written twice, by
# an op that does nothing: once before the step (whose inputs include its token, so reads of
# those params earlier in the graph stay before the step) and once after it (it reads the step
# counters the step wrote, so later reads stay after the step).
FENCE_PARAMS = 256


_library = torch.library.Library("compiled_adamw", "DEF")
_library.define("step(int handle, Tensor?[] grads, Tensor(a!)[] params, Tensor(b!)[] steps, "
                "Tensor[] hyperparameters, Tensor[] fences, bool scaled, bool skippable) -> ()")
_library.define("written(int handle, int first, Tensor(a!)[] params, Tensor[] after) -> Tensor")
_library.define("step_alone(int handle, Tensor(a!)[] steps, Tensor[] hyperparameters, bool scaled, "
                "bool skippable) -> ()", tags=(torch.Tag.cudagraph_unsafe,))
_library.define("grad_norm(int handle, float norm_type, bool error_if_nonfinite, ScalarType dtype, Device device) "
                "-> Tensor", tags=(torch.Tag.cudagraph_unsafe,))


def _step(handle: int, grads: list[Optional[Tensor]], params: list[Tensor], steps: list[Tensor],
          hyperparameters: list[Tensor], fences: list[Tensor], scaled: bool, skippable: bool) -> None:
    optimizer = _optimizers[handle]
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        optimizer._refuse_groups_changed_by_hand()
        _as_the_graph_has_them(optimizer, 0, params, into_params=True)
        optimizer._step_buckets(grads, hyperparameters, scaled, skippable)
        _as_the_graph_has_them(optimizer, 0, params, into_params=False)


def _step_alone(handle: int, steps: list[Tensor], hyperparameters: list[Tensor], scaled: bool,
                skippable: bool) -> None:
    optimizer = _optimizers[handle]
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        optimizer._refuse_groups_changed_by_hand()
        optimizer._step_buckets(optimizer._grads(), hyperparameters, scaled, skippable)


def _grad_norm(handle: int, norm_type: float, error_if_nonfinite: bool, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        total = _optimizers[handle]._total_grad_norm(norm_type, error_if_nonfinite)
    return total.to(dtype=dtype, device=device, copy=True)


def _written(handle: int, first: int, params: list[Tensor], after: list[Tensor]) -> Tensor:
    """Declares ``params`` (from the ``first``) written (Note [fences for many params]); returns a
    token."""
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        _as_the_graph_has_them(_optimizers[handle], first, params, into_params=not after)
    return torch.empty(0)


def _as_the_graph_has_them(optimizer: AdamW, first: int, given: list[Tensor], *, into_params: bool) -> None:
    """Note [a param the graph wrote before the step]: ``given`` are the params from the ``first``,
    as the op declaring them written received them. Where one is not the param's memory, copies its
    values into the param (``into_params``, before the step) or the param's into it (after)."""
    pointers = list(map(Tensor.data_ptr, given))
    if pointers == optimizer._traced_param_pointers[first : first + len(given)]:
        return
    memories = [memory_of(p) for group in optimizer._buckets for bucket in group for p in bucket.params]
    optimizer._traced_param_pointers = list(map(Tensor.data_ptr, memories))
    for value, memory in zip(given, memories[first:]):
        if value.data_ptr() != memory.data_ptr():
            (memory if into_params else value).copy_(value if into_params else memory)


_library.impl("step", _step, "CompositeExplicitAutograd")
_library.impl("written", _written, "CompositeExplicitAutograd")
_library.impl("step_alone", _step_alone, "CompositeExplicitAutograd")
_library.impl("grad_norm", _grad_norm, "CompositeExplicitAutograd")
torch.library.register_fake("compiled_adamw::step", lambda *args: None, lib=_library)
torch.library.register_fake("compiled_adamw::step_alone", lambda *args: None, lib=_library)
torch.library.register_fake("compiled_adamw::grad_norm", lambda handle, norm_type, error_if_nonfinite, dtype, device:
                            torch.empty((), dtype=dtype, device=device), lib=_library)
torch.library.register_fake("compiled_adamw::written", lambda *args: torch.empty(0), lib=_library)


def step_opaquely(optimizer: AdamW, grads: list[Tensor | None], hyperparameters: list[Tensor],
                  scaled: bool, skippable: bool) -> None:
    """``optimizer._step_buckets(grads, hyperparameters, scaled, skippable)`` as one op of a user's
    trace."""
    # A sharded param (FSDP2's DTensor) and its grad enter as their local shards, which the
    # step reads and writes (Note [where memory lives]); DTensor has no rule for our op.
    grads = [None if grad is None else memory_of(grad) for grad in grads]
    buckets = [bucket for group in optimizer._buckets for bucket in group]
    params = [memory_of(p) for bucket in buckets for p in bucket.params]
    steps = [bucket.steps for bucket in buckets]
    slices = [params[i : i + FENCE_PARAMS] for i in range(FENCE_PARAMS, len(params), FENCE_PARAMS)]
    handle = optimizer._handle
    fences = [torch.ops.compiled_adamw.written(handle, (i + 1) * FENCE_PARAMS, written, [])
              for i, written in enumerate(slices)]
    torch.ops.compiled_adamw.step(handle, grads, params[:FENCE_PARAMS], steps, hyperparameters, fences, scaled,
                                  skippable)
    for i, written in enumerate(slices):
        torch.ops.compiled_adamw.written(handle, (i + 1) * FENCE_PARAMS, written, steps)


def traced_alone(optimizer: AdamW) -> bool:
    """Whether ``optimizer``'s step being traced can take ``step_alone`` (Note [a step alone with
    the params]): asked once per step traced, and checked again when the graph is finished."""
    return _trace_alone(optimizer._handle_name)


@torch.compiler.assume_constant_result
def _trace_alone(handle_name: str) -> bool:
    """``traced_alone``, run when Dynamo traces the step, never in a graph. It takes the handle as
    a string: an int that differs between two compiles would reach it as a symbol."""
    optimizer = _optimizers[int(handle_name)]
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.tensor import TensorVariable
        tracer = InstructionTranslator.current_tx()
        code, output, speculations = tracer.f_code, tracer.output, tracer.speculation_log
        pending, backend = output.side_effects.store_attr_mutations, output.compiler_fn
        finish = output.add_graph_finalizer
    except (ImportError, AttributeError, AssertionError):
        return False
    if (code in optimizer._traced_with_others or any(isinstance(variable, TensorVariable) for variable in pending)
            or _replayed_in_cuda_graphs(backend)):
        return False
    finish(functools.partial(_unless_touched, weakref.ref(optimizer), code, speculations))
    return True


def _replayed_in_cuda_graphs(backend: Any) -> bool:
    """Whether ``backend`` may replay its graphs in CUDA graphs (``mode="reduce-overhead"``, the
    ``cudagraphs`` backend, or Inductor's global switch)."""
    import torch._inductor.config as inductor_config
    get_config = getattr(backend, "get_compiler_config", None)
    config = (get_config() if callable(get_config) else None) or {}
    return (bool(config.get("triton.cudagraphs", inductor_config.triton.cudagraphs))
            or getattr(backend, "_compiler_name", None) == "cudagraphs")


def _unless_touched(optimizer_ref: weakref.ref, code: types.CodeType, speculations: Any,
                    graph: torch.fx.GraphModule) -> None:
    """A graph finalizer: traces ``code`` again, with the op that takes the params and grads, if
    anything in ``graph`` besides our ops reads or writes them."""
    optimizer = optimizer_ref()
    if optimizer is None:
        return
    with torch.no_grad():  # memory_of's condition
        spans = _Spans(tensor for group in optimizer._buckets for bucket in group for p in bucket.params
                       for tensor in (p, p.grad) if tensor is not None)
        touched = any(spans.overlap(value) for value in _graph_inputs(graph))
    if touched:
        optimizer._traced_with_others.add(code)
        speculations.clear()  # the next trace steps differently from here
        raise torch._dynamo.exc.RestartAnalysis(
            restart_reason="compiled_adamw: the graph reads or writes params or grads besides the step")


def _graph_inputs(graph: torch.fx.GraphModule) -> Iterator[object]:
    """The real values behind the inputs of a graph Dynamo traced."""
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            grapharg = node.meta.get("grapharg")
            yield grapharg.example if grapharg is not None else _UNKNOWN
        elif node.op == "get_attr":
            yield functools.reduce(getattr, node.target.split("."), graph)


_UNKNOWN = object()


class _Spans:
    """The memory of some tensors' storages, as sorted, disjoint address ranges."""

    def __init__(self, tensors: Iterable[Tensor]):
        merged: list[list[int]] = []
        for start, end in sorted(filter(None, map(_storage_span_or_none, tensors))):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            elif end > start:
                merged.append([start, end])
        self.starts, self.ends = [start for start, _ in merged], [end for _, end in merged]

    def overlap(self, value: object) -> bool:
        """Whether ``value`` may share memory with these tensors (an input not known to be a plain
        tensor may)."""
        if isinstance(value, (int, float, bool, str, torch.SymInt, torch.SymFloat, torch.SymBool, torch.nn.Module)):
            return False
        if not isinstance(value, Tensor):
            return True
        try:
            start, end = _storage_span(memory_of(value))
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without a storage
            return True
        before_end = bisect.bisect_left(self.starts, end)
        return before_end > 0 and self.ends[before_end - 1] > start


def _storage_span(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _storage_span_or_none(tensor: Tensor) -> tuple[int, int] | None:
    """A param's or grad's span; None for one without a storage (a sparse grad), which the step
    itself refuses, naming it, when the graph runs."""
    try:
        return _storage_span(memory_of(tensor))
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def step_alone(optimizer: AdamW, hyperparameters: list[Tensor], scaled: bool, skippable: bool) -> None:
    """The step as the graph's only user of the params and grads (Note [a step alone with the
    params])."""
    steps = [bucket.steps for group in optimizer._buckets for bucket in group]
    torch.ops.compiled_adamw.step_alone(optimizer._handle, steps, hyperparameters, scaled, skippable)


def grad_norm_alone(optimizer: AdamW, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """``optimizer.clip_grad_norm_``'s total norm as an op of a graph that touches no param or grad
    besides our ops (Note [a step alone with the params])."""
    dtype, device = _norm_like(optimizer._handle_name)
    return torch.ops.compiled_adamw.grad_norm(optimizer._handle, norm_type, error_if_nonfinite, getattr(torch, dtype),
                                              torch.device(device))


@torch.compiler.assume_constant_result
def _norm_like(handle_name: str) -> tuple[str, str]:
    """The dtype and device of the grads' total norm as the grads are now (``get_total_norm``
    promotes the grads' dtypes; it leaves the norm on the first grad's device), by name; run when
    Dynamo traces, never in a graph."""
    optimizer = _optimizers[int(handle_name)]
    with torch.no_grad():
        grads = [memory_of(p.grad) for settings in optimizer._settings for p in settings.params if p.grad is not None]
    if not grads:
        return str(torch.get_default_dtype()).removeprefix("torch."), "cpu"
    dtype = functools.reduce(torch.promote_types, {grad.dtype for grad in grads})
    return str(dtype).removeprefix("torch."), str(grads[0].device)
