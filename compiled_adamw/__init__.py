"""An AdamW whose step is one compiled, device-resident tensor program per param group.

``compiled_adamw.AdamW`` is a drop-in ``torch.optim.AdamW``; the update itself is the pure
functions of :mod:`compiled_adamw.update`.
"""

from .optimizer import AdamW
from .update import Coefficients, adamw_coefficients, adamw_elementwise

__all__ = ["AdamW", "Coefficients", "adamw_coefficients", "adamw_elementwise"]
__version__ = "0.1.0"
