"""Every configuration of the table, compiled and eager, against torch.optim.AdamW and the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiled_adamw import AdamW

from .configs import CONFIGS, STEPS, TOLERANCES, Config
from .oracle import OracleAdamW
from .scenario import grads_at, group_split, hyperparameters, make_params, param_groups, set_grads


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).double().numpy()


MODES = {
    "compiled": dict(compile=True),
    "eager": dict(compile=False),
    # Autograd history through every step; the forward values must not change.
    "differentiable-compiled": dict(compile=True, differentiable=True),
    "differentiable-eager": dict(compile=False, differentiable=True),
}


@pytest.fixture(params=list(MODES))
def mode(request) -> dict:
    return MODES[request.param]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_matches_torch_and_oracle(config: Config, mode: dict):
    ours_params, torch_params = make_params(config), make_params(config)
    if mode.get("differentiable"):
        # Differentiable steps update params in place with history: they must not be leaves.
        ours_params = [p.clone() for p in ours_params]
    strides = [p.stride() for p in ours_params]
    ours = AdamW(param_groups(ours_params, config, tensors=config.tensor_hyperparameters),
                 **mode, **config.kwargs)
    reference = torch.optim.AdamW(param_groups(torch_params, config), **config.kwargs)
    oracles = [OracleAdamW([_numpy(p) for p in members], **config.kwargs)
               for members in group_split(ours_params)]

    for step in range(STEPS):
        grads = grads_at(step, config)
        set_grads(ours_params, grads)
        set_grads(torch_params, grads)
        ours.step()
        reference.step()
        for index, (oracle, members) in enumerate(zip(oracles, group_split(grads))):
            oracle.step([None if g is None else _numpy(g) for g in members], **hyperparameters(index))

    tolerance = TOLERANCES[config.tolerance_key]
    for i, (mine, theirs) in enumerate(zip(ours_params, torch_params)):
        assert mine.stride() == strides[i], f"param {i} lost its layout"
        torch.testing.assert_close(mine, theirs, **tolerance["torch"], msg=lambda m: f"param {i}: {m}")
        assert set(ours.state.get(mine, {})) == set(reference.state.get(theirs, {})), f"param {i} state keys"
        for key, value in reference.state.get(theirs, {}).items():
            if key == "step":
                assert ours.state[mine]["step"].item() == value.item(), f"param {i} step"
            else:
                torch.testing.assert_close(ours.state[mine][key], value, **tolerance["torch"],
                                           msg=lambda m: f"param {i} {key}: {m}")
    exact = [x for oracle in oracles for x in oracle.params]
    for i, (mine, theirs, truth) in enumerate(zip(ours_params, torch_params, exact)):
        # No further from the exact algorithm than torch.optim.AdamW is, give or take one ulp.
        ulp = torch.finfo(config.tolerance_key).eps * float(np.abs(truth).max(initial=1.0))
        ours_error = np.abs(_numpy(mine) - truth).max(initial=0.0)
        torch_error = np.abs(_numpy(theirs) - truth).max(initial=0.0)
        assert ours_error <= torch_error + ulp, f"param {i}: {ours_error} from the oracle, torch {torch_error}"
    for oracle, members in zip(oracles, group_split(ours_params)):
        for j, p in enumerate(members):
            np.testing.assert_allclose(_numpy(p), oracle.params[j], **tolerance["oracle"])
            if p in ours.state:
                np.testing.assert_allclose(_numpy(ours.state[p]["exp_avg"]), oracle.m[j], **tolerance["oracle"])
                np.testing.assert_allclose(_numpy(ours.state[p]["exp_avg_sq"]), oracle.v[j], **tolerance["oracle"])
