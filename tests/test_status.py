"""``tuner status`` on a study whose trial states are set by hand through Optuna."""

from __future__ import annotations

import datetime
import io
import re
import time

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

from conftest import small_spec, tuner
from tuner.cli import app
from tuner.spec import parse_spec
from tuner.status import status_table, study_status
from tuner.storages import LEASE, claim_next_waiting_trial
from tuner.study import create_study


def _finish(study: optuna.Study, epochs: int, trained: int, state: TrialState, stop_reason: str | None = None) -> None:
    trial = study.ask()  # claims one of the budget's waiting slots
    trial.suggest_int("epochs", epochs, epochs)
    trial.set_user_attr("epochs_completed", trained)
    if stop_reason:
        trial.set_user_attr("stop_reason", stop_reason)
    study.tell(trial, 0.9 if state == TrialState.COMPLETE else None, state=state)


def _known_spec() -> dict:
    # Blank slots only: a centre first trial would fix the epochs the trials below set by hand.
    spec = small_spec("known", budget={"n_trials": 6})
    spec["sampler"]["first_trial"] = "sampler"
    return spec


@pytest.fixture
def known_study(sqlite_url: str) -> optuna.Study:
    """Six slots: one complete, two pruned, one failed, one running, one waiting; the trained
    trials ran 3 + 1 + 1 of 3 + 3 + 4 epochs, so pruning saved half."""
    study = create_study(parse_spec(_known_spec()), sqlite_url)
    _finish(study, 3, 3, TrialState.COMPLETE)
    _finish(study, 3, 1, TrialState.PRUNED)
    _finish(study, 4, 1, TrialState.PRUNED)
    _finish(study, 2, 0, TrialState.FAIL)
    running = study.ask()
    running.suggest_int("epochs", 3, 3)
    running.set_user_attr("worker", "gpu-box:4242")
    running.set_user_attr("epochs_completed", 2)
    return study


def test_a_spent_time_budget_shows_as_spent_not_overrun(sqlite_url: str):
    spec = parse_spec({**_known_spec(), "budget": {"timeout_s": 1}})
    study = create_study(spec, sqlite_url)
    study.ask()
    time.sleep(1.6)
    status = study_status(study, spec)
    assert status.budget.elapsed_s == 1.0 and status.budget.exhausted
    assert status.eta_s == 0.0


def test_status_figures(known_study: optuna.Study):
    status = study_status(known_study, parse_spec(_known_spec()))
    assert {k: v for k, v in status.states.items() if v} == {
        "COMPLETE": 1, "PRUNED": 2, "FAIL": 1, "RUNNING": 1, "WAITING": 1,
    }
    assert (status.budget.finished, status.budget.n_trials) == (4, 6)
    assert (status.epochs_trained, status.epochs_unpruned) == (5, 10)
    assert status.pruning_savings_pct == pytest.approx(50.0)
    assert status.best_value == pytest.approx(0.9)
    assert status.trials_per_hour is not None and status.eta_s is not None
    assert [(t.worker, t.epochs_completed, t.epochs) for t in status.live] == [("gpu-box:4242", 2, 3)]
    assert status.resumable == []


def test_no_eta_for_a_trial_budget_while_no_worker_runs(sqlite_url: str):
    """The pace of the trials finished says nothing of when the rest finish if no one trains
    them; a time budget still runs out on the clock."""
    for budget, eta_known in [({"n_trials": 6}, False), ({"n_trials": 6, "timeout_s": 3600}, True)]:
        spec = parse_spec({**_known_spec(), "name": f"idle-{eta_known}", "budget": budget})
        study = create_study(spec, sqlite_url)
        _finish(study, 3, 3, TrialState.COMPLETE)
        _finish(study, 3, 3, TrialState.COMPLETE)
        status = study_status(study, spec)
        assert status.trials_per_hour is not None and status.live == []
        assert (status.eta_s is not None) == eta_known
        if eta_known:
            assert 3500 < status.eta_s <= 3600


def test_the_pace_leaves_out_a_pause_between_runs(sqlite_url: str):
    """Ten trials of a minute each yesterday, a night's pause (Ctrl-C, then the same command in
    the morning), one more just now: the pace is one a minute, not ten a day."""
    spec = parse_spec({**_known_spec(), "name": "paused", "budget": {"n_trials": 20}})
    study = create_study(spec, sqlite_url)
    now = datetime.datetime.now()
    starts = [now - datetime.timedelta(days=1) + datetime.timedelta(minutes=i) for i in range(10)]
    for start in [*starts, now - datetime.timedelta(minutes=1)]:
        trial = optuna.trial.create_trial(value=0.9)
        trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(minutes=1)
        study.add_trial(trial)
    study.ask()  # a worker trains the next one
    status = study_status(study, spec)
    assert status.trials_per_hour == pytest.approx(60.0)
    assert status.eta_s == pytest.approx(9 * 60.0)


