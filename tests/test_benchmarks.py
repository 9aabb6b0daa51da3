"""The benchmark harness itself, on tiny sizes: it completes for every contender and workload,
writes every field, the JSON and the plot, and reports a contender it cannot run."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from benchmarks.contenders import BASELINE, CONTENDERS, Contender, _import, by_name
from benchmarks.measure import each_after_itself, first_step_in_fresh_process, in_turn
from benchmarks.report import README_BEGIN, README_END, markdown, update_readme, write_json, write_plot
from benchmarks.run import Settings, run
from benchmarks.workloads import Workload, standard_workloads

TINY = Settings(scale=1e-4, repetitions=2, warmup=1, schedule_steps=3, compile_times=False,
                scaling_counts=(2, 4), scaling_total=64, unroll_steps=2)
ROW_FIELDS = {"name", "status", "median_ms", "min_ms", "bandwidth_GBps", "roof_fraction", "peak_extra_bytes",
              "recompiles", f"vs_{BASELINE}"}


def _missing(params, workload):
    _import("a_package_that_is_not_installed")


@pytest.fixture(scope="module")
def every_contender_results():
    workload = Workload("tiny-fp32", ((4, 3), (5,), (16,)))
    missing = Contender("missing", _missing, compiled=False)
    return run([*CONTENDERS, missing], TINY, workloads=[workload])


def test_every_contender_runs_or_says_why(every_contender_results):
    (workload,) = every_contender_results["workloads"]
    rows = {row["name"]: row for row in workload["contenders"]}
    assert set(rows) == {c.name for c in CONTENDERS} | {"missing"}
    assert rows["missing"]["status"].startswith("unavailable: a_package_that_is_not_installed is not installed")
    if not torch.cuda.is_available():
        assert rows["ours-graph-replay"]["status"] == "unavailable: graph replay needs CUDA"
    for name in ("ours", "ours-eager", "torch-forloop", "torch-foreach", BASELINE,
                 "torch-compiled"):
        assert rows[name]["status"] == "ok", rows[name]
    for row in rows.values():
        if row["status"] == "ok":
            assert ROW_FIELDS <= set(row), (row["name"], ROW_FIELDS - set(row))
            assert row["median_ms"] > 0 and 0 < row["roof_fraction"]
    assert rows["ours"]["recompiles"] == 0
    assert rows[BASELINE][f"vs_{BASELINE}"]["median_ms"] == 1.0
    assert {"median_ms", "bandwidth_GBps"} <= set(workload["roof"])


def test_scaling_and_differentiable_sections(every_contender_results):
    assert [w["tensors"] for w in every_contender_results["scaling"]] == [2, 4]
    differentiable = every_contender_results["differentiable"]
    rows = {row["name"]: row for row in differentiable["contenders"]}
    for name in ("ours-compiled", "ours-eager", "ours-functional", "torch-differentiable"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["ms_per_inner_step"] > 0 and rows[name]["saved_bytes_per_inner_step"] > 0
    # The same unroll by every implementation: the same validation loss.
    losses = [row["validation_loss"] for row in rows.values() if row["status"] == "ok"]
    assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0]))


def test_every_standard_workload_runs():
    results = run(by_name(["ours", BASELINE]), Settings(**{**TINY.__dict__, "scaling_counts": (), "unroll_steps": 0}),
                  workloads=standard_workloads(TINY.scale))
    names = [w["name"] for w in results["workloads"]]
    assert len(names) == 7 and "large-fp32-amsgrad" in names and any("bf16" in n for n in names)
    for workload in results["workloads"]:
        for row in workload["contenders"]:
            assert row["status"] == "ok", (workload["name"], row)


def test_outputs_json_plot_and_readme(every_contender_results, tmp_path):
    write_json(every_contender_results, tmp_path / "results.json")
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert set(loaded) == {"machine", "settings", "baseline", "workloads", "scaling", "differentiable"}
    write_plot(every_contender_results, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = markdown(every_contender_results)
    assert "tiny-fp32" in section and "unavailable" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold numbers\n{README_END}\nrest\n")
    update_readme(readme, section)
    text = readme.read_text()
    assert "old numbers" not in text and "tiny-fp32" in text and text.startswith("intro") and text.endswith("rest\n")


def test_first_step_in_a_fresh_process(tmp_path):
    """The cold/warm compile measurement: a new process with its own Inductor cache."""
    workload = Workload("tiny", ((8,), (3,)), torch.float32)
    (ours,) = by_name(["ours"])
    seconds = first_step_in_fresh_process(ours, workload, device="cpu", cache_dir=str(tmp_path), timeout=300)
    assert isinstance(seconds, float) and seconds > 0, seconds
    assert any(tmp_path.iterdir()), "the compile left nothing in the given cache"


@pytest.mark.slow
@pytest.mark.parametrize("case, contender", [("recipe", "ours"), ("torch-clip-alone", "torch")])
def test_a_user_compile_row_sets_the_compiled_call_beside_the_eager_one_and_torch_compiles_own(case, contender):
    """``benchmarks.user_compile``'s child, in its fresh process: no recompile, and a steady call
    reported with the eager call and an empty compiled function's call timed in the same loop."""
    from benchmarks.user_compile import _in_fresh_process

    row = _in_fresh_process(case, contender, "4")
    assert row["recompiles"] == 0 and row["cold_s"] > 0, row
    assert row["steady_ms"] > 0 and row["eager_ms"] > 0 and row["compiled_call_floor_ms"] > 0, row
    assert row["steady_x_eager"] == pytest.approx(row["steady_ms"] / row["eager_ms"]), row


