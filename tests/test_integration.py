"""Real studies: worker processes on SQLite and PostgreSQL, the exact budget, the records, and
plain Optuna reading (and adding to) the same study."""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from conftest import small_spec, start_tuner, tuner
from tuner.cli import app, errors
from tuner.launch import follow
from tuner.spec import parse_spec
from tuner.storages import sqlalchemy_url
from tuner.study import create_study

RECORDS = (
    "effective_batch_size", "micro_batch_size", "accumulation_steps", "lr_used", "epochs_completed",
    "train_time_s", "samples_per_s", "peak_memory_mb", "device", "device_name", "worker",
)


def _run_three_workers(url: str, spec_path: Path, name: str, cwd: Path) -> None:
    created = tuner("create", str(spec_path), "--storage", url, cwd=cwd)
    assert created.returncode == 0, created.stderr
    workers = [start_tuner("worker", "--study", name, "--storage", url, "--threads", "1", cwd=cwd) for _ in range(3)]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output


def _check_study(url: str, name: str, n_trials: int) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=sqlalchemy_url(url))
    trials = study.get_trials()
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert [t.state for t in trials].count(TrialState.WAITING) == 0
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    for trial in finished:
        missing = [key for key in RECORDS if key not in trial.user_attrs]
        assert not missing, (trial.number, missing)
        assert trial.user_attrs["effective_batch_size"] == trial.params["batch_size"]
        assert trial.user_attrs["micro_batch_size"] * trial.user_attrs["accumulation_steps"] >= trial.params["batch_size"]
        assert len(trial.user_attrs["history"]) == trial.user_attrs["epochs_completed"]
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    for trial in pruned:
        assert trial.user_attrs["stop_reason"] == "pruned"
        assert re.fullmatch(rf"at epoch {trial.user_attrs['epochs_completed']} with val_accuracy=[\d.]+", trial.user_attrs["stop_detail"])
    return study


def _optuna_best_trial(url: str, name: str) -> dict:
    command = [str(Path(sys.executable).parent / "optuna"), "best-trial", "--study-name", name, "--storage", sqlalchemy_url(url), "-f", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_three_workers_on_sqlite(tmp_path, write_spec, sqlite_url):
    spec = write_spec(small_spec("sqlite-three", budget={"n_trials": 9}))
    _run_three_workers(sqlite_url, spec, "sqlite-three", tmp_path)
    study = _check_study(sqlite_url, "sqlite-three", 9)
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2
    best = json.loads(tuner("best", "--study", "sqlite-three", "--storage", sqlite_url, "--format", "json").stdout)
    assert best["trial"] == study.best_trial.number
    assert best["value"] == study.best_value
    assert {"batch_size", "lr", "epochs"} <= set(best["params"])
    assert set(best) >= {"study", "trial", "values", "params", "user_attrs", "duration_s", "value"}
    assert _optuna_best_trial(sqlite_url, "sqlite-three")["number"] == best["trial"]


@pytest.mark.postgres
@pytest.mark.slow
def test_three_workers_on_postgres(tmp_path, write_spec, postgres_url):
    spec = write_spec(small_spec("pg-three", budget={"n_trials": 9}))
    _run_three_workers(postgres_url, spec, "pg-three", tmp_path)
    study = _check_study(postgres_url, "pg-three", 9)
    assert _optuna_best_trial(postgres_url, "pg-three")["number"] == study.best_trial.number


@pytest.mark.postgres
def test_budget_exact_with_four_workers(tmp_path, write_spec, postgres_url):
    spec = small_spec("pg-budget", budget={"n_trials": 12}, workload="user_workloads:own_loop")
    spec["search"]["epochs"] = {"low": 1, "high": 2}
    result = tuner("run", str(write_spec(spec)), "--workers", "4", "--storage", postgres_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="pg-budget", storage=sqlalchemy_url(postgres_url))
    assert len([t for t in study.trials if t.state.is_finished()]) == 12
    assert len(study.trials) == 12


def test_plain_optuna_beside_tuner(tmp_path, write_spec, sqlite_url):
    spec = small_spec("beside", budget={"n_trials": 3}, workload="user_workloads:own_loop")
    assert tuner("run", str(write_spec(spec)), "--storage", sqlite_url, cwd=tmp_path).returncode == 0
    study = optuna.load_study(study_name="beside", storage=sqlite_url)
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-3, 3e-2, log=True), n_trials=2)
    assert len(study.trials) == 5
    listed = tuner("trials", "--study", "beside", "--storage", sqlite_url, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    listed_trials = json.loads(listed.stdout)
    assert [t["trial"] for t in listed_trials] == [0, 1, 2, 3, 4]
    # tuner's trials with every record, as ``tuner best`` gives one; Optuna's with what it has.
    assert all({"history", "worker", "epochs_completed"} <= set(t["user_attrs"]) for t in listed_trials[:3])
    assert all(t["user_attrs"] == {} and set(t["params"]) == {"lr"} for t in listed_trials[3:])


def test_run_prints_progress_and_best_table(tmp_path, write_spec, sqlite_url):
    spec = small_spec("progress", budget={"n_trials": 4}, workload="user_workloads:own_loop")
    result = tuner("run", str(write_spec(spec)), "--workers", "2", "--storage", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trials 4/4" in result.stderr
    assert "best val_accuracy=" in result.stderr
    assert "best trial of 'progress'" in result.stdout
    csv_out = tuner("trials", "--study", "progress", "--storage", sqlite_url, "--format", "csv").stdout
    header = csv_out.splitlines()[0].split(",")
    assert {"number", "state", "val_accuracy", "batch_size", "lr", "epochs", "worker", "device"} <= set(header)
    assert "history" not in header
    assert len(csv_out.strip().splitlines()) == 5
    table = tuner("trials", "--study", "progress", "--storage", sqlite_url).stdout
    assert "COMPLETE" in table


def test_csv_keeps_the_workers_duration_beside_optunas(sqlite_url):
    """A record named like a column of the row is not overwritten by it: both durations stay."""
    study = create_study(parse_spec(small_spec("durations")), sqlite_url)
    started = datetime.datetime(2026, 1, 1, 12, 0, 0)
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=TrialState.COMPLETE, value=0.9, values=None,
        datetime_start=started, datetime_complete=started + datetime.timedelta(seconds=10),
        params={"lr": 1e-2},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)},
        user_attrs={"duration_s": 7.5, "worker": "host:1"}, system_attrs={}, intermediate_values={},
    ))
    listed = tuner("trials", "--study", "durations", "--storage", sqlite_url, "--format", "csv")
    assert listed.returncode == 0, listed.stderr
    (row,) = csv.DictReader(io.StringIO(listed.stdout))
    assert float(row["duration_s"]) == 10.0
    assert float(row["user_attrs.duration_s"]) == 7.5
    assert row["worker"] == "host:1"


