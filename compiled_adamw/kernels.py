"""The step's kernel, compiled once per static configuration (or run eagerly).

Note [one code object per configuration]: Dynamo keeps its compiled graphs on the Python code
object and stops compiling a code object after ``torch._dynamo.config.recompile_limit`` (8)
variants -- with ``fullgraph=True`` it raises. A process that steps float32, bfloat16 and float64
groups with and without amsgrad would hit that limit with one shared function. So each static
configuration (device type, dtype, amsgrad, maximize) gets its own copy of the code object: each
copy compiles exactly once (``dynamic=True`` keeps buffer lengths and offsets symbolic), and any
further compile of a copy is a real recompile that the tests catch.

Note [scalars once per call]: ``beta ** step`` inlined into the elementwise loop is recomputed
for every vector of elements by Inductor's generated code, which halves the bandwidth of the step.
The kernel therefore first packs its scalars (:func:`packed_coefficients`) into one small tensor:
Inductor computes it once, before the elementwise loop, in the same C++ function, and the loop
reads it (``test_each_step_is_one_kernel_with_its_scalars_outside_the_loop``). It is packed by an
elementwise select, not ``torch.stack``: Inductor builds a stack's output from a view per input,
which its Python wrapper re-creates at every call (10 ``reinterpret_tensor``s: a call of the
1,024-element kernel took 18.7 us stacked and 14.4 us selected, with bit-identical results). The
group's hyperparameters reach the kernel as one 1-D tensor: every tensor argument of a compiled
function costs a guard check on each call, and that per-call overhead, not the kernel, is what
limits a step over many small tensors. (The scalars used to be a compiled function of their own:
a second call per step, Note [calls past Dynamo's frame hook].)

Note [inputs without a view base]: the kernels get windows of the flat buffers. Dynamo guards on
how an input view relates to its ``_base`` (a window that was the whole buffer when compiled gets
the guard ``grad._base.size()[0] == grad.size()[0]``), so a shorter window would recompile. The
compiled kernels therefore compile for aliases of the same memory that have no autograd base.
Guards made so do not look at bases, so the calls past Dynamo's frame hook take views as they
are (``grad.view(-1)`` costs 0.5 us, a base-less alias 2.3 us); only a call that compiles, or
whose guards fail, is given the aliases.

Note [cold compile]: on CPU, Inductor's first compile in a process probes each vector ISA the
CPU announces by building a test library with the compiler, unless ``cpp.vec_isa_ok=True``, which
trusts the CPU's flags. On this project's 2-core AMD EPYC with an empty Inductor cache, the first
step of a 16M-element param took 7.8-8.3 s with the probe and 3.6 s without; the kernel was the
same build either way (the same generated source and the same shared library, by hash) and
stepped in 7.5-8.2 against 7.6-7.7 ms. So our kernels compile with ``vec_isa_ok=True``. (An
earlier measurement here found it slower, 8.3 against 7.1 ms; measured again, with one build for
both, the difference is not there, and what made it was not found: a cache that held a serial
build, Note [parallel at any length], is one candidate.) Inductor keeps the list of usable ISAs
for the process, so compiles that come after our first one in the same process skip the probe
too; a machine whose compiler cannot build for an ISA its CPU announces fails that first compile.
The option skips the base probes only: those for AVX-512's bf16 and VNNI extensions still run
where the CPU announces them (three probes, 0.96-0.98 s of a first step under torch 2.13 and
2.14.1; 4.9 s under 2.11, whose probe loads the library in a child Python that imports torch).

Note [calls past Dynamo's frame hook]: a call of a ``torch.compile``'d function goes through
Dynamo's frame hook, its guards and its wrappers before the compiled code runs: 17 us against
7 us for the same compiled code called directly, measured on this project's 2-core CPU (a 1,024
element in-place add; the eager op takes 3 us). A step over a small model is a few such calls, so
that hook, not the kernels, was most of its time (one 1,024-element param: 0.093 ms per step
against torch fused's 0.031 ms). So after a kernel's first call each call checks Dynamo's own
guards for it (``guard_manager.check``, the check Dynamo's hook runs: 2.2-2.5 us for a call that
passes; among its checks are five attribute lookups per tensor for dimension markings, not timed
apart) and runs the code
Dynamo compiled for the frame, as the hook would; a call whose guards fail goes through
``torch.compile`` as before, and compiles, which the recompile tests count. So does every call
while a stance other than the default is set (``torch.compiler.set_stance("force_eager")`` runs
the kernel eagerly, as the user asked). The compiled code is the kernel's: :func:`reset` forgets
it together with Dynamo's caches.

Note [calls into Inductor's graph]: the code Dynamo compiled for a kernel's frame still calls
Dynamo's wrappers, AOTAutograd's runtime wrapper and Inductor's ``CompiledFxGraph`` before the
generated ``call`` that runs the C++ kernel: 9-11 us a call, against 3.8 us for ``call`` itself
(1,024 elements, this project's 2-core CPU). For an in-place kernel -- inference only, it returns
None, its writes are in the graph -- those layers have nothing to do (AOTAutograd would bump
version counters of our aliases, which nobody reads: the step bumps the real tensors', Note
[where memory lives]). So the update kernel compiles through a backend that is Inductor's own
``compile_fx`` and keeps the graph Inductor built and what each of its inputs is (a local of the
frame or one of its sizes, from Dynamo's graph). The next call whose guards pass runs through
Dynamo's code as before while watching the inputs that reach ``call``; only if they are exactly
the ones we build (the same tensor objects, the same sizes, in order) do later calls, still after
the guards pass, hand them to ``call`` themselves; otherwise that entry keeps going through
Dynamo's code (``test_an_in_place_kernel_calls_inductors_graph_once_its_inputs_are_verified``).
AOTAutograd's cache would return a compiled function without building the graph, so these
kernels compile with it off: a process with warm caches took 1.1 s instead of 0.6 s for a
kernel's first call (measured with a prototype of this backend). Measured: one 1,024-element param, the whole step 42 -> 29-32 us (torch
fused: 21-22 us). The differentiable kernel has a backward and keeps the ordinary path.

Note [calls that look as before]: Dynamo's guard check of a kernel call costs 2.2-2.5 us when
its own data is in the cache, but a step over a param of 2^16-2^20 elements streams params and
state through the cache between calls, and there the check took 58 of a call's 101 us (measured
on this project's 2-core CPU, the kernel called after a cache flush). So once a call of an
in-place kernel passed Dynamo's guards and ran straight into Inductor's graph, the kernel keeps
its tensors' metadata in a ``TensorGuards`` (Note [a step that looks once] in
``metadata_check.py``: type, dispatch keys, dtype, device, requires_grad, exact sizes and
strides), and a later call without per-call options whose tensors match it, None where it had
None, runs that graph without Dynamo's check: tensors that match exactly pass every tensor and
shape guard the first call passed. What else Dynamo guards -- global state such as grad mode
or a torch function mode, and the globals the kernel's code reads -- does not reach a graph
called directly, whose generated code runs the same whatever they are: a step inside a user's
``TorchFunctionMode`` compiles nothing. Autocast does change the dispatch keys the tensors are
checked with, so the first call under it goes through Dynamo's guards (and compiles once for
it), as before this Note; a stance other than the default still goes through ``torch.compile``. Such a call also builds no dict of the frame's
locals: the graph's inputs are picked from the arguments in one C call, the sizes among them
being the first call's (equal sizes give the same): with cold caches every line of Python
costs, and a call took 3-19 us more than Inductor's graph called alone, where it had taken 24-34
us more (2^10-2^18 elements, one and two threads, after a cache flush). Kept per first tensor's
length, the checks grow with the distinct call shapes, as the prepared calls do (Note [calls
prepared once] in ``flat_bucket.py``); one that would not pass the very call it was made from
(where ``TensorGuards`` is missing) is not kept. Measured on the default loop's single-tensor sweep
against commit 270a2a1, which ran every call through Dynamo's check (separate processes,
alternating, twice): ratio to torch fused at 2^10 1.38-1.46 -> 1.15-1.17, 2^16 1.21-1.31 ->
1.07-1.08, 2^18 1.03-1.22 -> 0.97-1.12, 2^20 1.29-1.37 -> 1.10-1.14.

Note [parallel at any length]: Inductor's C++ backend makes a loop parallel only if the length it
sees at compile time, the first call's, is at least 512 elements per thread
(``cpp.min_chunk_size``); a kernel first called on a short window stays serial at every later
length, and Inductor's cache serves it to later processes too. Measured on this 2-core CPU: a
process that stepped a 100-element param first made the 16M step 8.2 ms where the parallel kernel
takes 7.3 (torch fused: 7.2). So our kernels' loops are always parallel; on a short window the
threads cost about 1.5 us (17.4 against 15.9 us for 1,024 elements).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
import types
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch._dynamo import eval_frame as _eval_frame

from .functional import step_flat
from .metadata_check import unchanged_check
from .update import Coefficients, adamw_coefficients, adamw_elementwise, compute_dtype

__all__ = ["apply_update_", "differentiable_kernel", "own_code_copy", "packed_coefficients", "reset",
           "update_kernel", "without_base"]


def packed_coefficients(step: Tensor, hyperparameters: Tensor, *, dtype: torch.dtype) -> Tensor:
    """:func:`adamw_coefficients` from ``hyperparameters = [lr, beta1, beta2, eps, weight_decay,
    eps_root, grad_scale, found_inf]``, as one 1-D tensor: element ``k`` is the ``k``-th
    coefficient, selected elementwise rather than stacked (Note [scalars once per call])."""
    coefficients = adamw_coefficients(step, *hyperparameters.unbind(), dtype=dtype)
    index = torch.arange(len(coefficients), device=step.device)
    packed = coefficients[-1].expand(len(coefficients))
    for k, coefficient in enumerate(coefficients[:-1]):
        packed = torch.where(index == k, coefficient, packed)
    return packed


def apply_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    hyperparameters: Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    scaled: bool,
    skippable: bool = False,
) -> None:
    """:func:`adamw_elementwise` of step ``step`` (already incremented) written back in place: the
    mutation lives only at this edge. ``hyperparameters`` are packed as for
    :func:`packed_coefficients`."""
    coefficients = packed_coefficients(step, hyperparameters, dtype=compute_dtype(param.dtype))
    new_param, new_exp_avg, new_exp_avg_sq, new_max = adamw_elementwise(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, Coefficients(*coefficients.unbind()),
        amsgrad=amsgrad, maximize=maximize, scaled=scaled, skippable=skippable,
    )
    param.copy_(new_param)
    exp_avg.copy_(new_exp_avg)
    exp_avg_sq.copy_(new_exp_avg_sq)
    if amsgrad:
        max_exp_avg_sq.copy_(new_max)


def own_code_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a private copy of its code object, named ``name`` (Note [one code object per
    configuration]; Note [a step frame per optimizer] in ``optimizer.py``). Python 3.10's code
    objects have no ``co_qualname`` (``replace`` refuses it there)."""
    code = fn.__code__
    code = code.replace(co_name=name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {}))
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__doc__ = fn.__doc__
    return copy


