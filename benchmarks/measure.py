"""How each figure is measured: interleaved step times, the bandwidth roof, peak extra memory,
recompiles over a scheduled run, and cold/warm compile time in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .contenders import Built, Contender, Unavailable
from .quiet import quiet_stderr
from .workloads import Workload

__all__ = ["compile_seconds", "each_after_itself", "first_step_in_fresh_process", "in_turn", "peak_extra_bytes",
           "recompiles_over_schedule", "roof_step", "summarize", "time_interleaved"]

Result = TypeVar("Result")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def in_turn(names: list[str], repetition: int) -> list[str]:
    """The ``len(names)`` calls of round ``repetition``: the rounds cut, in order, a stream of
    calls in which every contender follows every other exactly as often, round boundaries
    included, and each runs ``n - 1`` times in every ``n - 1`` rounds (a round may hold one
    contender twice). What ran just before changes the next one's caches and allocations: in the
    default loop on one 16M tensor, ours / fused iteration was 1.015-1.038 with ours always
    right after torch's foreach step (which frees param-sized temporaries) and 0.954-0.963 with
    fused there. The rounds were rotations of ``names`` until the ninth session, which with three
    contenders puts the first right after the third in two rounds of three and the second in one:
    ours after foreach twice as often as fused, which put ours' iteration at 1.006-1.021x
    fused's on the two large rows against 0.985-1.006x with this stream (a throwaway script, two
    runs of 30 rounds each way). Since the tenth session the timed calls go through
    :func:`each_after_itself`, so each follows one of its own; the balance here still spreads the
    machine's drift, and the untimed calls' predecessors, evenly.

    The stream is ``i, j`` for each pair ``i < j`` in order -- for three contenders
    ``a b a c b c`` -- an Eulerian circuit of the complete directed graph on the contenders:
    each ordered pair of distinct contenders is adjacent once per circuit, the last call's
    successor being the first (checked for 1-12 contenders in ``tests/test_benchmarks.py``)."""
    n = len(names)
    stream = [names[k] for i in range(n) for j in range(i + 1, n) for k in (i, j)] or names
    start = repetition * n % len(stream)
    return (stream[start:] + stream[:start])[:n]


def each_after_itself(calls: dict[str, Callable[[], Result]], repetitions: int) -> dict[str, list[Result]]:
    """What each of ``calls`` returns, ``repetitions`` times. The contenders take turns
    (:func:`in_turn`), so that the machine's drift falls on all of them alike, and in its turn each
    runs twice and only the second call is kept: a user's loop runs one optimizer, so what it
    meets is its own previous iteration, never another optimizer's. Measured (the default loop,
    ours, fused and foreach, a throwaway script, 300 rounds): on one param of 2^20 elements,
    ours / fused step 1.12 right after another contender and 0.91 right after itself, and each
    contender was faster after itself (fused 0.317 against 0.245 ms); on one 16M tensor, where
    nothing stays in cache, 1.00 either way."""
    results: dict[str, list[Result]] = {name: [] for name in calls}
    for repetition in range(repetitions):
        for name in in_turn(list(calls), repetition):
            calls[name]()
            results[name].append(calls[name]())
    return results


def time_interleaved(steps: dict[str, Callable[[], Any]], *, device: str, repetitions: int) -> dict[str, list[float]]:
    """Seconds per call of each step, already warmed up, the steps taking turns, each timed right
    after a call of its own (:func:`each_after_itself`)."""

    def timed(step: Callable[[], Any]) -> Callable[[], float]:
        def call() -> float:
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            return time.perf_counter() - start
        return call

    return each_after_itself({name: timed(step) for name, step in steps.items()}, repetitions)


def summarize(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds)}


def _stream(param: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> None:
    for s in state:
        s.mul_(0.5).add_(grad)
    param.add_(state[0])


def roof_step(workload: Workload, device: str) -> Callable[[], None]:
    """An in-place streaming kernel with the step's exact traffic: reads param, grad and the state
    and writes param and the state, once each, in one compiled pass. (A triad with a separate
    output would pay a hidden read of that output and understate the roof.)"""
    n, dtype = workload.elements, workload.dtype
    buffers = [torch.rand(n, device=device, dtype=dtype) for _ in range(5 if workload.amsgrad else 4)]
    # A fresh code object per workload: Dynamo's recompile limit counts per code object.
    code = _stream.__code__.replace(co_name=f"roof_{workload.name}".replace("-", "_"))
    stream = types.FunctionType(code, _stream.__globals__)
    compiled = torch.compile(stream, fullgraph=True, dynamic=False)
    return lambda: compiled(*buffers)


def peak_extra_bytes(step: Callable[[], Any], device: str) -> int:
    """The most memory one call of ``step`` holds beyond what existed before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as profile:
        step()
    events = sorted((e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def recompiles_over_schedule(built: Built, steps: int, *, budget_s: float | None = None) -> int | str:
    """Graphs Dynamo compiles during a OneCycleLR run of ``steps`` steps (after the first step,
    already taken): 0 is the target. Past ``budget_s`` seconds, the count so far, marked."""
    if not built.supports_schedulers:
        return "n/a: no torch.optim.lr_scheduler support"
    counters = torch._dynamo.utils.counters["stats"]
    before, started = counters["unique_graphs"], time.perf_counter()
    with warnings.catch_warnings():  # steps wrapped by the contender hide optimizer.step from the scheduler
        warnings.simplefilter("ignore", UserWarning)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(built.optimizer, max_lr=1e-2, total_steps=steps)
        for taken in range(1, steps):
            built.step()
            scheduler.step()
            if budget_s is not None and time.perf_counter() - started > budget_s:
                return f">= {counters['unique_graphs'] - before} in {taken} steps (budget)"
    return counters["unique_graphs"] - before


def first_step_in_fresh_process(contender: Contender, workload: Workload, *, device: str,
                                cache_dir: str | None, timeout: float) -> float | str:
    """Seconds of the first step (compile included) in a new Python process whose Inductor cache
    is ``cache_dir`` (None: this process's); a string saying why when it fails or runs past
    ``timeout``."""
    spec = json.dumps({"name": workload.name, "shapes": workload.shapes, "dtype": str(workload.dtype),
                       "amsgrad": workload.amsgrad})
    command = [sys.executable, "-m", "benchmarks.first_step", contender.name, spec, device]
    environment = {**os.environ, **({"TORCHINDUCTOR_CACHE_DIR": cache_dir} if cache_dir else {})}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s (stopped)"
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        return f"failed: {lines[-1][:200]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result.get("seconds", result.get("unavailable"))


def compile_seconds(contender: Contender, workload: Workload, *, device: str, cache_root: str,
                    timeout: float) -> dict[str, float | str]:
    """Cold (empty Inductor cache) and warm (the cache the cold run left) first-step seconds."""
    cache_dir = os.path.join(cache_root, f"{contender.name}-{workload.name}")
    cold = first_step_in_fresh_process(contender, workload, device=device, cache_dir=cache_dir, timeout=timeout)
    if not isinstance(cold, float):
        return {"cold_s": cold, "warm_s": "not measured: the cold run did not finish"}
    warm = first_step_in_fresh_process(contender, workload, device=device, cache_dir=cache_dir, timeout=timeout)
    return {"cold_s": cold, "warm_s": warm}


def build_or_reason(contender: Contender, params: list[torch.Tensor], workload: Workload) -> Built | str:
    try:
        return contender.build(params, workload)
    except Unavailable as reason:
        return f"unavailable: {reason}"
    except Exception as error:  # a contender's own failure is a row in the table, not a crash
        return f"failed to build: {type(error).__name__}: {error}"