def test_trials_of_a_study_no_worker_has_started_says_so(sqlite_url):
    create_study(parse_spec(small_spec("unstarted")), sqlite_url)
    listed = CliRunner().invoke(app, ["trials", "--study", "unstarted", "--storage", sqlite_url])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.strip() == "no trial of 'unstarted' has started yet"
    listed = CliRunner().invoke(app, ["trials", "--study", "unstarted", "--storage", sqlite_url, "--format", "csv"])
    assert listed.stdout.splitlines() == ["number,state,val_accuracy"]


def test_a_long_worker_line_stays_one_line_in_a_pipe(sqlite_url, capsys):
    """``tuner run`` piped to a file or ``grep``: its workers' lines are relayed whole."""
    spec = parse_spec(small_spec("piped"))
    study = create_study(spec, sqlite_url)
    line = "trial 0 complete: val_accuracy=0.9722 | " + " ".join(f"record_{k}=0.125" for k in range(8))
    worker = subprocess.Popen(
        [sys.executable, "-c", f"print({line!r})"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert follow(study, spec, [worker], errors, poll_s=0.05) == [0]
    assert f"[w0] {line}" in capsys.readouterr().err.splitlines()


def test_time_budget_stops_workers(tmp_path, write_spec, sqlite_url):
    spec = small_spec("timed", workload="user_workloads:slow_loop", budget={"timeout_s": 2})
    spec["search"]["epochs"] = {"low": 2, "high": 2}
    spec["pruner"] = {"name": "none"}
    result = tuner("run", str(write_spec(spec)), "--storage", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="timed", storage=sqlite_url)
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert 1 <= len(finished) <= 4
    assert len(finished) == len(study.trials)
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    assert span.total_seconds() < 2 + 2 * 0.3 * 2 + 1


def test_run_on_a_study_whose_budget_is_met_starts_no_workers(write_spec, sqlite_url):
    spec = small_spec("met", budget={"n_trials": 2})
    study = create_study(parse_spec(spec), sqlite_url)
    for accuracy in (0.5, 0.75):
        trial = study.ask()
        study.tell(trial, accuracy)
    result = tuner("run", str(write_spec(spec)), "--storage", sqlite_url, "--workers", "2")
    assert result.returncode == 0, result.stderr
    # One line: no worker's, nor Optuna's "Using an existing study".
    assert result.stderr.splitlines() == [
        "study 'met' has met its budget (2 of 2 trials finished; raise it with --n-trials); no workers started"
    ]
    assert "best trial of 'met': #1" in result.stdout
