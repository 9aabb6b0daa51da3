"""A C-speed test that tensors still look as they did: same type, dtype, device, layout, shape,
``requires_grad`` and, where asked, strides.

Note [a step that looks once]: a step must notice a param moved, reshaped or re-typed and a grad
that does not fit its param (sparse, another dtype, reshaped in place), before it mutates
anything. Checked attribute by attribute in Python, that cost 0.5 ms per step for 1,000 params
(each ``shape``, ``dtype``, ``device`` and ``layout`` read builds a Python object), a third of
the whole step. So a step that finds everything as the last step left it is recognised in one C
call: Dynamo's ``TensorGuards``, the tensor check its guards are made of (34 us for 1,000 tensors,
measured on this project's 2-core CPU), plus a list of data pointers. Anything else -- a failed
check, or a torch without ``TensorGuards`` -- sends the step down the slow path, which inspects
every tensor, names the culprit, and builds the next check. The check can only say "same", never
"fits": a false "changed" costs time, not correctness.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

try:
    from torch._C._dynamo.guards import TensorGuards
except (ImportError, AttributeError):  # Dynamo's internals: the step then always looks closer
    TensorGuards = None

__all__ = ["unchanged_check"]


def _never(*tensors: Tensor) -> bool:
    return False


def unchanged_check(tensors: Sequence[Tensor], *, strides_matter: Sequence[bool]) -> Callable[..., bool]:
    """``check(*same_count_of_tensors)``: True only if each has what ``tensors[k]`` has now
    (Note [a step that looks once]); strides are compared where ``strides_matter[k]``."""
    if TensorGuards is None:
        return _never
    try:
        guards = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) if strict else [None] * t.dim()
                                                    for t, strict in zip(tensors, strides_matter)])
    except (TypeError, RuntimeError):  # a signature from another torch version
        return _never
    return guards.check