def test_a_pace_below_one_a_day_shows_its_digits(sqlite_url: str):
    """Trials of a day each on one worker: 0.042 an hour, where one decimal showed 0.0."""
    spec = parse_spec({**_known_spec(), "name": "slow", "budget": {"n_trials": 5}})
    study = create_study(spec, sqlite_url)
    first = datetime.datetime.now() - datetime.timedelta(days=2)
    for day in range(2):
        trial = optuna.trial.create_trial(value=0.9)
        trial.datetime_start = first + datetime.timedelta(days=day)
        trial.datetime_complete = trial.datetime_start + datetime.timedelta(days=1)
        study.add_trial(trial)
    console = Console(file=io.StringIO(), width=200)
    console.print(status_table([study_status(study, spec)]))
    assert re.search(r"trials per hour\s+│\s+0\.042\s", console.file.getvalue()), console.file.getvalue()


def test_trials_that_diverged_or_ran_out_of_memory_are_not_saved_by_pruning(sqlite_url: str):
    # Both end in Optuna's PRUNED state, but no more epochs would have trained without a pruner.
    spec = parse_spec(_known_spec())
    study = create_study(spec, sqlite_url)
    _finish(study, 3, 3, TrialState.COMPLETE)
    _finish(study, 4, 1, TrialState.PRUNED, "diverged")
    _finish(study, 4, 0, TrialState.PRUNED, "out_of_memory")
    _finish(study, 3, 1, TrialState.PRUNED, "pruned")
    status = study_status(study, spec)
    assert (status.epochs_trained, status.epochs_unpruned) == (5, 7)
    assert status.pruning_savings_pct == pytest.approx(100 * 2 / 7)


def test_status_command_prints_them(known_study: optuna.Study, sqlite_url: str):
    result = tuner("status", "--study", "known", "--storage", sqlite_url, env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: cells[1]
        for line in result.stdout.splitlines()
        if len(cells := [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]) == 2
    }
    assert {k: rows[k] for k in ("complete", "pruned", "failed", "running", "waiting")} == {
        "complete": "1", "pruned": "2", "failed": "1", "running": "1", "waiting": "1",
    }
    assert rows["budget"] == "4 used, 2 left"
    assert rows["epochs trained"] == "5 of 10 without pruning"
    assert rows["saved by pruning"] == "50%"
    assert "gpu-box:4242: epoch 2/3" in rows["live workers"]


def test_status_of_a_finished_study_says_its_budget_is_met(sqlite_url: str):
    study = create_study(parse_spec(small_spec("finished", budget={"n_trials": 2})), sqlite_url)
    _finish(study, 3, 3, TrialState.COMPLETE)
    _finish(study, 3, 3, TrialState.COMPLETE)
    result = tuner("status", "--study", "finished", "--storage", sqlite_url, env={"COLUMNS": "120"})
    assert re.search(r"ETA\s+│\s+budget met", result.stdout), result.stdout
    assert re.search(r"trials per hour\s+│\s+\d+\s", result.stdout), result.stdout


def test_status_shows_heartbeats_and_trials_waiting_to_resume(sqlite_url: str):
    spec = parse_spec(small_spec("resume", budget={"n_trials": 2}))
    study = create_study(spec, sqlite_url)
    lost = study.ask()
    study.tell(lost, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[lost.number])
    running = study.ask()
    running.set_user_attr("device", "cuda:0")
    study._storage.record_heartbeat(running._trial_id)
    status = study_status(study, spec)
    assert status.resumable == [(2, lost.number)]
    (live,) = status.live
    assert live.number == running.number and live.device == "cuda:0"
    assert live.heartbeat_age_s is not None and 0 <= live.heartbeat_age_s < 60
    result = tuner("status", "--study", "resume", "--storage", sqlite_url, env={"COLUMNS": "160"})
    assert "trial 2 (retry of 0)" in result.stdout
    assert re.search(r"\(cuda:0\): epoch 0/\?, heartbeat \d+ s ago", result.stdout)


def test_status_tells_a_trial_whose_worker_stopped_beating_from_a_live_one(sqlite_url: str):
    spec = parse_spec(small_spec("beats", budget={"n_trials": 2}))
    study = create_study(spec, sqlite_url)
    gone, live = study.ask(), study.ask()
    for trial in (gone, live):
        study._storage.record_heartbeat(trial._trial_id)
    with study._storage._backend.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-600 seconds') WHERE trial_id = ?",
            (gone._trial_id,),
        )
    assert [t.stale for t in study_status(study, spec).live] == [True, False]
    # A grace that a slow start of the command on a loaded machine cannot outlast.
    result = tuner("status", "--study", "beats", "--storage", sqlite_url, env={"COLUMNS": "200", "TUNER_HEARTBEAT_GRACE": "300"})
    assert re.search(rf"trial {gone.number} .*heartbeat 6\d\d s ago: its worker is gone; the next worker retries it", result.stdout)
    assert re.search(rf"trial {live.number} .*heartbeat \d+ s ago\s", result.stdout), result.stdout