@pytest.mark.parametrize("n", range(1, 13))
def test_contenders_take_turns_each_after_every_other_equally_often(n):
    """``in_turn``: over n - 1 rounds (the last call followed by the first), every ordered pair of
    distinct contenders is adjacent once, nobody follows itself, and each runs n - 1 times. Rotated
    rounds put the first of three contenders after the third twice as often as the second."""
    names = [f"contender {k}" for k in range(n)]
    calls = [name for repetition in range(max(n - 1, 1)) for name in in_turn(names, repetition)]
    assert collections.Counter(calls) == {name: max(n - 1, 1) for name in names}
    adjacent = collections.Counter(zip(calls, calls[1:] + calls[:1]))
    if n > 1:
        assert adjacent == {(a, b): 1 for a in names for b in names if a != b}
    assert in_turn(names, max(n - 1, 1)) == in_turn(names, 0)  # the rounds repeat


def test_each_kept_call_follows_a_call_of_its_own_and_the_turns_still_rotate():
    """``each_after_itself``: every kept result comes from a call right after one of the same
    contender's, and the turns between contenders are ``in_turn``'s."""
    names, log = ["a", "b", "c"], []

    def call_of(name: str):
        def call() -> int:
            log.append(name)
            return len(log)
        return call

    results = each_after_itself({name: call_of(name) for name in names}, repetitions=4)
    assert log == [name for repetition in range(4) for name in in_turn(names, repetition) for _ in range(2)]
    assert {name: len(kept) for name, kept in results.items()} == {name: 4 for name in names}
    for name, kept in results.items():
        assert all(log[k - 1] == log[k - 2] == name for k in kept)


def test_the_flat_floor_steps_as_torch_fused_does_and_the_loop_times_it_beside_ours():
    """``benchmarks.floor.FlatFloor``, the least a flat step can do, really steps: its params end
    where torch fused's end after the same default loop, and they live in its flat buffer."""
    from benchmarks.loop import FLOOR, Loop, interleaved

    workload = Workload("3x32", ((32,),) * 3)
    floor, fused = (Loop(name, workload, contenders=FLOOR) for name in ("flat-floor", "torch-fused"))
    for _ in range(3):
        floor.iteration()
        fused.iteration()
    for p, q in zip(floor.params, fused.params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    flat = floor.optimizer.flat_param
    assert [p.data_ptr() for p in floor.params] == [flat.data_ptr() + 4 * 32 * k for k in range(3)]
    rows = interleaved(workload, repetitions=2, contenders=FLOOR)
    assert set(rows) == {"ours", "torch-fused", "flat-floor"}
    assert rows["torch-fused"]["step_x_fused"] == 1.0 and rows["flat-floor"]["step_ms"] > 0
