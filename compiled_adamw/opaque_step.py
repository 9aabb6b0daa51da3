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

The state buffers are the body's own business, not the graph's: code in the same compiled
function that reads ``optimizer.state`` sees the values of the step before.

Note [a step compiled alone]: the grads and params are the op's inputs only so that the rest of
the user's graph stays in order with the step. When the frame being compiled does nothing but
step -- ``torch.compile(opt.step)``, or a function whose whole body is ``opt.step()`` (the
compiled-optimizer recipe's ``fn``) -- with no step hooks, no closure, and AdamW's own ``step``,
the graph holds nothing but the step, so nothing in it can read or write a param or a grad. The
trace then calls ``compiled_adamw::step_alone``, whose inputs are the packed hyperparameters,
whose declared writes are the step counters (which keep it from being dropped as dead code),
and whose body reads the grads where they are when the graph runs, as the eager step does.
Nothing in the trace walks the params: its size, and the compile's time, do not grow with the
param count. Which frame is being compiled is read from Dynamo's translator (an internal: where
it is missing, or the answer is not a clear yes, the step takes the op above), and what a
function does from its bytecode: the name it loads, ``step``, a call without arguments, a
return; anything else, or an instruction not listed, takes the op above. A hook registered
later changes what Dynamo guarded on (the wrapper's loop over the hooks), so the next call
compiles again and takes the op above. The op is tagged ``cudagraph_unsafe``: a CUDA graph
replaying it would read the grads where they were when it was captured.
"""

from __future__ import annotations

import dis
import inspect
import itertools
import types
import weakref
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .flat_bucket import memory_of

if TYPE_CHECKING:
    from .optimizer import AdamW

__all__ = ["compiled_alone", "register", "step_alone", "step_opaquely"]

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
_library.define("written(Tensor(a!)[] params, Tensor[] after) -> Tensor")
_library.define("step_alone(int handle, Tensor(a!)[] steps, Tensor[] hyperparameters, bool scaled, "
                "bool skippable) -> ()", tags=(torch.Tag.cudagraph_unsafe,))


def _step(handle: int, grads: list[Optional[Tensor]], params: list[Tensor], steps: list[Tensor],
          hyperparameters: list[Tensor], fences: list[Tensor], scaled: bool, skippable: bool) -> None:
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        _optimizers[handle]._step_buckets(grads, hyperparameters, scaled, skippable)


def _step_alone(handle: int, steps: list[Tensor], hyperparameters: list[Tensor], scaled: bool,
                skippable: bool) -> None:
    optimizer = _optimizers[handle]
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH_KEYS):
        optimizer._step_buckets(optimizer._grads(), hyperparameters, scaled, skippable)


def _written(params: list[Tensor], after: list[Tensor]) -> Tensor:
    """Declares ``params`` written (Note [fences for many params]); returns a token."""
    return torch.empty(0)


_library.impl("step", _step, "CompositeExplicitAutograd")
_library.impl("written", _written, "CompositeExplicitAutograd")
_library.impl("step_alone", _step_alone, "CompositeExplicitAutograd")
torch.library.register_fake("compiled_adamw::step", lambda *args: None, lib=_library)
torch.library.register_fake("compiled_adamw::step_alone", lambda *args: None, lib=_library)
torch.library.register_fake("compiled_adamw::written", lambda params, after: torch.empty(0), lib=_library)


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
    fences = [torch.ops.compiled_adamw.written(written, []) for written in slices]
    torch.ops.compiled_adamw.step(optimizer._handle, grads, params[:FENCE_PARAMS], steps, hyperparameters, fences,
                                  scaled, skippable)
    for written in slices:
        torch.ops.compiled_adamw.written(written, steps)


_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda: None).__code__

# The bytecode of a function whose whole body is ``name.step()`` or ``return name.step()``, as
# Python 3.10-3.13 compile it, leaving out what does nothing: the name, ``step``, a call without
# arguments, and one of these endings.
_INERT = frozenset({"RESUME", "NOP", "CACHE", "COPY_FREE_VARS", "MAKE_CELL", "PUSH_NULL", "PRECALL", "EXTENDED_ARG"})
_NAME_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST", "LOAD_NAME", "LOAD_CLASSDEREF"})
_CALLS = frozenset({"CALL", "CALL_METHOD", "CALL_FUNCTION"})
_ENDINGS = ([("POP_TOP", None), ("LOAD_CONST", None), ("RETURN_VALUE", None)],
            [("POP_TOP", None), ("RETURN_CONST", None)], [("RETURN_VALUE", None)])


def _stepped_by(code: types.CodeType) -> Optional[str]:
    """The name whose ``step()`` is all the function of ``code`` does (``def fn(): opt.step()``,
    the compiled-optimizer recipe's), or None."""
    operations = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in _INERT]
    if len(operations) < 4:
        return None
    (load, name), (get_attribute, attribute), (call, arguments), *ending = operations
    if (load in _NAME_LOADS and get_attribute in ("LOAD_METHOD", "LOAD_ATTR") and attribute == "step"
            and call in _CALLS and arguments == 0 and ending in _ENDINGS):
        return name
    return None


@torch.compiler.assume_constant_result
def compiled_alone() -> bool:
    """Whether the frame Dynamo is compiling does nothing but step an AdamW (Note [a step compiled
    alone]): it is torch's step wrapper (``torch.compile(opt.step)``) or a function whose body is
    ``opt.step()``. Run when Dynamo traces the step, never in a graph. It takes no argument: an int
    that differs between two compiles (a handle) would reach it as a symbol."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    from .optimizer import AdamW
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        frame = InstructionTranslator.current_tx()
        code, frame_locals, frame_globals = frame.f_code, frame.f_locals, frame.f_globals
    except (ImportError, AttributeError, AssertionError):
        return False
    if code is _STEP_WRAPPER_CODE:
        args = frame_locals.get("args")
        optimizer = args[0] if isinstance(args, tuple) and args else None
    else:
        name = _stepped_by(code)
        optimizer = None if name is None else frame_locals.get(name, frame_globals.get(name))
    return (isinstance(optimizer, AdamW) and inspect.unwrap(type(optimizer).step) is inspect.unwrap(AdamW.step)
            and not (_global_optimizer_pre_hooks or _global_optimizer_post_hooks
                     or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks))


def step_alone(optimizer: AdamW, hyperparameters: list[Tensor], scaled: bool, skippable: bool) -> None:
    """The step as the whole of a user's trace (Note [a step compiled alone])."""
    steps = [bucket.steps for group in optimizer._buckets for bucket in group]
    torch.ops.compiled_adamw.step_alone(optimizer._handle, steps, hyperparameters, scaled, skippable)
