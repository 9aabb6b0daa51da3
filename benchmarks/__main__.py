"""``python -m benchmarks``: measure, print the tables, write JSON and PNG, optionally the README.

Examples::

    python -m benchmarks                                 # the full run (tens of minutes on 2 cores)
    python -m benchmarks --quick                         # smaller sizes, no fresh-process compile times
    python -m benchmarks --readme README.md              # also rewrite the README's performance section
    python -m benchmarks --contenders ours torch-fused   # a subset
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .contenders import BASELINE, CONTENDERS, by_name
from .report import markdown, update_readme, write_json, write_plot
from .run import Settings, run, task_count
from .workloads import standard_workloads


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="+", metavar="NAME",
                        help="only these (torch-fused, the baseline, is always added); one of: "
                             + "; ".join(f"{c.name} ({c.note})" if c.note else c.name for c in CONTENDERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's size")
    parser.add_argument("--repetitions", type=int, default=10, help="timed steps per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--schedule-steps", type=int, default=100,
                        help="OneCycleLR steps over which recompiles are counted")
    parser.add_argument("--compile-timeout", type=float, default=300.0, help="seconds per fresh process")
    parser.add_argument("--no-compile-times", action="store_true",
                        help="skip the cold/warm first-step measurements in fresh processes")
    parser.add_argument("--scaling-counts", type=int, nargs="+", default=[10, 100, 1000, 10000],
                        help="tensor counts of the scaling section")
    parser.add_argument("--unroll-steps", type=int, default=10, help="inner steps of the differentiable section")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        help="only these standard workloads, of: " + ", ".join(w.name for w in standard_workloads()))
    parser.add_argument("--sections", nargs="+", default=["workloads", "scaling", "differentiable"],
                        choices=["workloads", "scaling", "differentiable"], help="which parts to measure (default: all)")
    parser.add_argument("--merge-into", type=Path,
                        help="a results JSON whose sections the measured ones replace (the rest is kept)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="what a contender may spend on one workload; over it, a row says so")
    parser.add_argument("--quick", action="store_true",
                        help="the fp32 workloads at --scale 0.1, --no-compile-times --repetitions 5 --budget 10 "
                             "--scaling-counts 10 100 1000 (under 5 minutes here)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    parser.add_argument("--readme", type=Path, help="rewrite this README's performance section")
    parser.add_argument("--from-json", type=Path, help="measure nothing: report the results in this JSON")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.scale, arguments.no_compile_times, arguments.repetitions = 0.1, True, 5
        arguments.budget = arguments.budget or 10.0
        arguments.scaling_counts = [10, 100, 1000]
        arguments.workloads = arguments.workloads or [w.name for w in standard_workloads(0.1) if "bf16" not in w.name]
    return arguments


def main(argv: list[str] | None = None) -> dict:
    arguments = _arguments(argv)
    # Contenders that recompile on every step make Dynamo warn when they reach its recompile
    # limit; the recompiles column reports the same thing, once.
    torch._logging.set_logs(dynamo=logging.ERROR)
    contenders = by_name(arguments.contenders)
    if BASELINE not in [c.name for c in contenders]:
        contenders.append(by_name([BASELINE])[0])
    settings = Settings(device=arguments.device, scale=arguments.scale, repetitions=arguments.repetitions,
                        warmup=arguments.warmup, schedule_steps=arguments.schedule_steps,
                        compile_times=not arguments.no_compile_times,
                        compile_timeout=arguments.compile_timeout,
                        scaling_counts=tuple(arguments.scaling_counts), unroll_steps=arguments.unroll_steps,
                        sections=tuple(arguments.sections), budget_s=arguments.budget)
    if arguments.from_json:
        results = json.loads(arguments.from_json.read_text())
    else:
        from tqdm import tqdm

        chosen = None
        if arguments.workloads:
            chosen = [w for w in standard_workloads(settings.scale) if w.name in arguments.workloads]
            unknown = set(arguments.workloads) - {w.name for w in chosen}
            if unknown:
                raise SystemExit(f"unknown workloads {sorted(unknown)}")
        arguments.out.mkdir(parents=True, exist_ok=True)
        with tqdm(desc="benchmarks", unit="task", total=task_count(contenders, settings, chosen),
                  file=sys.stderr) as bar:
            def progress(what: str) -> None:
                bar.set_postfix_str(what[:70])
                bar.update(1)

            results = run(contenders, settings, progress, workloads=chosen,
                          measured=lambda partial: write_json(partial, arguments.out / "results.json"))
        if arguments.merge_into:
            merged = json.loads(arguments.merge_into.read_text())
            merged.update({key: results[key] for key in arguments.sections})
            results = merged
    section = markdown(results)
    print(section)
    arguments.out.mkdir(parents=True, exist_ok=True)
    write_json(results, arguments.out / "results.json")
    write_plot(results, arguments.out / "results.png")
    print(f"\nwrote {arguments.out / 'results.json'} and {arguments.out / 'results.png'}", file=sys.stderr)
    if arguments.readme:
        update_readme(arguments.readme, section)
        print(f"updated {arguments.readme}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