def test_status_tells_a_trial_whose_worker_stopped_renewing_its_lease_on_a_journal(tmp_path):
    journal = str(tmp_path / "journal.log")
    spec = parse_spec(small_spec("leases", budget={"n_trials": 2}))
    study = create_study(spec, journal)
    gone, live = (claim_next_waiting_trial(study._storage, study._study_id, {"worker": "w1"}) for _ in range(2))
    study._storage.set_trial_system_attr(gone, LEASE, time.time() - 600)
    assert [(t.stale, round(t.heartbeat_age_s, -1)) for t in study_status(study, spec).live] == [(True, 600), (False, 0)]
    result = tuner("status", "--study", "leases", "--storage", journal, env={"COLUMNS": "200", "TUNER_HEARTBEAT_GRACE": "300"})
    assert re.search(r"trial 0 .*heartbeat 6\d\d s ago: its worker is gone; the next worker retries it", result.stdout)
    assert re.search(r"trial 1 .*heartbeat \d+ s ago\s", result.stdout), result.stdout


def test_status_watch_shows_a_budget_raised_while_it_watches(sqlite_url: str, monkeypatch):
    """``tuner create`` with a larger ``n_trials`` extends a finished study: a watch started
    before must show the new trials left, not the budget it read at its start as met."""
    spec = {**_known_spec(), "budget": {"n_trials": 2}}
    study = create_study(parse_spec(spec), sqlite_url)
    _finish(study, 3, 3, TrialState.COMPLETE)
    _finish(study, 3, 3, TrialState.COMPLETE)
    refreshes = []

    def raise_the_budget_then_stop(seconds: float) -> None:
        refreshes.append(seconds)
        if len(refreshes) > 1:
            raise KeyboardInterrupt  # Ctrl-C after one refresh
        create_study(parse_spec({**spec, "budget": {"n_trials": 5}}), sqlite_url)

    monkeypatch.setattr(time, "sleep", raise_the_budget_then_stop)
    result = CliRunner().invoke(app, ["status", "--study", "known", "--storage", sqlite_url, "--watch"])
    assert result.exit_code == 0, result.output
    assert re.search(r"budget\s+│\s+2 used, 3 left", result.stdout), result.stdout
    assert not re.search(r"ETA\s+│\s+budget met", result.stdout), result.stdout


def test_status_watch_shows_a_study_made_while_it_watches(sqlite_url: str, monkeypatch):
    create_study(parse_spec(_known_spec()), sqlite_url)
    refreshes = []

    def make_a_study_then_stop(seconds: float) -> None:
        refreshes.append(seconds)
        if len(refreshes) > 1:
            raise KeyboardInterrupt
        create_study(parse_spec({**_known_spec(), "name": "later"}), sqlite_url)

    monkeypatch.setattr(time, "sleep", make_a_study_then_stop)
    result = CliRunner().invoke(app, ["status", "--storage", sqlite_url, "--watch"])
    assert result.exit_code == 0, result.output
    assert re.search(r"┃\s+known\s+┃\s+later\s+┃", result.stdout), result.stdout


def test_status_of_a_storage_without_studies_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="gone", storage=url)
    optuna.delete_study(study_name="gone", storage=url)
    result = tuner("status", "--storage", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"no studies in storage '{url}'; `tuner create` or `tuner run` makes one"


def test_status_of_every_study_leaves_out_those_tuner_did_not_make(sqlite_url: str):
    # Plain Optuna beside tuner in one database: no spec, no budget to show.
    optuna.create_study(study_name="plain", storage=sqlite_url)
    result = CliRunner().invoke(app, ["status", "--storage", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "no studies made by tuner in" in result.stdout and "left out, not made by tuner (no spec, no budget): 'plain'" in result.stdout
    create_study(parse_spec(_known_spec()), sqlite_url)
    result = CliRunner().invoke(app, ["status", "--storage", sqlite_url], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "known" in result.stdout and "6 left" in result.stdout
    assert "left out, not made by tuner (no spec, no budget): 'plain'" in result.stdout


def test_status_shows_study_names_with_brackets_as_they_are(sqlite_url: str):
    # Rich read them as styles: "resnet[cifar10]" showed as "resnet", and "sweep[/lr]" failed.
    for name in ("resnet[cifar10]", "sweep[/lr]"):
        create_study(parse_spec({**_known_spec(), "name": name}), sqlite_url)
    result = tuner("status", "--storage", sqlite_url, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "resnet[cifar10]" in result.stdout and "sweep[/lr]" in result.stdout