def _configuration_name(kind: str, *parts: object) -> str:
    return "_".join([kind, *(str(p).replace("torch.", "") for p in parts)])


def update_kernel(
    device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool, scaled: bool, skippable: bool,
    compiled: bool
) -> Callable[..., None]:
    """:func:`apply_update_` for one configuration, compiled with Inductor unless ``compiled=False``."""
    if not compiled:
        return functools.partial(apply_update_, amsgrad=amsgrad, maximize=maximize, scaled=scaled,
                                 skippable=skippable)
    return _compiled_update(device_type, dtype, amsgrad, maximize, scaled, skippable)


def differentiable_kernel(
    device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool, scaled: bool, skippable: bool,
    compiled: bool
) -> Callable[..., tuple]:
    """:func:`~compiled_adamw.functional.step_flat` for ``dtype`` params, compiled unless
    ``compiled=False``.

    AOTAutograd builds its backward, with torch's limits: that backward is not itself
    differentiable (no double backward through the compiled step), and a backward through it with
    ``retain_graph=True`` needs ``torch._functorch.config.donated_buffer = False`` (set when the
    step compiles and when backward runs; torch checks it in both places).
    """
    if not compiled:
        return step_flat
    return _compiled_differentiable(device_type, dtype, amsgrad, maximize, scaled, skippable)


