"""The one table of configurations and the one table of tolerances that drive the parity tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

STEPS = 12
# Param shapes of the scenario: 0-dim, empty, channels-last 4-D and ordinary ones; group 0 takes
# the first four, group 1 the rest.
SHAPES = [(4, 3), (), (0,), (2, 3, 2, 2), (5,), (2, 3, 4), (7,)]
CHANNELS_LAST = 3  # index of the param stored channels-last
SKIPPED = {1: {2, 5, 6}, 4: {0, 1}}  # param index -> steps on which its grad is None
NEVER_STEPPED = 6  # this param never gets a grad: no state, exactly as torch
GROUP_OPTIONS = [dict(), dict(lr=5e-3, weight_decay=0.1)]


@dataclasses.dataclass(frozen=True)
class Config:
    id: str
    dtype: torch.dtype = torch.float32
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_hyperparameters: bool = False

    @property
    def tolerance_key(self) -> torch.dtype:
        return self.dtype.to_real() if self.dtype.is_complex else self.dtype


BASE = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)

CONFIGS = [
    Config("float32"),
    Config("float32-tensor-hyperparameters", tensor_hyperparameters=True),
    Config("float32-amsgrad", kwargs=dict(amsgrad=True)),
    Config("float32-maximize", kwargs=dict(maximize=True)),
    Config("float64-amsgrad-maximize", torch.float64, dict(amsgrad=True, maximize=True)),
    Config("complex64", torch.complex64),
    Config("bfloat16", torch.bfloat16),
    Config("float16", torch.float16),
]

# Tolerances against torch.optim.AdamW (same dtype) and against the float64 oracle.
TOLERANCES = {
    # Same op order as torch; only Inductor's fused multiply-adds and torch's float64 scalars
    # rounded differently give an ulp or two per step.
    torch.float32: dict(torch=dict(rtol=1e-5, atol=1e-6), oracle=dict(rtol=1e-5, atol=1e-6)),
    torch.float64: dict(torch=dict(rtol=1e-12, atol=1e-13), oracle=dict(rtol=1e-12, atol=1e-13)),
    # Low precision: torch rounds to the param dtype after every op, we only once per step, so
    # results may differ by the rounding of each step's write-back: about one ulp per step, and
    # ulp(1) is 2**-7 for bfloat16, 2**-10 for float16. The oracle never rounds at all.
    torch.bfloat16: dict(torch=dict(rtol=2**-6, atol=2**-6), oracle=dict(rtol=2**-5, atol=2**-5)),
    # float16: torch's own rounding (eps=1e-8 vanishes, v underflows) puts it up to 6 ulps from
    # the oracle after 12 steps, measured; we are 4x closer. The bound is torch's error, not ours;
    # test_no_further_from_oracle_than_torch holds us to torch's accuracy or better.
    torch.float16: dict(torch=dict(rtol=2**-7, atol=2**-7), oracle=dict(rtol=2**-8, atol=2**-8)),
}
