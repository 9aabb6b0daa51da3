"""``python -m benchmarks.user_compile``: the step compiled by the user, each case in a fresh process
with an empty Inductor cache (so "cold" includes every compile the case needs, our kernels too).

* ``tutorial``: PyTorch's compiled-optimizer tutorial, ``torch.compile(opt.step)``, over N tensors
  of 1,024 elements, N = 10 ... 10,000. Ours runs with ``fullgraph=True`` and OneCycleLR (beta1
  cycling) attached and stepped between calls; torch's cannot (its step breaks the graph on
  purpose, and the scheduler's wrapper of ``opt.step`` is in a file Dynamo refuses to trace), so
  it runs without fullgraph, with a float lr and no scheduler. Reported: the first call (cold
  compile), the second, graphs compiled after the first call, and the steady call against the
  same function called eagerly in the same process (interleaved), and torch.compile's own cost per
  call there: a compiled ``fullgraph=True`` function that only adds 1 to a 0-dim tensor, called
  under the same conditions (after fresh grads, interleaved). The step compiled on its own traces
  no param (Note [a step alone with the params]).
* ``recipe``: the same, with ``opt.step()`` as the whole body of a function compiled with
  ``fullgraph=True`` (the compiled-optimizer recipe's ``fn``; ours only): also stepped alone.
* ``users-function``: the same, in a user's ``fullgraph=True`` function that does more than step
  (here it also counts its calls in a tensor; ours only): also stepped alone, since nothing else
  in its graph touches a param or a grad.
* ``clipping-function``: the same, in a user's ``fullgraph=True`` function that clips the grads
  with ``opt.clip_grad_norm_`` before the step (ours only): the norm is an op that reads the grads
  where they are, as the step's does, so this too traces no param.
* ``torch-clipping-function``: the same, clipping with torch's ``clip_grad_norm_`` (ours only):
  its graph reads and writes the grads, so its trace takes every grad and param as an input (Note
  [one opaque step in a user's trace]), after a first trace that found them touched.
* ``torch-clip-alone``: torch's ``clip_grad_norm_`` alone in a compiled function, no step (torch):
  what the ``torch-clipping-function`` row's cold compile would cost without any optimizer.
* ``train-step``: forward, backward, step and zero_grad in one ``torch.compile`` on a small
  transformer (112 param tensors), ours against torch's foreach and fused, each in a fresh
  process: cold compile, and a steady call that moves with the machine.
* ``train-step-pair``: the same compiled train steps, ours and one of torch's in one fresh
  process, taking turns (each timed call right after one of its own), so the steady ratio is
  from the same minutes (the row names torch's as its contender: ``steady_ms`` is ours,
  ``baseline_ms`` torch's). Torch's is compiled first: compiled after ours or fused, torch's
  foreach step fails in torch 2.13 ("Expected scalars to be on CPU, got meta"), and so do the
  three together.

Figures are wall seconds (cold) and medians in ms (steady); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .measure import each_after_itself

TUTORIAL_SIZES = (10, 100, 1_000, 10_000)
STEADY_CALLS = 20


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def tutorial(contender: str, n: int, how: str = "tutorial") -> dict:
    from compiled_adamw import AdamW
    params = [torch.nn.Parameter(torch.randn(1024)) for _ in range(n)]
    if contender == "ours":
        optimizer = AdamW(params, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=1000)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        scheduler = None
    calls_counted, trivial_counter = torch.zeros(()), torch.zeros(())

    def recipe():
        optimizer.step()

    def users_function():
        optimizer.step()
        calls_counted.add_(1)

    def clipping_function():
        optimizer.clip_grad_norm_(1e3)
        optimizer.step()

    def torch_clipping_function():
        torch.nn.utils.clip_grad_norm_(params, 1e3)
        optimizer.step()

    def torch_clip_alone():
        torch.nn.utils.clip_grad_norm_(params, 1e3)

    def trivial():
        trivial_counter.add_(1)

    uncompiled = {"tutorial": optimizer.step, "recipe": recipe, "users-function": users_function,
                  "clipping-function": clipping_function, "torch-clipping-function": torch_clipping_function,
                  "torch-clip-alone": torch_clip_alone}[how]
    # torch's step has a deliberate graph break (torch._dynamo.graph_break()): fullgraph fails.
    # Torch's clip alone has none: it compiles with fullgraph=True, as the torch-clipping row does.
    compiled = torch.compile(uncompiled, fullgraph=contender == "ours" or how == "torch-clip-alone")

    def fresh_grads():
        for p in params:
            p.grad = torch.randn(1024)

    calls, eager, floor = [], [], []
    for call in range(2 + STEADY_CALLS):
        fresh_grads()
        calls.append(_timed(compiled))
        if scheduler is not None:
            scheduler.step()
        if call == 0:
            compiled_trivial = torch.compile(trivial, fullgraph=True)
            compiled_trivial()
            graphs_after_first = _graphs()
        if call >= 2:
            fresh_grads()
            eager.append(_timed(uncompiled))
            fresh_grads()
            floor.append(_timed(compiled_trivial))
    steady = statistics.median(calls[2:])
    return dict(cold_s=calls[0], second_s=calls[1], recompiles=_graphs() - graphs_after_first,
                steady_ms=steady * 1e3, eager_ms=statistics.median(eager) * 1e3,
                steady_x_eager=steady / statistics.median(eager),
                compiled_call_floor_ms=statistics.median(floor) * 1e3)


def _small_transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    return torch.nn.Sequential(torch.nn.Linear(16, 64),
                               torch.nn.TransformerEncoder(layer, num_layers=9, enable_nested_tensor=False),
                               torch.nn.Linear(64, 1))


TRAIN_STEP_CONTENDERS = ("ours", "torch-foreach", "torch-fused")
PAIRED_CALLS = 300


def _compiled_train_step(contender: str):
    from compiled_adamw import AdamW
    model = _small_transformer()
    optimizer = {"ours": lambda ps: AdamW(ps, lr=1e-3),
                 "torch-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
                 "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}[contender](model.parameters())
    x, y = torch.randn(8, 32, 16), torch.randn(8, 32, 1)

    @torch.compile
    def step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return len(list(model.parameters())), step


def train_step(contender: str) -> dict:
    """One contender's compiled train step in this fresh process: cold, second and steady calls.
    (Interleaving the three in one process fails: torch's foreach step, compiled after ours or
    fused in the same process, raises "Expected scalars to be on CPU, got meta".)"""
    tensors, step = _compiled_train_step(contender)
    calls = [_timed(step) for _ in range(2 + STEADY_CALLS)]
    return dict(tensors=tensors, cold_s=calls[0], second_s=calls[1], steady_ms=statistics.median(calls[2:]) * 1e3)


def train_step_pair(baseline: str) -> dict:
    """Ours against torch's ``baseline`` compiled train step in this fresh process, after three
    warm-up calls each, taking turns, each timed call right after one of its own
    (``benchmarks.measure.each_after_itself``, as ``benchmarks.loop`` does)."""
    steps = {}
    for contender in (baseline, "ours"):  # torch's first: see ``train-step-pair`` above
        steps[contender] = _compiled_train_step(contender)[1]
        for _ in range(3):
            steps[contender]()
    seconds = each_after_itself({contender: lambda step=step: _timed(step) for contender, step in steps.items()},
                                PAIRED_CALLS)
    ours_ms, baseline_ms = (statistics.median(seconds[c]) * 1e3 for c in ("ours", baseline))
    return dict(steady_ms=ours_ms, baseline_ms=baseline_ms, steady_x_baseline=ours_ms / baseline_ms)


def _in_fresh_process(*args: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-m", "benchmarks.user_compile", "--child", *args], env=env,
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(TUTORIAL_SIZES))
    parser.add_argument("--recipe-sizes", type=int, nargs="*", default=list(TUTORIAL_SIZES),
                        help="tensor counts for ours stepped by a function that only steps")
    parser.add_argument("--function-sizes", type=int, nargs="*", default=list(TUTORIAL_SIZES),
                        help="tensor counts for ours stepped inside a user's function that does more")
    parser.add_argument("--clipping-sizes", type=int, nargs="*", default=list(TUTORIAL_SIZES),
                        help="tensor counts for ours stepped inside a user's function that clips first")
    parser.add_argument("--torch-clipping-sizes", type=int, nargs="*", default=[10, 100, 1_000],
                        help="tensor counts for ours stepped inside a function that clips with torch's")
    parser.add_argument("--torch-clip-alone-sizes", type=int, nargs="*", default=[10, 100, 1_000],
                        help="tensor counts for torch's clip_grad_norm_ compiled alone")
    parser.add_argument("--torch-sizes", type=int, nargs="*", default=[10, 100, 1_000],
                        help="tensor counts for torch's compiled AdamW (10,000 takes far longer)")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        child = {"train-step": train_step, "train-step-pair": train_step_pair}.get(kind)
        print(json.dumps(child(rest[0]) if child else tutorial(rest[0], int(rest[1]), kind)))
        return
    results = []
    cases = [("tutorial", "ours", n) for n in args.sizes] + [("tutorial", "torch", n) for n in args.torch_sizes]
    cases += [("recipe", "ours", n) for n in args.recipe_sizes]
    cases += [("users-function", "ours", n) for n in args.function_sizes]
    cases += [("clipping-function", "ours", n) for n in args.clipping_sizes]
    cases += [("torch-clipping-function", "ours", n) for n in args.torch_clipping_sizes]
    cases += [("torch-clip-alone", "torch", n) for n in args.torch_clip_alone_sizes]
    cases += [("train-step", contender, None) for contender in TRAIN_STEP_CONTENDERS]
    cases += [("train-step-pair", baseline, None) for baseline in TRAIN_STEP_CONTENDERS[1:]]
    for kind, contender, n in cases:
        row = {"case": kind, "contender": contender, "tensors": n,
               **_in_fresh_process(kind, contender, *([str(n)] if n else []))}
        results.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