def without_base(tensor: Tensor | None) -> Tensor | None:
    """The same memory, shape and strides, with no ``_base`` (Note [inputs without a view base]);
    a tensor that requires grad is returned as it is, since an alias would have no history."""
    if tensor is None or tensor._base is None or tensor.requires_grad:
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


_INDUCTOR_OPTIONS = {
    "cpp.min_chunk_size": 1,  # Note [parallel at any length]
    "cpp.vec_isa_ok": True,  # Note [cold compile]
    "size_asserts": False,  # Dynamo's guards check the same before every call: 1.5-2 us a call
}


class _Kernel:
    """``fn`` compiled for one configuration (its ``static`` keyword arguments, or those given at
    each call), called with tensors; after the first call, past Dynamo's frame hook (Note [calls
    past Dynamo's frame hook]) and, for an in-place kernel (``direct=True``: it returns None and
    has no backward), straight into Inductor's compiled graph (Note [calls into Inductor's
    graph]), without Dynamo's guard check once its tensors look as a call's that passed it (Note
    [calls that look as before]). It compiles for inputs without view bases; calls past the hook
    take them as they are (Note [inputs without a view base])."""

    def __init__(self, fn: Callable[..., Any], name: str, *, dynamic: bool, direct: bool, **static: Any):
        function = own_code_copy(fn, name)
        self.compiled = (torch.compile(function, fullgraph=True, dynamic=dynamic, backend=self._compile) if direct
                         else torch.compile(function, fullgraph=True, dynamic=dynamic, options=_INDUCTOR_OPTIONS))
        self._code, self._globals = function.__code__, function.__globals__
        self._static = {**(function.__kwdefaults__ or {}), **static}  # Dynamo's guards see every argument
        self._names = self._code.co_varnames[: self._code.co_argcount]
        self._graphs: list[_InductorGraph | None] = []  # one per compile, in order
        self._entries: list[_Entry] = []
        self._direct = direct
        self._looked: dict[int | None, list[_Looked]] = {}  # by the first tensor's length

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Inductor's compile, keeping the graph it builds and what each of its inputs is."""
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        built: list[Any] = []

        def keep(*args: Any, **kwargs: Any) -> Any:
            built.append(compile_fx_inner(*args, **kwargs))
            return built[-1]

        # AOTAutograd's cache would hand back a compiled function without building the graph.
        without_aot_cache = (torch._functorch.config.patch(enable_autograd_cache=False)
                             if hasattr(torch._functorch.config, "enable_autograd_cache") else contextlib.nullcontext())
        with without_aot_cache:
            compiled = compile_fx(graph_module, example_inputs, inner_compile=keep, config_patches=_INDUCTOR_OPTIONS)
        self._graphs.append(_InductorGraph.of(graph_module, built))
        return compiled

    def __call__(self, *tensors: Tensor | None, **options: Any) -> Any:
        if options or not self._direct or not _in_default_stance():
            return self._through_dynamo(tensors, options)
        for looked in self._looked.get(_length_of_first(tensors), ()):
            if looked.matches(tensors):
                return looked.run(list(looked.inputs(tensors + looked.sizes)))
        return self._through_dynamo(tensors, options)

    def _through_dynamo(self, tensors: tuple[Tensor | None, ...], options: dict[str, Any]) -> Any:
        """The call as Dynamo would make it: the first entry whose guards pass, else ``torch.compile``."""
        options = {**self._static, **options} if options else self._static
        if not _in_default_stance():
            return self.compiled(*map(without_base, tensors), **options)
        frame_locals = dict(zip(self._names, tensors), **options)
        for entry in self._entries:
            if entry.guards.check(frame_locals):
                result = entry(tensors, options, frame_locals)
                if entry.direct and options is self._static:  # Note [calls that look as before]
                    looked = _Looked.of(tensors, self._names, entry.graph)
                    if looked.matches(tensors):  # never where TensorGuards is missing: nothing to keep
                        self._looked.setdefault(_length_of_first(tensors), []).append(looked)
                return result
        result = self.compiled(*map(without_base, tensors), **options)
        self._entries, self._looked = _compiled_frames(self._code, self._globals, self._graphs), {}
        return result


