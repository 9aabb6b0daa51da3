"""``optimizer.state`` as mappings that notice the user writing them.

Note [state the user writes]: torch.optim.AdamW steps whatever ``optimizer.state`` holds when the
step runs. Users write it: ``del optimizer.state[p]``, ``optimizer.state[p] = {}`` or
``optimizer.state.clear()`` to start params afresh (after pruning, in continual learning),
``optimizer.state[p]["exp_avg"] = ...`` to set a moment, ``state["step"].zero_()`` in place. Our
step reads flat buffers, of which ``optimizer.state[p]`` holds views, so an entry replaced or
removed would be shown to the user and not used: silent wrong state. So the mapping and each
param's dict are watched: every write to them raises one flag of the optimizer's, at the cost of
a dict method call. Writes into the views land in the buffers and need no notice, except the step
count's: a kernel call steps a run of params with one count (Note [step cohorts] in
``flat_bucket.py``), so an in-place write to ``state[p]["step"]`` is noticed by the version
counter of the tensor those views are made from, an alias of the counts of its own
(``FlatBucket.shown_steps``): the step's own writes, and a compiled graph's, bump the counts' and
not the alias's. A step that finds either loads ``optimizer.state`` into the buffers as
``load_state_dict`` loads a checkpoint (validated first, naming param and key), and then steps;
looking costs a step about 0.3 us. A param whose entry is gone or empty starts afresh, as
torch's does. Afterwards ``optimizer.state[p]`` holds views again: a tensor the user assigned
keeps its values but is no longer the optimizer's (as after ``load_state_dict``).

Both pickle as the plain ``defaultdict(dict)`` and ``dict`` torch's optimizer holds, and a
state_dict holds plain copies of the param dicts (torch's holds the live ones), which
``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

__all__ = ["ParamState", "WatchedState"]

_WRITES = ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update")


def _noting_write(name: str) -> Callable[..., Any]:
    write = getattr(dict, name)

    def method(self: ParamState | WatchedState, *args: Any, **kwargs: Any) -> Any:
        self.written[0] = True
        return write(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


class ParamState(dict):
    """One param's state as ``optimizer.state[p]`` holds it; a write raises ``written[0]``."""

    __slots__ = ("written",)

    def __init__(self, values: dict[str, Any], written: list[bool]):
        super().__init__(values)
        self.written = written

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


class WatchedState(defaultdict):
    """``optimizer.state``: a ``defaultdict`` whose missing entries are empty ``ParamState``\\ s (an
    empty entry is no state, so reading one is no write); any write raises ``written[0]``."""

    __slots__ = ("written",)

    def __init__(self, values: dict[Any, Any], written: list[bool]):
        super().__init__(None, values)
        self.written = written

    def __missing__(self, key: Any) -> ParamState:
        values = ParamState({}, self.written)
        dict.__setitem__(self, key, values)
        return values

    def keep(self, key: Any, values: dict[str, Any]) -> None:
        """The optimizer's own write: ``values`` as ``key``'s watched state, raising no flag."""
        dict.__setitem__(self, key, ParamState(values, self.written))

    def __reduce__(self) -> tuple:
        return defaultdict, (dict,), None, None, iter(self.items())


for _name in _WRITES:
    setattr(ParamState, _name, _noting_write(_name))
    setattr(WatchedState, _name, _noting_write(_name))
