"""One benchmark run: every contender on every workload, the scaling sweep, and the
differentiable step; returns the results as one JSON-ready dict."""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import tempfile
import time
from typing import Any, Callable

import torch

from . import differentiable
from .contenders import BASELINE, Contender
from .measure import (build_or_reason, compile_seconds, first_step_in_fresh_process, peak_extra_bytes,
                      recompiles_over_schedule,
                      roof_step, summarize, time_interleaved)
from .workloads import Workload, scaling_workloads, standard_workloads

__all__ = ["Settings", "run"]


@dataclasses.dataclass
class Settings:
    device: str = "cpu"
    scale: float = 1.0  # shrinks every workload; tests use a tiny one
    repetitions: int = 10
    warmup: int = 3
    schedule_steps: int = 100  # OneCycleLR steps over which recompiles are counted
    compile_times: bool = True  # cold/warm first-step times in fresh processes (slow)
    compile_timeout: float = 300.0
    scaling_total: int = 1 << 22  # elements shared by 10 ... 10,000 tensors
    scaling_counts: tuple[int, ...] = (10, 100, 1000, 10000)
    scaling_contenders: tuple[str, ...] = ("ours", "torch-fused", "torch-compiled")
    unroll_steps: int = 10  # inner steps of the differentiable benchmark
    sections: tuple[str, ...] = ("workloads", "scaling", "differentiable")
    budget_s: float | None = None  # seconds a contender may spend on one workload (warm-up, timing, schedule)


def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plan(contenders: list[Contender], settings: Settings,
         workloads: list[Workload] | None = None) -> list[tuple[str, list[Workload], list[Contender]]]:
    """What :func:`run` will measure: (section, workloads, contenders) in order."""
    sections = []
    if "workloads" in settings.sections:
        sections.append(("workloads", workloads if workloads is not None else standard_workloads(
            settings.scale, full_gpt2=settings.device == "cuda" and settings.scale >= 1), contenders))
    if settings.scaling_counts and "scaling" in settings.sections:
        total = max(settings.scaling_counts[-1], int(settings.scaling_total * settings.scale))
        sections.append(("scaling", scaling_workloads(total, settings.scaling_counts),
                         [c for c in contenders if c.name in settings.scaling_contenders]))
    return sections


def task_count(contenders: list[Contender], settings: Settings, workloads: list[Workload] | None = None) -> int:
    """How many times :func:`run` calls ``progress``: the progress bar's total."""
    count = int(bool(settings.unroll_steps and "differentiable" in settings.sections))
    for _, chosen, members in plan(contenders, settings, workloads):
        per_workload = len(members) + 1 + (sum(c.compiled for c in members) if settings.compile_times else 0)
        count += per_workload * len(chosen)
    return count