class _InductorGraph(NamedTuple):
    """A graph Inductor built for a kernel, and where each of its inputs comes from."""

    graph: Any  # Inductor's CompiledFxGraph: ``graph.current_callable(inputs)`` runs it
    inputs: list[tuple[str, int | None]]  # a local of the frame, or (with a dim) one of its sizes

    @staticmethod
    def of(graph_module: torch.fx.GraphModule, built: list[Any]) -> _InductorGraph | None:
        """None unless Inductor built exactly one graph (no backward) and every input of Dynamo's
        graph is a local of the frame or one of its sizes."""
        if len(built) != 1 or not callable(getattr(built[0], "current_callable", None)):
            return None
        inputs: list[tuple[str, int | None]] = []
        for node in graph_module.graph.find_nodes(op="placeholder"):
            source = getattr(node.meta.get("grapharg"), "source", None)
            local, size = _LOCAL.match(getattr(source, "name", "")), _SIZE.match(getattr(source, "name", ""))
            if local:
                inputs.append((local[1], None))
            elif size:
                inputs.append((size[1], int(size[2])))
            else:
                return None
        return _InductorGraph(built[0], inputs)

    def inputs_from(self, frame_locals: dict[str, Any]) -> list[Any]:
        return [frame_locals[name] if dim is None else frame_locals[name].size(dim) for name, dim in self.inputs]


