"""The step's two kernels, compiled once per static configuration (or run eagerly).

Note [one code object per configuration]: Dynamo keeps its compiled graphs on the Python code
object and stops compiling a code object after ``torch._dynamo.config.recompile_limit`` (8)
variants -- with ``fullgraph=True`` it raises. A process that steps float32, bfloat16 and float64
groups with and without amsgrad would hit that limit with one shared function. So each static
configuration (device type, dtype, amsgrad, maximize) gets its own copy of the code object: each
copy compiles exactly once (``dynamic=True`` keeps buffer lengths and offsets symbolic), and any
further compile of a copy is a real recompile that the tests catch.

Note [scalars outside the elementwise kernel]: ``beta ** step`` inlined into the elementwise kernel
is recomputed for every vector of elements by Inductor's generated code, which halves the
bandwidth of the step. The coefficients are therefore a separate (tiny) compiled function. Its
inputs (the group's hyperparameters) and outputs (the :class:`Coefficients`) each travel as one
1-D tensor: every tensor argument of a compiled function costs a guard check on each call, and
that per-call overhead, not the kernel, is what limits a step over many small tensors.

Note [inputs without a view base]: the kernels get windows of the flat buffers. Dynamo guards on
how an input view relates to its ``_base`` (a window that was the whole buffer when compiled gets
the guard ``grad._base.size()[0] == grad.size()[0]``), so a shorter window would recompile. The
compiled kernels therefore receive aliases of the same memory that have no autograd base.

Note [cold compile]: on CPU, Inductor's first compile in a process probes the vector ISAs the CPU
announces by building a test library for each (seconds on a cold cache). ``cpp.vec_isa_ok=True``
skips the probe, but measured on this project's 2-core AMD EPYC (fresh process per variant,
16M fp32 elements), the kernel it built ran 8.3 ms against 7.1 ms with the probe (torch fused:
7.2 ms), with the same ISA and the same generated C++. We keep the probe: it costs once per
process, the slower kernel every step.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import Tensor

from .functional import step_flat
from .update import Coefficients, adamw_coefficients, adamw_elementwise

__all__ = ["apply_update_", "coefficients_kernel", "differentiable_kernel", "packed_coefficients",
           "update_kernel", "without_base"]



def packed_coefficients(step: Tensor, hyperparameters: Tensor, *, dtype: torch.dtype) -> Tensor:
    """:func:`adamw_coefficients` from ``hyperparameters = [lr, beta1, beta2, eps, weight_decay,
    eps_root, grad_scale, found_inf]``, stacked into one 1-D tensor (Note [scalars outside the
    elementwise kernel])."""
    return torch.stack(adamw_coefficients(step, *hyperparameters.unbind(), dtype=dtype))


def apply_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    coefficients: Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    scaled: bool,
    skippable: bool = False,
) -> None:
    """:func:`adamw_elementwise` written back in place: the mutation lives only at this edge.

    ``coefficients`` is the packed output of :func:`packed_coefficients`.
    """
    new_param, new_exp_avg, new_exp_avg_sq, new_max = adamw_elementwise(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, Coefficients(*coefficients.unbind()),
        amsgrad=amsgrad, maximize=maximize, scaled=scaled, skippable=skippable,
    )
    param.copy_(new_param)
    exp_avg.copy_(new_exp_avg)
    exp_avg_sq.copy_(new_exp_avg_sq)
    if amsgrad:
        max_exp_avg_sq.copy_(new_max)


def _own_code_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a private copy of its code object (Note [one code object per configuration])."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
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


def coefficients_kernel(device_type: str, dtype: torch.dtype, compiled: bool) -> Callable[..., Tensor]:
    """:func:`packed_coefficients` producing ``dtype`` scalars, compiled unless ``compiled=False``."""
    if not compiled:
        return functools.partial(packed_coefficients, dtype=dtype)
    return _compiled_coefficients(device_type, dtype)


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
    """The same memory, shape and strides, with no ``_base`` (Note [inputs without a view base])."""
    if tensor is None or tensor._base is None:
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def _stripping_bases(kernel: Callable[..., Any], **static: Any) -> Callable[..., Any]:
    def call(*tensors: Tensor | None) -> Any:
        return kernel(*map(without_base, tensors), **static)

    call.compiled = kernel
    return call


@functools.cache
def _compiled_update(device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool,
                     scaled: bool, skippable: bool) -> Callable[..., None]:
    name = _configuration_name("adamw_update", device_type, dtype, f"amsgrad{int(amsgrad)}",
                               f"maximize{int(maximize)}", f"scaled{int(scaled)}", *(["skippable"] if skippable else []))
    kernel = torch.compile(_own_code_copy(apply_update_, name), fullgraph=True, dynamic=True)
    return _stripping_bases(kernel, amsgrad=amsgrad, maximize=maximize, scaled=scaled, skippable=skippable)


@functools.cache
def _compiled_coefficients(device_type: str, dtype: torch.dtype) -> Callable[..., Tensor]:
    name = _configuration_name("adamw_coefficients", device_type, dtype)
    kernel = torch.compile(_own_code_copy(packed_coefficients, name), fullgraph=True, dynamic=False)
    return _stripping_bases(kernel, dtype=dtype)


@functools.cache
def _compiled_differentiable(device_type: str, dtype: torch.dtype, amsgrad: bool, maximize: bool,
                             scaled: bool, skippable: bool) -> Callable[..., tuple]:
    name = _configuration_name("adamw_differentiable", device_type, dtype, f"amsgrad{int(amsgrad)}",
                               f"maximize{int(maximize)}", f"scaled{int(scaled)}", *(["skippable"] if skippable else []))
    return torch.compile(_own_code_copy(step_flat, name), fullgraph=True, dynamic=True)