def run(contenders: list[Contender], settings: Settings, progress: Callable[[str], None] = lambda _: None,
        workloads: list[Workload] | None = None,
        measured: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Every contender on every workload (default: :func:`standard_workloads`), then the scaling
    sweep (if ``settings.scaling_counts``) and the differentiable step (if ``settings.unroll_steps``).
    ``measured`` receives the results so far after each workload, so an interrupted run keeps them."""
    results: dict[str, Any] = {"machine": machine(), "settings": dataclasses.asdict(settings),
                               "baseline": BASELINE, "workloads": [], "scaling": [], "differentiable": None}
    with tempfile.TemporaryDirectory(prefix="adamw-bench-cache-") as cache_root:
        for section, chosen, members in plan(contenders, settings, workloads):
            for workload in chosen:
                results[section].append(_workload(workload, members, settings, cache_root, progress,
                                                  scaling=section == "scaling"))
                measured(results)
    if settings.unroll_steps and "differentiable" in settings.sections:
        progress("differentiable")
        results["differentiable"] = differentiable.run(settings.unroll_steps, scale=settings.scale,
                                                       repetitions=max(3, settings.repetitions // 2),
                                                       contenders=[c.name for c in contenders])
        measured(results)
    return results


def _workload(workload: Workload, contenders: list[Contender], settings: Settings, cache_root: str,
              progress: Callable[[str], None], scaling: bool = False) -> dict[str, Any]:
    device = settings.device
    rows: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        row = rows[contender.name] = {"name": contender.name, "note": contender.note}
        if settings.compile_times and contender.compiled:
            progress(f"{workload.name}: {contender.name} first step in fresh processes")
            row.update(compile_seconds(contender, workload, device=device, cache_root=cache_root,
                                       timeout=settings.compile_timeout))
        elif settings.budget_s is not None and contender.compiled:
            # A compile cannot be stopped in this process: try it in a fresh one first, which also
            # warms the Inductor cache that the compile here then reads.
            probe = first_step_in_fresh_process(contender, workload, device=device, cache_dir=None,
                                                timeout=settings.budget_s)
            if not isinstance(probe, float):
                row["cold_s"] = probe.replace("(stopped)", "(over budget)")
    # A contender whose compile ran past the timeout is not stepped in this process either.
    steps: dict[str, Callable[[], Any]] = {}
    built: dict[str, Any] = {}
    for contender in contenders:
        row = rows[contender.name]
        if isinstance(row.get("cold_s"), str):
            row["status"] = row["cold_s"]
            continue
        progress(f"{workload.name}: {contender.name} warm-up")
        candidate = build_or_reason(contender, workload.make(device), workload)
        if isinstance(candidate, str):
            row["status"] = candidate
            continue
        try:
            started = time.perf_counter()
            for _ in range(1 + settings.warmup):  # the first step (compile) and warm-up, untimed
                candidate.step()
            spent = time.perf_counter() - started
        except Exception as error:
            row["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        steady = spent / (1 + settings.warmup)
        if settings.budget_s is not None and spent + steady * settings.repetitions > settings.budget_s:
            row["status"] = (f"over budget: {spent:.0f} s for the first {1 + settings.warmup} steps, "
                             f"budget {settings.budget_s:.0f} s")
            continue
        row["status"] = "ok"
        built[contender.name], steps[contender.name] = candidate, candidate.step
    steps["roof"] = roof_step(workload, device)
    for _ in range(1 + settings.warmup):
        steps["roof"]()
    progress(f"{workload.name}: timing {len(steps)} steps, interleaved")
    times = time_interleaved(steps, device=device, repetitions=settings.repetitions)
    roof = summarize(times.pop("roof"))
    roof["bandwidth_GBps"] = workload.bytes_per_step / roof["median_ms"] / 1e6
    for name, seconds in times.items():
        row = rows[name]
        row.update(summarize(seconds))
        row["bandwidth_GBps"] = workload.bytes_per_step / row["median_ms"] / 1e6
        row["roof_fraction"] = roof["median_ms"] / row["median_ms"]
        if not scaling:
            row["peak_extra_bytes"] = peak_extra_bytes(steps[name], device)
            contender = next(c for c in contenders if c.name == name)
            row["recompiles"] = (recompiles_over_schedule(built[name], settings.schedule_steps,
                                                          budget_s=settings.budget_s)
                                 if contender.compiled else 0)
    del built, steps
    gc.collect()
    _ratios_to_baseline(rows)
    return {"name": workload.name, "tensors": len(workload.shapes), "elements": workload.elements,
            "dtype": str(workload.dtype).removeprefix("torch."), "amsgrad": workload.amsgrad,
            "bytes_per_step": workload.bytes_per_step, "roof": roof, "contenders": list(rows.values())}


def _ratios_to_baseline(rows: dict[str, dict[str, Any]]) -> None:
    """Each figure divided by the baseline's (torch fused) from this same run; None where either
    is missing or the baseline's is 0."""
    baseline = rows.get(BASELINE, {})
    for row in rows.values():
        ratios = {}
        # The baseline compiles nothing: compile times have no ratio.
        for key in ("median_ms", "min_ms", "peak_extra_bytes"):
            mine, theirs = row.get(key), baseline.get(key)
            numbers = isinstance(mine, (int, float)) and isinstance(theirs, (int, float))
            ratios[key] = mine / theirs if numbers and theirs else None
        row["vs_" + BASELINE] = ratios