_LOCAL, _SIZE = re.compile(r"L\['(\w+)'\]$"), re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]$")


class _Entry:
    """One of Dynamo's cache entries for a kernel: its guards, the code Dynamo compiled for the
    frame, and Inductor's graph for it once the graph is known to take the inputs we would give
    it (Note [calls into Inductor's graph])."""

    def __init__(self, guards: Any, transformed: Callable[..., Any], candidate: _InductorGraph | None):
        self.guards, self._transformed, self._candidate = guards, transformed, candidate
        self.graph: _InductorGraph | None = None  # the candidate, once verified

    @property
    def direct(self) -> bool:
        return self.graph is not None

    def __call__(self, tensors: tuple, options: dict, frame_locals: dict) -> Any:
        if self.graph is not None:
            self.graph.graph.current_callable(self.graph.inputs_from(frame_locals))
            return None
        if self._candidate is None:
            return self._transformed(*tensors, **options)
        return self._verify(tensors, options, frame_locals)

    def _verify(self, tensors: tuple, options: dict, frame_locals: dict) -> Any:
        """Run the frame as Dynamo compiled it, watching the inputs it hands Inductor's graph; if
        they are exactly the ones we would build, later calls hand them over themselves."""
        candidate, self._candidate = self._candidate, None
        expected = candidate.inputs_from(frame_locals)
        seen: list[list] = []
        graph = candidate.graph
        run = graph.current_callable
        graph.current_callable = lambda inputs: seen.append(list(inputs)) or run(inputs)
        try:
            result = self._transformed(*tensors, **options)
        finally:
            graph.current_callable = run
        if result is None and len(seen) == 1 and len(seen[0]) == len(expected) and all(
                given is ours or (not isinstance(ours, Tensor) and given == ours)
                for given, ours in zip(seen[0], expected)):
            self.graph = candidate
        return result


