"""The three benchmark scripts of README's tables (search, overhead, throughput), run small from
the repository as a user runs them, and the arithmetic their tables rest on (recovery's too)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402
import recovery  # noqa: E402
import search_efficiency  # noqa: E402
import throughput  # noqa: E402


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_an_accuracy_stored_in_float32_reaches_a_target_equal_to_it():
    target = 111 / 114  # the same share of validation rows, as Optuna's example computes it
    stored = float(np.float32(target))
    assert stored < target
    events = [(2, 0.5, None), (5, 1.5, stored)]
    assert search_efficiency.reach(events, target, budget=10) == (5, 1.5)
    assert search_efficiency.reach(events, target, budget=4) == (None, None)
    assert search_efficiency.reach(events, target + 1 / 114, budget=10) == (None, None)


def _trial(number: int, state: TrialState, epochs: int, history: list[int] | None = None, **attrs: int) -> FrozenTrial:
    """A trial as the storage holds it: values for epochs 1..``epochs``, ``retry_history`` where a retry."""
    trial = optuna.trial.create_trial(
        state=state,
        value=0.9 if state == TrialState.COMPLETE else None,
        intermediate_values={epoch: 0.5 for epoch in range(1, epochs + 1)},
        user_attrs=attrs,
        system_attrs={"retry_history": history} if history else {},
    )
    trial.number = number
    return trial


def test_recovery_counts_an_epoch_twice_only_where_the_storage_shows_it_reported_before_the_kill():
    fail, done = TrialState.FAIL, TrialState.COMPLETE
    trials = [
        # Its stored epochs lag the checkpoint that its retry resumed from: no epoch shows twice,
        # where the stored ``epochs_completed`` (1) less the resume (3) made -2.
        _trial(0, fail, 2, epochs_completed=1),
        _trial(1, done, 6, [0], retried_from=0, resumed_from_epoch=3, epochs_completed=6),
        # Epoch 4 was stored before the kill, and the checkpoint held 3.
        _trial(2, fail, 4),
        _trial(3, done, 6, [2], retried_from=2, resumed_from_epoch=3, epochs_completed=6),
        # A retry pruned at epoch 4 trained only epoch 4 again of the 5 stored.
        _trial(4, fail, 5),
        _trial(5, TrialState.PRUNED, 4, [4], retried_from=4, resumed_from_epoch=3, epochs_completed=4),
        # A retry handed back, its retry killed (with the records it inherited) and that one's retry.
        _trial(6, fail, 2),
        _trial(7, fail, 3, [6], retried_from=6, resumed_from_epoch=2, epochs_completed=3),
        _trial(8, fail, 4, [6, 7], retried_from=6, resumed_from_epoch=2, epochs_completed=3),
        _trial(9, done, 6, [6, 7, 8], retried_from=8, resumed_from_epoch=3, epochs_completed=6),
    ]
    assert recovery.epochs_trained_twice(trials) == recovery.Redone(epochs=3, unmeasured=1)
    assert recovery.epochs_trained_twice(trials[:2]) == (0, 0)


def test_search_efficiency_runs_each_method_to_the_same_budget(tmp_path: Path):
    out = tmp_path / "search"
    methods = ["tuner", "optuna", "random"]
    stdout = _run(
        "search_efficiency.py", "--workloads", "breast_cancer_mlp", "--methods", ",".join(methods),
        "--budget", "12", "--seeds", "2", "--out", str(out),
    )
    payload = json.loads(out.with_suffix(".json").read_text())
    events = payload["events"]["breast_cancer_mlp"]
    rows = {row["method"]: row for row in payload["summary"]["breast_cancer_mlp"]}
    assert set(events) == set(rows) == set(methods)
    finals = {}
    for method, seeds in events.items():
        assert len(seeds) == 2
        for run in seeds:
            spent = [epochs for epochs, _, _ in run]
            assert spent == sorted(spent) and spent[-1] >= 12, (method, spent)
        finals[method] = statistics.median(search_efficiency.best_by(run, 12) or 0.0 for run in seeds)
    # The target is the lowest median final accuracy: every method's median run reaches it.
    target = min(finals.values())
    assert all(row["target"] == round(target, 4) for row in rows.values())
    assert all(row["seeds_reaching_target"] >= 1 for row in rows.values())
    assert "breast_cancer_mlp" in stdout and "tuner" in stdout
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_overhead_runs_tuner_and_plain_optuna_on_the_same_storage(tmp_path: Path):
    out = tmp_path / "overhead"
    stdout = _run("overhead.py", "--storages", "sqlite", "--workers", "1", "--trials", "6", "--out", str(out))
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [(run["side"], run["trials"]) for run in payload["runs"]] == [("plain", 6), ("tuner", 6)]
    (row,) = payload["summary"]
    assert (row["storage"], row["workers"]) == ("sqlite", 1)
    assert row["ratio"] == round(row["tuner_ms"] / max(row["optuna_ms"], 0.1), 2)
    assert row["optuna_cpu_ms"] > 0 and row["tuner_cpu_ms"] > 0
    assert payload["settings"]["png_ms_per_trial"] > 0
    assert "learning-curve PNG" in stdout
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_a_side_whose_workers_fail_is_recorded_with_its_error_and_the_run_goes_on(tmp_path: Path):
    """A negative sleep, which the command line refuses, makes every plain Optuna worker die
    and every trial of tuner's fail: real failures of real worker processes."""
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    plain = overhead.measure_side("plain", "sqlite", url, 1, 3, -1.0, tmp_path)
    assert plain["ms_per_trial"] is None and plain["by_tenth"] == []
    assert plain["failed"].startswith("ValueError: sleep length must be non-negative"), plain["failed"]
    mine = overhead.measure_side("tuner", "sqlite", url, 1, 3, -1.0, tmp_path)
    assert mine["failed"].startswith("no trial completed of the 3"), mine["failed"]
    measured = {**mine, "side": "tuner", "trials": 3, "ms_per_trial": 12.0, "by_tenth": [12.0], "failed": None}
    assert plain["cpu_ms_per_trial"] is None
    measured["cpu_ms_per_trial"] = 4.5
    none = {"optuna_ms": None, "tuner_ms": None, "ratio": None, "optuna_cpu_ms": None, "tuner_cpu_ms": None}
    assert overhead.summarize([plain, mine, plain, measured]) == [
        {"storage": "sqlite", "workers": 1, "trials": 0, **none},
        {"storage": "sqlite", "workers": 1, "trials": 3, **none, "tuner_ms": 12.0, "tuner_cpu_ms": 4.5},
    ]
    overhead.plot([plain, mine, plain, measured], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")

    refused = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--sleep-ms", "-1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "--sleep-ms must be 0 or more (got -1)" in refused.stderr


def test_the_host_cpu_of_a_window_counts_the_work_done_in_it():
    """CPU burnt by this process inside the window is counted, none is outside the samples."""
    with overhead.HostCPU(interval_s=0.05) as host:
        time.sleep(0.2)
        started = time.time()
        burnt = time.process_time()
        while time.process_time() - burnt < 0.5:
            pass
        ended = time.time()
        time.sleep(0.2)
    assert host.busy_between(started, ended) >= 0.45
    assert host.busy_between(host.samples[0][0] - 1, ended) is None
    assert host.busy_between(started, host.samples[-1][0] + 1) is None


def test_throughput_times_both_loops_at_every_batch_size(tmp_path: Path):
    out = tmp_path / "throughput"
    _run("throughput.py", "--workload", "breast_cancer_mlp", "--device", "cpu", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [row["batch_size"] for row in rows] == list(throughput.BATCH_SIZES)
    for row in rows:
        assert row["naive_samples_per_s"] > 0 and row["tuner_samples_per_s"] > 0
        # The ratio is of the unrounded figures.
        assert abs(row["ratio"] - row["tuner_samples_per_s"] / row["naive_samples_per_s"]) < 0.01
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
