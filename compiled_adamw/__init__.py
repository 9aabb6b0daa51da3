"""An AdamW whose step is one compiled, device-resident tensor program per param group.

``compiled_adamw.AdamW`` is a drop-in ``torch.optim.AdamW``; the update itself is the pure
functions of :mod:`compiled_adamw.update`. :mod:`compiled_adamw.functional` is the same AdamW as
``init``/``update`` over a typed state, :func:`unroll` runs differentiable inner loops on a module,
and :mod:`compiled_adamw.capture` captures whole training iterations in a CUDA graph.
"""

from . import functional
from .capture import CapturedIteration, CaptureError, check_capturable
from .functional import AdamWState
from .inner_loop import Unrolled, unroll
from .optimizer import AdamW
from .update import Coefficients, adamw_coefficients, adamw_elementwise

__all__ = ["AdamW", "AdamWState", "CaptureError", "CapturedIteration", "Coefficients", "Unrolled",
           "adamw_coefficients", "adamw_elementwise", "check_capturable", "functional", "unroll"]
__version__ = "0.2.0"