class _Looked(NamedTuple):
    """A call that passed Dynamo's guards and ran straight into Inductor's graph, kept so that a
    later call whose tensors look exactly as its did runs the graph without Dynamo's check (Note
    [calls that look as before])."""

    nones: tuple[int, ...]  # the arguments that were None
    present: Callable[[tuple], tuple]  # the others
    unchanged: Callable[..., bool]  # whether tensors look as the others did
    inputs: Callable[[tuple], tuple]  # the graph's inputs, from the arguments followed by ``sizes``
    sizes: tuple[int, ...]  # the sizes the graph took, which equal sizes make the same
    run: Callable[[list], Any]

    @staticmethod
    def of(tensors: tuple[Tensor | None, ...], names: tuple[str, ...], graph: _InductorGraph) -> _Looked:
        present = [k for k, t in enumerate(tensors) if t is not None]
        position = {name: k for k, name in enumerate(names)}
        sources, sizes = [], []
        for name, dim in graph.inputs:
            if dim is None:
                sources.append(position[name])
            else:
                sources.append(len(tensors) + len(sizes))
                sizes.append(tensors[position[name]].size(dim))
        return _Looked(tuple(k for k, t in enumerate(tensors) if t is None), _picker(present),
                       unchanged_check([tensors[k] for k in present], strides_matter=[True] * len(present)),
                       _picker(sources), tuple(sizes), graph.graph.current_callable)

    def matches(self, tensors: tuple[Tensor | None, ...]) -> bool:
        for k in self.nones:
            if tensors[k] is not None:
                return False
        try:
            return self.unchanged(*self.present(tensors))
        except TypeError:  # None where a tensor was
            return False


def _length_of_first(tensors: tuple[Tensor | None, ...]) -> int | None:
    return None if tensors[0] is None else tensors[0].numel()


def _picker(positions: list[int]) -> Callable[[tuple], tuple]:
    """``values -> tuple(values[k] for k in positions)``, in one C call where it can be."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda values: tuple(values[k] for k in positions)


def _compiled_frames(code: types.CodeType, globals_: dict, graphs: list[_InductorGraph | None]) -> list[_Entry]:
    """Dynamo's cache entries for ``code`` (newest first), each with the graph Inductor built for
    it when we know it (``graphs``, one per compile, oldest first). Empty where Dynamo keeps its
    entries otherwise (these are its internals): then every call goes through ``torch.compile``,
    as before Note [calls past Dynamo's frame hook]."""
    try:
        entries = [(entry.guard_manager, entry.code)
                   for entry in _eval_frame._debug_get_cache_entry_list(code)]
    except AttributeError:
        return []
    candidates = graphs[::-1] if len(graphs) == len(entries) else [None] * len(entries)
    return [_Entry(guards, types.FunctionType(compiled, globals_), candidate)
            for (guards, compiled), candidate in zip(entries, candidates) if callable(getattr(guards, "check", None))]


def _in_default_stance() -> bool:
    """Whether ``torch.compiler.set_stance`` is at its default (read where Dynamo keeps it)."""
    stance = getattr(_eval_frame, "_stance", None)
    return stance is None or stance.stance == "default"


def reset() -> None:
    """``torch._dynamo.reset()``, and our kernels forget their compiled code with it: the next
    step compiles them again."""
    torch._dynamo.reset()
    _compiled_update.cache_clear()
    _compiled_differentiable.cache_clear()


@functools.cache
def _compiled_update(device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool,
                     scaled: bool, skippable: bool) -> Callable[..., None]:
    name = _configuration_name("adamw_update", device_type, dtype, f"amsgrad{int(amsgrad)}",
                               f"maximize{int(maximize)}", f"scaled{int(scaled)}", *(["skippable"] if skippable else []))
    return _Kernel(apply_update_, name, dynamic=True, direct=True, amsgrad=amsgrad, maximize=maximize, scaled=scaled,
                   skippable=skippable)


@functools.cache
def _compiled_differentiable(device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool,
                             scaled: bool, skippable: bool) -> Callable[..., tuple]:
    name = _configuration_name("adamw_differentiable", device_type, dtype, f"amsgrad{int(amsgrad)}",
                               f"maximize{int(maximize)}", f"scaled{int(scaled)}", *(["skippable"] if skippable else []))
    return _Kernel(step_flat, name, dynamic=True, direct=False)
