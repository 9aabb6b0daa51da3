"""``python -m benchmarks.loop``: the loop every tutorial writes -- ``zero_grad()`` (set_to_none),
backward, ``step()`` -- timed for ours and torch's fused and foreach AdamW, interleaved in one
process, taking turns, each iteration timed right after one of its own
(``measure.each_after_itself``); the same loop with global-norm clipping (``opt.clip_grad_norm_``
against ``torch.nn.utils.clip_grad_norm_``); on the workloads of many 1-D params, ours and fused
beside ``benchmarks.floor.FlatFloor``, the least a step over flat state can do; a single-tensor
size sweep; and the loop's peak memory, one fresh process per contender.

The backward is synthetic and the same for everyone: ``loss = sum((p * w).sum())`` over the
workload's params, so autograd hands each param a fresh grad (``w``'s copy) every iteration, as a
real backward does. Figures are medians; ``x fused`` divides by torch fused's from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from compiled_adamw import AdamW

from .floor import FlatFloor
from .measure import each_after_itself
from .workloads import Workload, standard_workloads

Build = Callable[[list[torch.Tensor], Workload], torch.optim.Optimizer]
CONTENDERS: dict[str, Build] = {
    "ours": lambda params, w: AdamW(params, lr=1e-3, amsgrad=w.amsgrad),
    "torch-fused": lambda params, w: torch.optim.AdamW(params, lr=1e-3, amsgrad=w.amsgrad, fused=True),
    "torch-foreach": lambda params, w: torch.optim.AdamW(params, lr=1e-3, amsgrad=w.amsgrad, foreach=True),
}
FLOOR: dict[str, Build] = {"ours": CONTENDERS["ours"], "torch-fused": CONTENDERS["torch-fused"],
         "flat-floor": lambda params, w: FlatFloor(params, lr=1e-3)}


class Loop:
    """One contender's params, optimizer and synthetic backward."""

    def __init__(self, name: str, workload: Workload, *, scalar_weights: bool = False, build: bool = True,
                 clip: float | None = None, contenders: dict[str, Build] = CONTENDERS):
        generator = torch.Generator().manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(workload.dtype))
                       for s in workload.shapes]
        self.weights = [torch.randn(() if scalar_weights else s, generator=generator).to(workload.dtype)
                        for s in workload.shapes]
        self.workload, self.clip, self.make = workload, clip, contenders[name]
        if build:
            self.build()

    def build(self) -> None:
        self.optimizer = self.make(self.params, self.workload)

    def backward(self) -> None:
        sum((p * w).sum() for p, w in zip(self.params, self.weights)).backward()

    def iteration(self) -> tuple[float, float]:
        """Seconds of the whole iteration and of its step."""
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.backward()
        before_step = time.perf_counter()
        if self.clip is not None:  # ours clips inside the step; torch's clip_grad_norm_ scales the grads
            if isinstance(self.optimizer, AdamW):
                self.optimizer.clip_grad_norm_(self.clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        end = time.perf_counter()
        return end - start, end - before_step


def interleaved(workload: Workload, repetitions: int, clip: float | None = None,
                contenders: dict[str, Build] = CONTENDERS) -> dict[str, dict[str, float]]:
    loops = {name: Loop(name, workload, clip=clip, contenders=contenders) for name in contenders}
    for loop in loops.values():
        for _ in range(3):
            loop.iteration()
    seconds = each_after_itself({name: loop.iteration for name, loop in loops.items()}, repetitions)
    rows = {name: {"iteration_ms": 1e3 * statistics.median(s[0] for s in values),
                   "step_ms": 1e3 * statistics.median(s[1] for s in values)} for name, values in seconds.items()}
    for row in rows.values():
        for key in ("iteration_ms", "step_ms"):
            row[key.replace("_ms", "_x_fused")] = row[key] / rows["torch-fused"][key]
    return rows


PEAK = """
import sys, torch
from benchmarks.loop import Loop
from benchmarks.workloads import Workload

def high_water_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

Loop(sys.argv[1], Workload("warm-up", ((64,),))).iteration()  # the compiler's own memory is not the loop's
loop = Loop(sys.argv[1], Workload("4x4096^2", ((4096, 4096),) * 4), scalar_weights=True, build=False)
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark here (it survives exec)
base = high_water_mib()
loop.build()
for _ in range(3):
    loop.iteration()
print(high_water_mib() - base)
"""


def peak_memory_mib(name: str) -> float:
    """Peak resident memory that building the optimizer and three iterations of the default loop
    add over the params (4 x 4096 x 4096 fp32, 256 MiB), in a fresh process: the high-water mark
    after them minus the one before. A warm-up on a tiny param first loads (and, for ours, runs)
    the compiler, whose own memory does not grow with the params."""
    out = subprocess.run([sys.executable, "-c", PEAK, name], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--sweep", type=int, nargs="+", default=list(range(10, 25, 2)), metavar="LOG2")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    arguments = parser.parse_args(argv)
    results: dict[str, Any] = {"torch": torch.__version__, "workloads": {}, "clipped": {}, "floor": {},
                               "sweep": {}, "peak_mib": {}}
    print("| workload | contender | step ms | x fused | iteration ms | x fused |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for workload in standard_workloads(arguments.scale):
        rows = results["workloads"][workload.name] = interleaved(workload, arguments.repetitions)
        for name, row in rows.items():
            print(f"| {workload.name} | {name} | {row['step_ms']:.2f} | {row['step_x_fused']:.2f}x | "
                  f"{row['iteration_ms']:.2f} | {row['iteration_x_fused']:.2f}x |", flush=True)
    print("\n| workload, clipped to norm 1 | contender | clip + step ms | x fused |\n| --- | --- | ---: | ---: |")
    for workload in standard_workloads(arguments.scale):
        rows = results["clipped"][workload.name] = interleaved(workload, arguments.repetitions, clip=1.0)
        for name, row in rows.items():
            print(f"| {workload.name} | {name} | {row['step_ms']:.2f} | {row['step_x_fused']:.2f}x |", flush=True)
    print("\n| workload | ours step ms | flat floor step ms | fused step ms | ours x fused | floor x fused |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for workload in standard_workloads(arguments.scale):
        if all(len(shape) == 1 for shape in workload.shapes) and len(workload.shapes) > 1:
            rows = results["floor"][workload.name] = interleaved(workload, arguments.repetitions, contenders=FLOOR)
            print(f"| {workload.name} | {rows['ours']['step_ms']:.2f} | {rows['flat-floor']['step_ms']:.2f} | "
                  f"{rows['torch-fused']['step_ms']:.2f} | {rows['ours']['step_x_fused']:.2f}x | "
                  f"{rows['flat-floor']['step_x_fused']:.2f}x |", flush=True)
    print("\n| elements | ours step ms | fused step ms | x fused |\n| ---: | ---: | ---: | ---: |")
    for log2 in arguments.sweep:
        rows = results["sweep"][2**log2] = interleaved(Workload(f"2^{log2}", ((2**log2,),)), 3 * arguments.repetitions)
        print(f"| 2^{log2} | {rows['ours']['step_ms']:.3f} | {rows['torch-fused']['step_ms']:.3f} | "
              f"{rows['ours']['step_x_fused']:.2f}x |", flush=True)
    print("\n| contender | peak extra MiB, default loop, 4 x 4096^2 fp32 (params 256 MiB) |\n| --- | ---: |")
    for name in CONTENDERS:
        results["peak_mib"][name] = peak_memory_mib(name)
        print(f"| {name} | {results['peak_mib'][name]:.0f} |", flush=True)
    if arguments.out:
        arguments.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
