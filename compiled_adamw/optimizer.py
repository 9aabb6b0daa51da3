"""``compiled_adamw.AdamW``: torch.optim.AdamW's API and numbers, with a compiled flat step.

The class only keeps books -- groups, buckets, state, hooks, dispatch. The math is
:mod:`compiled_adamw.update`, run per bucket by :mod:`compiled_adamw.kernels`; where params',
grads' and state's memory lives is :mod:`compiled_adamw.flat_bucket` (Note [where memory lives]);
hyperparameter tensors and param groups are :mod:`compiled_adamw.hyperparameters`.
"""

from __future__ import annotations

import itertools
import math
import operator
import types
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .flat_bucket import STATE_KEYS, FlatBucket, StepPlan, check_grad, group_into_buckets, is_sharded
from .functional import group_key, step_together
from .hyperparameters import (GROUP_KEYS, OPTIONAL_DEFAULTS, SCALAR_NAMES, GroupSettings, ParamGroup, check_value,
                              group_value)
from .kernels import differentiable_kernel, own_code_copy, update_kernel
from .opaque_step import grad_norm_alone, register, step_alone, step_opaquely, traced_alone
from .written_state import ParamState, WatchedState

__all__ = ["AdamW"]


class AdamW(torch.optim.Optimizer):
    r"""AdamW with the API, state_dict format and numbers of :class:`torch.optim.AdamW`.

    Each step updates the params of a group that share a device and dtype with a few calls of one
    compiled elementwise kernel over flat state buffers (Note [where memory lives] in
    ``flat_bucket.py``). lr, betas, eps, weight_decay and every step counter are tensors on the
    params' device: no host sync, no recompile when a scheduler changes a value, and the step can
    be graph-captured. Param groups hold what you assign, floats included, as torch's do
    (Note [a group holds what the user gave] in ``hyperparameters.py``).

    The update, for step ``t`` (see :mod:`compiled_adamw.update` for the exact equations)::

        param = param * (1 - lr * wd) - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as in torch.optim.AdamW. ``amsgrad``
            and ``maximize`` are static: each combination compiles its own kernel.
        foreach, fused, capturable: accepted and stored for drop-in compatibility; they change
            nothing, since the step is always a fused kernel and always capturable.
        differentiable: as in torch.optim.AdamW: ``step()`` runs with grad enabled and keeps
            autograd history through the update, to params (updated in place, so they must not
            be leaves that require grad), state, grads and tensor hyperparameters. No flat buffers
            then: params stepped together are concatenated for each step (Note [differentiable
            runs]).
        eps_root: keyword-only, ours (optax's and TorchOpt's): added under the square root, for
            finite meta-gradients where a gradient entry is 0 (Note [eps_root] in ``update.py``).
            The default 0 gives torch's numbers.
        compile: keyword-only, ours. ``True`` runs the step through ``torch.compile`` (Inductor);
            ``False`` runs the very same functions eagerly. The default is ``True``, except with
            ``differentiable=True`` (Note [differentiable runs eagerly by default]).
    """

    # Note [AMP inside the step]: torch.amp.GradScaler hands us ``grad_scale`` and ``found_inf``
    # (as attributes, during ``scaler.step(opt)``) instead of unscaling and checking on the host.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_root: float | Tensor = 0.0,
        compile: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
                        eps_root=eps_root)
        for name in SCALAR_NAMES:
            check_value(name, group_value(defaults, name))
        self.differentiable = bool(differentiable)
        # Note [differentiable runs eagerly by default]: AOTAutograd's compiled backward is not
        # itself differentiable and refuses retain_graph=True and vmap, so gradcheck (which uses
        # both), second derivatives and batched grads would fail; measured, compiling bought
        # nothing there (2.98 ms against 2.92 ms eager per inner step, README).
        self.compile = (not self.differentiable) if compile is None else bool(compile)
        self._settings: list[GroupSettings] = []  # what the step reads of each group
        self._buckets: list[list[FlatBucket]] = []
        self._step_called = [False]
        self._clip: list[Tensor | None] = [None]  # Note [clipping inside the step]
        self._state_written = [False]  # Note [state the user writes]
        self._register_for_traces()
        super().__init__(params, defaults)
        self._state_written[0] = False  # torch's __init__ assigned the empty state

    @property
    def state(self) -> WatchedState:
        """As torch's ``optimizer.state``: each param's state, in torch.optim.AdamW's format. What
        you write here is what the next step uses (Note [state the user writes])."""
        return self._state

    @state.setter
    def state(self, values: dict[Any, Any]) -> None:
        self._state_written[0] = True
        self._state = WatchedState(values, self._state_written)

    # ---- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._follow_param_groups()
        with warnings.catch_warnings():  # we refuse duplicates below, naming them
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            if bool(group["differentiable"]) != self.differentiable:
                raise ValueError(f"param_groups[{index}] has differentiable={group['differentiable']}, "
                                 f"the optimizer was built with differentiable={self.differentiable}")
            seen: dict[Tensor, int] = {}
            for position, p in enumerate(group["params"]):
                if p in seen:
                    raise ValueError(f"{_param_name(index, position)} is the same tensor as "
                                     f"{_param_name(index, seen[p])}; a param may appear once")
                seen[p] = position
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(f"{_param_name(index, position)} is {p.dtype}; AdamW needs "
                                     "floating-point or complex params")
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            settings = GroupSettings(group, device, f"param_groups[{index}]")
            group = ParamGroup(group, settings)
        except Exception:
            self.param_groups.pop()
            raise
        self.param_groups[index] = group
        self._settings.append(settings)
        with torch.no_grad():  # no flat buffers when differentiable: Note [differentiable runs]
            self._buckets.append([] if self.differentiable
                                 else group_into_buckets(group["params"], amsgrad=group["amsgrad"]))
            carried = {p: self.state[p] for p in group["params"] if self.state.get(p)}
            for bucket in self._buckets[-1] if carried else ():  # Note [groups changed by hand]
                bucket.load_state(carried, self.state)

    # Note [groups changed by hand]: ``param_groups`` is a plain list of dicts, as torch's, and
    # torch steps whatever it holds. Ours steps the groups and params it built (``_settings``,
    # ``_buckets``), so an eager step, ``clip_grad_norm_``, ``add_param_group`` and
    # ``load_state_dict`` first follow the list: a group appended by hand, or one whose "params"
    # list was changed in place, is built as ``add_param_group`` builds one; a group removed is
    # no longer stepped (its params keep their state, as torch's do); the order is the list's;
    # and a param that already has state continues from it. Checking costs a look at each group
    # and an identity check of its params (one C call). A step inside a user's compile cannot
    # rebuild (it must not read the groups): its body raises, naming what to do.

    def _groups_as_built(self) -> bool:
        groups, built = self.param_groups, self._settings
        if len(groups) != len(built):
            return False
        for group, settings in zip(groups, built):  # a loop: a generator costs a step 0.2 us more
            if getattr(group, "settings", None) is not settings or not _same_params(group["params"], settings):
                return False
        return True

    def _state_as_loaded(self) -> bool:
        """Note [state the user writes]: nothing written into ``optimizer.state`` since the
        buckets last loaded it."""
        if self._state_written[0]:
            return False
        for buckets in self._buckets:
            for bucket in buckets:
                if bucket.step_count_written():
                    return False
        return True

    def _refuse_groups_changed_by_hand(self) -> None:
        """Note [groups changed by hand]: what a step inside a user's compile does instead."""
        if not self._groups_as_built():
            raise RuntimeError("optimizer.param_groups was changed by hand (a group appended, removed or replaced, "
                               "or a group's params) and a step inside torch.compile cannot follow it: call "
                               "optimizer.step() once outside torch.compile, or add groups with add_param_group")

    def _follow_param_groups(self) -> None:
        """Note [groups changed by hand]. Raises (as ``add_param_group`` would, for a group
        appended by hand) before anything changes."""
        if self._groups_as_built():
            return
        users_list, built = self.param_groups, {id(s): b for s, b in zip(self._settings, self._buckets)}
        before = self._settings, self._buckets
        self.param_groups, self._settings, self._buckets = [], [], []
        try:
            for group in users_list:
                settings = getattr(group, "settings", None)
                if id(settings) in built and _same_params(group["params"], settings):
                    self.param_groups.append(group)
                    self._settings.append(settings)
                    self._buckets.append(built[id(settings)])
                else:
                    self.add_param_group(dict(group))
        except Exception:
            self.param_groups, (self._settings, self._buckets) = users_list, before
            raise
        users_list[:] = self.param_groups
        self.param_groups = users_list
        for index, settings in enumerate(self._settings):
            settings.where = f"param_groups[{index}]"

    # ---- copies and older checkpoints ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` keep: torch's fields,
        our options and a pending clip (Note [clipping inside the step]: the copy's next step
        clips as the original's would); the buckets are rebuilt from them."""
        return {**super().__getstate__(), "param_groups": [dict(g) for g in self.param_groups],
                "compile": self.compile, "differentiable": self.differentiable, "_pending_clip": self._clip[0]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch.optim.AdamW's: fills what older checkpoints lack. torch's ``load_state_dict``
        calls it too; an unpickled or copied optimizer (which has no buckets yet) is rebuilt."""
        pending_clip = state.pop("_pending_clip", None)
        if "_state_written" not in self.__dict__:  # unpickled or copied
            self._state_written = [False]
        # torch's __setstate__ writes the dict the ``state`` property reads past it.
        params_state = state.pop("state", None)
        super().__setstate__(state)
        if params_state is not None:
            self.state = params_state
        for group in self.param_groups:
            for key, default in {**_TORCH_DEFAULTS, **OPTIONAL_DEFAULTS}.items():
                group.setdefault(key, default)
            group["decoupled_weight_decay"] = True
            group["differentiable"] = self.differentiable
        if "_buckets" not in self.__dict__:
            self._rebuild()
            self._clip[0] = pending_clip

    def _rebuild(self) -> None:
        groups, state = self.param_groups, self.state
        self.param_groups, self.state, self._settings, self._buckets = [], defaultdict(dict), [], []
        self._step_called, self._clip = [False], [None]
        self._register_for_traces()
        for group in groups:
            self.add_param_group(group)
        self.state.update(state)
        self._load_state_into_buckets()

    def _register_for_traces(self) -> None:
        """What a user's trace finds this optimizer by (Note [one opaque step in a user's trace]),
        the frames traced with the op that takes the params (Note [a step alone with the
        params]), and the step function whose frame ``torch.compile(opt.step)`` compiles (Note [a
        step frame per optimizer])."""
        self._handle = register(self)
        self._handle_name = str(self._handle)
        self._traced_with_others: weakref.WeakSet[types.CodeType] = weakref.WeakSet()
        self._traced_param_pointers: list[int] = []  # Note [a param the graph wrote before the step]
        self.step = _step_of_its_own(self)

    # ---- the step -----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step over every param that has a grad; returns ``closure()``'s loss."""
        self._step_called[0] = True  # Note [a step that schedulers need not wrap]
        if self.differentiable:
            tracing = torch.compiler.is_compiling()
            return (_differentiable_step_outside_the_graph if tracing else _differentiable_step)(self, closure)
        loss = _loss_of(closure)
        tracing = torch.compiler.is_compiling()
        if not tracing and not self._groups_as_built():
            self._follow_param_groups()
        scaler = self._grad_scaling()
        # A user's compile must not read the groups (GroupSettings' docstring), and traces only
        # what the graph may change: grads and hyperparameters (Note [one opaque step in a
        # user's trace]); only the hyperparameters when nothing else in the graph touches the
        # params or grads (Note [a step alone with the params]).
        hyperparameters = [settings.packed(settings.device, scaler) for settings in self._settings]
        # A clip alone multiplies the grads; a GradScaler's found_inf may also skip the step.
        scaled, skippable = scaler is not None, getattr(self, "found_inf", None) is not None
        if not tracing:
            self._step_buckets(self._grads(), hyperparameters, scaled, skippable)
        else:
            with torch.no_grad():
                if closure is None and traced_alone(self):
                    step_alone(self, hyperparameters, scaled, skippable)
                else:
                    step_opaquely(self, self._grads(), hyperparameters, scaled, skippable)
        self._clip[0] = None
        return loss

    def _grads(self) -> list[Tensor | None]:
        """The params' grads, in bucket order (``_step_buckets``' argument)."""
        return [p.grad for buckets in self._buckets for bucket in buckets for p in bucket.params]

    def _step_buckets(self, grads: list[Tensor | None], hyperparameters: list[Tensor], scaled: bool,
                      skippable: bool) -> None:
        """The step proper, eager Python around our compiled kernels: ``grads`` are the params'
        in bucket order, ``hyperparameters`` each group's packed vector; ``scaled``: divide the
        grads by ``grad_scale``; ``skippable``: skip the step where ``found_inf`` (Note [AMP
        inside the step])."""
        if not self._state_as_loaded():
            self._load_written_state()
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad(), at a fifth of its 1.1 us
        try:
            remaining = iter(grads)
            plans = [[bucket.plan(_namer(index), list(itertools.islice(remaining, len(bucket.params))))
                      for bucket in buckets] for index, buckets in enumerate(self._buckets)]
            # Everything above only reads; from here on, nothing raises on bad input.
            for index, settings in enumerate(self._settings):
                if any(plan.changed for plan in plans[index]):
                    plans[index] = self._rebuild_buckets(index, plans[index])
                for bucket in self._buckets[index]:
                    bucket.set_amsgrad(settings.amsgrad, self.state)
                    bucket.init_state(self.state)
                for bucket, plan in zip(self._buckets[index], plans[index]):
                    self._step_bucket(settings, bucket, plan, hyperparameters[index], scaled, skippable)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def _grad_scaling(self) -> Tensor | None:
        """``[grad_scale, found_inf]`` for this step, float64 on the device: the step divides the
        grads by ``grad_scale`` and is skipped where ``found_inf`` is 1; None when the grads are
        used as they are. A GradScaler stepping us sets both (Note [AMP inside the step]);
        ``grad_scale`` is None once the grads were unscaled (``scaler.unscale_(opt)`` before
        clipping). A pending clip coefficient divides ``grad_scale`` (Note [clipping inside the
        step])."""
        grad_scale, found_inf, clip = getattr(self, "grad_scale", None), getattr(self, "found_inf", None), self._clip[0]
        if grad_scale is None and found_inf is None and clip is None:
            return None
        # A GradScaler hands over found_inf as the int 0 where no param has a grad (a sum of no
        # tensors), so a number is taken as its value.
        tensors = [value for value in (found_inf, grad_scale, clip) if isinstance(value, Tensor)]
        device = tensors[0].device if tensors else self._settings[0].device if self._settings else torch.device("cpu")
        grad_scale, found_inf = (given.reshape(()).to(torch.float64) if isinstance(given, Tensor)
                                 else torch.full((), default if given is None else float(given), dtype=torch.float64,
                                                 device=device)
                                 for given, default in ((grad_scale, 1.0), (found_inf, 0.0)))
        if clip is not None:
            grad_scale = grad_scale / clip.to(grad_scale)
        return torch.stack([grad_scale, found_inf])

    # Note [clipping inside the step]: ``clip_grad_norm_`` only measures -- one ``_foreach_norm``
    # per device and dtype, torch's own ``get_total_norm`` -- and keeps the coefficient
    # ``min(1, max_norm / (norm + 1e-6))`` (torch's clip_grad_norm_'s) on the device. The next step
    # multiplies each grad by it in its elementwise pass, as it unscales a GradScaler's grads: no
    # pass that writes the grads, no host sync. ``p.grad`` keeps the unclipped values; the
    # coefficient belongs to the grads it measured, so ``zero_grad`` drops it, and a step uses it
    # once. It lives in a list, which Dynamo lets a user's compile write (Note [a step that
    # schedulers need not wrap]).

    def clip_grad_norm_(self, max_norm: float | Tensor, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> Tensor:
        """Clip the grads of all params to a total ``norm_type``-norm of ``max_norm`` inside the next
        ``step()`` (Note [clipping inside the step]); returns the total norm, as
        ``torch.nn.utils.clip_grad_norm_`` does. Call it right before ``step()``; with a GradScaler,
        after ``scaler.unscale_(optimizer)``, so that the norm is the unscaled grads'.
        ``error_if_nonfinite=True`` reads the norm on the host to raise, as torch's does."""
        if torch.compiler.is_compiling() and not self.differentiable and traced_alone(self):
            total = grad_norm_alone(self, float(norm_type), error_if_nonfinite)
        else:
            if not torch.compiler.is_compiling():
                self._follow_param_groups()
            total = self._total_grad_norm(norm_type, error_if_nonfinite)
        self._clip[0] = torch.clamp(max_norm / (total + 1e-6), max=1.0).detach()
        return total

    def _total_grad_norm(self, norm_type: float, error_if_nonfinite: bool) -> Tensor:
        """The total ``norm_type``-norm of the params' grads, as ``clip_grad_norm_`` returns it."""
        grads = [_grad_of(p) for settings in self._settings for p in settings.params]
        grads = [grad for grad in grads if grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        return total.full_tensor() if is_sharded(total) else total

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clip[0] = None  # Note [clipping inside the step]
        super().zero_grad(set_to_none)

    # Note [a step that schedulers need not wrap]: torch's LR schedulers replace ``opt.step`` with a
    # wrapper (defined in lr_scheduler.py, a file Dynamo refuses to trace) that records
    # ``opt._opt_called`` -- unless the step already says it is wrapped. Ours records it itself,
    # so ``opt.step()`` stays traceable inside a user's ``torch.compile(fullgraph=True)``. It
    # records it in a list: Dynamo drops attribute writes on optimizers, not list writes.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    @property
    def _opt_called(self) -> bool:
        return self._step_called[0]

    def _rebuild_buckets(self, index: int, plans: list[StepPlan]) -> list[StepPlan]:
        """A param of group ``index`` changed dtype, device or shape (``model.half()``,
        ``model.to(...)``): new buckets at the params' new home, the state carried over as
        ``load_state_dict`` would carry it (cast to the param's dtype, on its device)."""
        settings = self._settings[index]
        grad_of = {p: grad for bucket, plan in zip(self._buckets[index], plans)
                   for p, grad in zip(bucket.params, plan.grads)}
        carried = {p: dict(self.state[p]) for p in settings.params if p in self.state}
        self._buckets[index] = group_into_buckets(settings.params, amsgrad=settings.amsgrad)
        for bucket in self._buckets[index]:
            bucket.load_state(carried, self.state)
        if settings.params:
            settings.move_to(settings.params[0].device)
        return [bucket.plan(_namer(index), [grad_of[p] for p in bucket.params]) for bucket in self._buckets[index]]

    def _step_bucket(self, settings: GroupSettings, bucket: FlatBucket, plan: StepPlan, hyperparameters: Tensor,
                     scaled: bool, skippable: bool) -> None:
        if bucket.device != settings.device:  # a group whose params span devices
            hyperparameters = hyperparameters.to(bucket.device, non_blocking=True)
        bucket.execute(
            plan,
            update_kernel(bucket.device.type, bucket.real_dtype, settings.amsgrad, settings.maximize, scaled,
                          skippable, self.compile),
            hyperparameters,
            step_increment=_not_found(hyperparameters, bucket.device) if skippable else 1,
        )

    def _step_differentiable(self, params: list[Tensor], settings: GroupSettings, scaler: Tensor | None) -> None:
        """Note [differentiable runs]: params whose step counts are views of one vector (they have
        always been stepped together, which the host knows without reading a value) and share a
        dtype are stepped by one call of :func:`~compiled_adamw.functional.step_together`. Params
        are written in place (``copy_`` keeps their identity and records the history); state
        entries are replaced by the new tensors, and the members of a run get views of one new
        vector of counts, each a count of its own to write (Note [state the user writes])."""
        amsgrad, maximize = settings.amsgrad, settings.maximize
        runs: dict[tuple, list[Tensor]] = {}
        fresh_steps: dict[torch.device, Tensor] = {}
        for p in params:
            if _grad_of(p) is None:
                continue
            state = self.state[p]
            if not state:
                if p.device not in fresh_steps:
                    fresh_steps[p.device] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["step"] = fresh_steps[p.device]
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            runs.setdefault((_run_of(state["step"]), *group_key(p)), []).append(p)
        hyperparameters: dict[torch.device, Tensor] = {}
        for (_, real_dtype, _, device), members in runs.items():
            if device not in hyperparameters:
                hyperparameters[device] = settings.packed(device, scaler)
            states = [self.state[p] for p in members]
            # A new tensor, not add_: the step may have saved the old one for backward.
            step = states[0]["step"].detach() + (1 if scaler is None else _not_found(scaler, device))
            new = step_together(
                members, [_grad_of(p) for p in members], *([s[key] for s in states] for key in STATE_KEYS[:2]),
                [s["max_exp_avg_sq"] for s in states] if amsgrad else None, step, hyperparameters[device],
                amsgrad=amsgrad, maximize=maximize, scaled=scaler is not None, skippable=scaler is not None,
                kernel=differentiable_kernel(device.type, real_dtype, amsgrad, maximize, scaler is not None,
                                             scaler is not None, self.compile))
            for p, state, count, new_param, *new_state in zip(members, states, step.repeat(len(members)),
                                                              *(column or [None] * len(members) for column in new)):
                p.copy_(new_param)
                state["step"] = count
                for key, value in zip(STATE_KEYS, new_state):
                    if value is not None:
                        state[key] = value

    # ---- state dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        # Plain dicts, which ``torch.load(weights_only=True)`` reads (Note [state the user writes]).
        state_dict["state"] = {key: dict(values) if isinstance(values, ParamState) else values
                               for key, values in state_dict["state"].items()}
        if self.differentiable:
            _unshare_steps(state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the whole checkpoint is validated before anything changes, and the
        loaded values are copied into the existing buffers and hyperparameter vectors (a captured
        CUDA graph keeps reading them); the user's load post-hooks see the loaded optimizer."""
        def finish(optimizer: AdamW) -> None:
            for index, (group, settings) in enumerate(zip(optimizer.param_groups, optimizer._settings)):
                for key in GROUP_KEYS:
                    group[key] = _on_device(group[key], settings.device)
                optimizer.param_groups[index] = ParamGroup(group, settings)
            optimizer._load_state_into_buckets()

        self._follow_param_groups()
        validate = self.register_load_state_dict_pre_hook(_validate_checkpoint)
        finished = self.register_load_state_dict_post_hook(finish, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            validate.remove()
            finished.remove()

    def _load_written_state(self) -> None:
        """Note [state the user writes]: what ``optimizer.state`` holds now is what this step uses;
        each param's entry is validated first, naming it."""
        for index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                values = self.state.get(p)
                if values is not None:
                    _validate_param_state(values, p, False, f"optimizer.state[{_param_name(index, position)}]")
        self._load_state_into_buckets()

    def _load_state_into_buckets(self) -> None:
        """Copy ``optimizer.state`` into the buckets; ``optimizer.state`` then holds their views."""
        with torch.no_grad():
            loaded = dict(self.state)
            for settings, buckets in zip(self._settings, self._buckets):
                for bucket in buckets:
                    bucket.set_amsgrad(settings.amsgrad, self.state)
                    bucket.load_state(loaded, self.state)
            if self.differentiable:
                _share_equal_steps(self)
        self._state_written[0] = False


def _loss_of(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _differentiable_step(optimizer: AdamW, closure: Callable[[], Any] | None) -> Any:
    """The body of ``step()`` with ``differentiable=True`` (Note [differentiable runs])."""
    loss = _loss_of(closure)
    optimizer._follow_param_groups()
    scaler = optimizer._grad_scaling()
    for index, group in enumerate(optimizer.param_groups):
        _check_differentiable_group(index, group)
    with torch.enable_grad():
        for group, settings in zip(optimizer.param_groups, optimizer._settings):
            optimizer._step_differentiable(group["params"], settings, scaler)
    optimizer._clip[0] = None
    return loss


# Note [a differentiable step in a user's compile]: torch's differentiable AdamW breaks the graph
# (``torch._dynamo.graph_break()`` in its step) and runs its update eagerly. Ours runs outside the
# graph too: its bookkeeping -- the groups, the state's watched dicts, the runs found by version
# counters, new state tensors at every step -- is Python that Dynamo either cannot trace (it
# failed with an internal error on the groups) or could not see written in place. The update
# itself is our compiled kernel when ``compile=True``, and autograd records it all the same: a
# hypergradient through the user's compiled function flows through the step.
# ``compiled_adamw.functional.update`` is the step to trace into a graph (``fullgraph=True``).
_differentiable_step_outside_the_graph = torch.compiler.disable(
    _differentiable_step, reason="compiled_adamw: a differentiable step runs outside the graph, as torch's "
    "differentiable AdamW does (Note [a differentiable step in a user's compile]); trace "
    "compiled_adamw.functional.update instead to keep it in the graph")


def _step_of_its_own(optimizer: AdamW) -> Callable[..., Any]:
    """Note [a step frame per optimizer]: ``torch.compile(opt.step)`` compiles the frame of the
    function ``opt.step`` is. On the class that is torch's step wrapper, whose code object every
    optimizer shares; Dynamo guards an optimizer by identity and keeps a cache entry per optimizer
    on that code object, entries of optimizers since freed included. Past
    ``torch._dynamo.config.recompile_limit`` (8) it raises under ``fullgraph=True`` and otherwise
    warns and runs the step uncompiled (measured, torch 2.13: the ninth optimizer of a process
    whose step was compiled with ``fullgraph=True`` failed, the eight before it deallocated; with
    torch's AdamW and no fullgraph, no graph was compiled for the ninth and tenth). So each
    optimizer's ``step`` is an attribute of its own: a function with a code object of its own that
    calls the class's step (hooks and all). It holds the optimizer by a weak reference, so the
    optimizer is still freed when its last reference goes; a user's function compiled once and
    called with one optimizer after another still shares its own code object, which only the user
    can give more room."""
    optimizer_ref = weakref.ref(optimizer)

    def step(*args: Any, **kwargs: Any) -> Any:
        stepped = optimizer_ref()
        return type(stepped).step(stepped, *args, **kwargs)

    own = own_code_copy(step, "step")
    own.__doc__ = AdamW.step.__doc__
    own._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # Note [a step that schedulers need not wrap]
    return own


def _param_name(group: int, position: int) -> str:
    return f"param_groups[{group}]['params'][{position}]"


# What torch.optim.AdamW's __setstate__ gives a group that an older checkpoint lacks.
_TORCH_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "fused": None}


def _not_found(values: Tensor, device: torch.device) -> Tensor:
    """1 - found_inf (the last of ``values``, a scaler's or a packed vector), as a float32 step
    increment on ``device``: a skipped step does not count."""
    return (1 - values[-1]).to(device=device, dtype=torch.float32)


def _grad_of(p: Tensor) -> Tensor | None:
    """``p.grad`` without autograd's warning for a non-leaf param that has none (a differentiable
    step's params are non-leaf; their grads are set by hand)."""
    if p.is_leaf or p.retains_grad:
        return p.grad
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf", UserWarning)
        return p.grad


def _on_device(value: Any, device: torch.device) -> Any:
    """A loaded hyperparameter on the params' device: a checkpoint's tensor is nobody else's."""
    if isinstance(value, (tuple, list)):
        return type(value)(_on_device(v, device) for v in value)
    return value.to(device) if isinstance(value, Tensor) and value.device != device else value


def _same_params(params: list[Tensor], settings: GroupSettings) -> bool:
    """Whether a group's "params" are still those its buckets were built from (Note [groups
    changed by hand])."""
    return len(params) == len(settings.params) and all(map(operator.is_, params, settings.params))


def _check_differentiable_group(index: int, group: dict[str, Any]) -> None:
    for position, p in enumerate(group["params"]):
        if _grad_of(p) is None:
            continue
        name = _param_name(index, position)
        if p.is_leaf and p.requires_grad:
            raise RuntimeError(
                f"{name} is a leaf tensor that requires grad; differentiable=True updates params in "
                "place, which autograd forbids for such leaves. Step non-leaf copies (w = w0.clone()) "
                "or use compiled_adamw.functional.update, which returns new params")
        check_grad(name, _grad_of(p), p.device, p.dtype, p.shape)


def _namer(group: int) -> Callable[[int], str]:
    return lambda position: _param_name(group, position)


def _run_of(step: Tensor) -> int:
    """Note [differentiable runs]: the run a param's step count puts it in: the vector the count
    is a view of, unless a count was written into that vector in place since (its version
    counter)."""
    vector = step._base
    if vector is None or vector._version != 0:
        return id(step)
    return id(vector)


def _unshare_steps(state_dict: dict[str, Any]) -> None:
    """Each param gets a step tensor of its own in a checkpoint (Note [differentiable runs] gives
    params views of one vector): torch.optim.AdamW increments its step tensors in place."""
    for values in state_dict["state"].values():
        if isinstance(values, dict) and isinstance(values.get("step"), Tensor):
            values["step"] = values["step"].clone()


def _share_equal_steps(optimizer: AdamW) -> None:
    """Loaded params with equal step counts on a device get views of one vector of counts again,
    so they are stepped together (Note [differentiable runs]). Reads each count on the host, once."""
    equal: dict[tuple[float, torch.device], list[dict]] = {}
    for p, state in optimizer.state.items():
        if isinstance(p, Tensor) and isinstance(state, dict) and "step" in state:
            equal.setdefault((float(state["step"]), p.device), []).append(state)
    for (count, device), states in equal.items():
        for state, view in zip(states, torch.full((len(states),), count, dtype=torch.float32, device=device)):
            state["step"] = view


def _validate_checkpoint(optimizer: AdamW, state_dict: dict[str, Any]) -> None:
    """Every way a checkpoint can fail to fit, raised before torch's loader changes anything."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"optimizer state_dict has no {key!r} entry")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, the "
                         f"optimizer has {len(groups)}")
    state = state_dict["state"]
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        where = f"param_groups[{index}]"
        missing = [key for key in ("params", *GROUP_KEYS) if key not in saved and key not in OPTIONAL_DEFAULTS]
        if missing:
            raise ValueError(f"loaded {where} has no {', '.join(map(repr, missing))}")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} has {len(saved['params'])} params in the loaded state dict "
                             f"and {len(group['params'])} in the optimizer")
        for name in SCALAR_NAMES:
            check_value(name, group_value(saved, name), f"loaded {where}")
        for position, (param_id, param) in enumerate(zip(saved["params"], group["params"])):
            if param_id in state:
                where = f"loaded state[{param_id!r}] (for {_param_name(index, position)})"
                _validate_param_state(state[param_id], param, bool(saved.get("amsgrad", False)), where)
                unknown = set(state[param_id]) - {"step", *STATE_KEYS}
                if unknown:
                    raise ValueError(f"{where} has unexpected keys {sorted(unknown)}")


def _placement(value: Tensor) -> str:
    return f"{value.placements} on {value.device_mesh}" if is_sharded(value) else "a plain tensor"


def _validate_param_state(values: Any, param: Tensor, amsgrad: bool, where: str) -> None:
    """What a step needs of a param's state; an empty dict is no state (torch starts it afresh)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a dict, got {type(values).__name__}")
    if not values:
        return
    required = ("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()))
    for key in required:
        if key not in values:
            raise ValueError(f"{where} has no {key!r}")
    step = values["step"]
    if not ((isinstance(step, Tensor) and step.numel() == 1) or isinstance(step, (int, float))):
        raise ValueError(f"{where}['step'] must be a number or a 1-element tensor, got {step!r}")
    count = float(step)
    if not (math.isfinite(count) and count >= 0 and count == int(count)):
        raise ValueError(f"{where}['step'] is {count}; a step count is a whole number >= 0")
    for key in STATE_KEYS:
        if key not in values:
            continue
        value = values[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, the param has "
                             f"{tuple(param.shape)}")
        if value.is_complex() != param.is_complex() or not (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{where}[{key!r}] is {value.dtype}, which does not fit a {param.dtype} param")
        if is_sharded(param) and not (is_sharded(value) and value.placements == param.placements
                                      and value.device_mesh == param.device_mesh):
            raise ValueError(f"{where}[{key!r}] must be a DTensor sharded as its param is ({param.placements} on "
                             f"{param.device_mesh}), got {_placement(value)}; load sharded checkpoints with "
                             "torch.distributed.checkpoint, which reshards them")
