"""No trial lost: killed and stopped workers, a restarted database, user errors, the exact budget."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import psutil
import pytest
import torch
from optuna.trial import TrialState

from conftest import small_spec, start_tuner, tuner
from test_proxy import free_port, serve_proxy, storage_of_kind
from tuner.errors import BadInputError
from tuner.space import Hyperparameters, suggest
from tuner.spec import Objective, SearchSpace, parse_spec
from tuner.storages import RetryStaleTrial, make_storage, sqlalchemy_url
from tuner.study import create_study
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.worker import WorkerOptions, run_worker, study_checkpoint_dir
from user_workloads import slow_blobs

EPOCHS = 6


def _fixed_spec(name: str) -> dict:
    spec = small_spec(name, workload="user_workloads:slow_blobs", budget={"n_trials": 1})
    spec["search"] = {
        "batch_size": {"low": 32, "high": 32, "scale": "linear"},
        "lr": {"low": 0.01, "high": 0.01},
        "epochs": {"low": EPOCHS, "high": EPOCHS},
    }
    spec["pruner"] = {"name": "none"}
    return spec


def _wait_for(condition, timeout: float = 180.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url, create=False))


def _epochs_done(url: str, name: str) -> int:
    trials = _load(url, name).get_trials(states=(TrialState.RUNNING,))
    return max((max(t.intermediate_values, default=0) for t in trials), default=0)


def _worker_two_epochs_in(write_spec, url: str, name: str, checkpoints: Path) -> tuple[tuple[str, ...], subprocess.Popen]:
    """Create the one-trial study ``name`` and start a worker on it; return the worker's
    arguments, for the next worker, and the worker, once its trial has stored two epochs."""
    assert tuner("create", str(write_spec(_fixed_spec(name))), "--storage", url).returncode == 0
    args = ("worker", "--study", name, "--storage", url, "--threads", "1", "--checkpoint-dir", str(checkpoints))
    first = start_tuner(*args)
    _wait_for(lambda: _epochs_done(url, name) >= 2, what="two epochs")
    return args, first


def _uninterrupted_history(monkeypatch) -> list[dict]:
    monkeypatch.setenv("SLOW_EVAL_S", "0")
    torch.set_num_threads(1)
    reporter = Reporter(optuna.create_study(direction="maximize").ask(), [Objective(metric="val_accuracy")])
    hp = Hyperparameters(batch_size=32, lr=0.01, base_lr=0.01, epochs=EPOCHS, seed=0)
    train(slow_blobs(), hp, reporter, device=torch.device("cpu"))
    return reporter.history


def _assert_resumed(url: str, name: str, checkpoints: Path, monkeypatch, first_reason: str) -> None:
    original, retry = _load(url, name).trials
    assert original.state == TrialState.FAIL
    assert (original.user_attrs.get("stop_reason") or original.user_attrs.get("error", "")).startswith(first_reason)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["retried_from"] == original.number
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert retry.user_attrs.get("error") is None and retry.user_attrs.get("stop_reason") is None
    assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    resumed = retry.user_attrs["history"]
    expected = _uninterrupted_history(monkeypatch)
    assert [e["epoch"] for e in resumed] == [e["epoch"] for e in expected]
    for got, want in zip(resumed, expected):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"])
    assert not list(checkpoints.rglob("*.pt")), "a finished trial's checkpoint is removed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal", "redis", "grpc"])
def test_killed_worker_trial_resumes_from_its_checkpoint(tmp_path, write_spec, kind, request, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    with storage_of_kind(kind, request, tmp_path) as url:
        args, first = _worker_two_epochs_in(write_spec, url, "kill9", checkpoints)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_tuner(*args)
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 0, output
        _assert_resumed(url, "kill9", checkpoints, monkeypatch, "its worker stopped sending heartbeats")


@pytest.mark.slow
def test_sigterm_hands_the_trial_back(tmp_path, write_spec, sqlite_url, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    args, first = _worker_two_epochs_in(write_spec, sqlite_url, "term", checkpoints)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    # 128 + SIGTERM, as a shell reports it: exit 0 would tell an orchestrator the budget is met.
    assert first.returncode == 143, output
    study = optuna.load_study(study_name="term", storage=sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    second = start_tuner(*args)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 0, output
    _assert_resumed(sqlite_url, "term", checkpoints, monkeypatch, "worker_stopped")


@pytest.mark.slow
def test_a_hand_back_does_not_use_up_the_retries_of_a_killed_worker(tmp_path, write_spec, sqlite_url):
    """With one retry allowed, a trial handed back by a stopped worker and then killed on its next
    worker is retried: the hand-back was no failure."""
    spec = _fixed_spec("moved")
    spec["max_retries"] = 1
    assert tuner("create", str(write_spec(spec)), "--storage", sqlite_url).returncode == 0
    args = ("worker", "--study", "moved", "--storage", sqlite_url, "--threads", "1", "--checkpoint-dir", str(tmp_path))
    study = optuna.load_study(study_name="moved", storage=sqlite_url)
    for stop, epochs in ((signal.SIGTERM, 1), (signal.SIGKILL, 2)):
        worker = start_tuner(*args)
        _wait_for(lambda: _epochs_done(sqlite_url, "moved") >= epochs, what=f"{epochs} epoch(s)")
        worker.send_signal(stop)
        worker.wait(timeout=30)
    last = start_tuner(*args)
    output, _ = last.communicate(timeout=120)
    assert last.returncode == 0, output
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].system_attrs["retry_history"] == [0, 1]


def _pause_outside_a_write(worker: subprocess.Popen, url: str) -> None:
    """SIGSTOP ``worker``, where it uses a SQLite file at a moment it holds none of its write
    lock: a paused writer keeps the file locked, which no other process can take from it, and
    the other worker could not fail the trial as stale."""
    while True:
        worker.send_signal(signal.SIGSTOP)
        if not url.startswith("sqlite"):
            return
        probe = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            worker.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "grpc"])
def test_a_worker_back_after_its_trial_was_retried_leaves_it_and_goes_on(tmp_path, write_spec, kind, request, monkeypatch):
    """A worker paused (or cut off) past the heartbeat grace finds, when it runs again, that its
    trial was failed and its retry taken by another worker: it leaves the trial to the retry and
    goes on, where it stopped with an error."""
    checkpoints = tmp_path / "checkpoints"
    with storage_of_kind(kind, request, tmp_path) as url:
        args, first = _worker_two_epochs_in(write_spec, url, "paused", checkpoints)
        _pause_outside_a_write(first, url)
        second = start_tuner(*args)
        study = _load(url, "paused")
        _wait_for(lambda: len(study.get_trials(states=(TrialState.RUNNING,))) == 1 and len(study.trials) == 2, what="the retry")
        first.send_signal(signal.SIGCONT)
        output, _ = first.communicate(timeout=120)
        assert first.returncode == 0, output
        assert "trial 0 was failed as stale and retried while this worker ran it" in output
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 0, output
        _assert_resumed(url, "paused", checkpoints, monkeypatch, "its worker stopped sending heartbeats")


@pytest.mark.parametrize("kind", ["sqlite", "journal", "grpc"])
def test_a_trial_failed_as_stale_while_its_worker_samples_it_is_left_to_its_retry(tmp_path, kind, request, monkeypatch):
    """The heartbeat beats while the trial is sampled, which may outlast the grace period. Where
    another worker failed the trial and queued its retry meanwhile (this one paused), the worker
    leaves the trial to the retry and goes on, where its refused parameters stopped it with
    UpdateFinishedTrialError."""
    with storage_of_kind(kind, request, tmp_path) as url:
        create_study(parse_spec(small_spec("sampled", budget={"n_trials": 1})), url)
        other = _load(url, "sampled")
        beating = []

        def sampled_while_failed_elsewhere(trial: optuna.Trial, space: SearchSpace, *, seed: int) -> Hyperparameters:
            beating.append(any("_record_heartbeat" in thread.name for thread in threading.enumerate()))
            if trial.number == 0:
                other._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                RetryStaleTrial(2)(other, other._storage.get_trial(trial._trial_id))
            return suggest(trial, space, seed=seed)

        monkeypatch.setattr("tuner.worker.suggest", sampled_while_failed_elsewhere)
        summary = run_worker("sampled", url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
        assert summary.trials == {"taken_over": 1, "complete": 1}
        assert [t.state for t in other.trials] == [TrialState.FAIL, TrialState.COMPLETE]
        assert beating == [True, True]


@pytest.mark.postgres
@pytest.mark.slow
def test_a_second_signal_while_the_trial_is_handed_back_lets_the_hand_back_finish(tmp_path, write_spec, postgres_url):
    """The second signal abandons an epoch, not the hand-back: raised inside the trial's end it
    broke the write off mid-query (a traceback, a reconnect), and between the trial's end and its
    copy's queuing it would leave the trial uncopied, lost to the budget. A trigger holds the
    trial's end in the server for seconds, so the signal lands there."""
    import psycopg

    database = f"{postgres_url.rsplit('/', 1)[1]}_handback"
    url = f"{postgres_url.rsplit('/', 1)[0]}/{database}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        assert tuner("create", str(write_spec(_fixed_spec("handback"))), "--storage", url).returncode == 0
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute("""
                CREATE FUNCTION slow_end() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN PERFORM pg_sleep(3); RETURN NEW; END $$;
                CREATE TRIGGER slow_end BEFORE UPDATE ON trials FOR EACH ROW
                    WHEN (NEW.state = 'FAIL' AND OLD.state = 'RUNNING') EXECUTE FUNCTION slow_end()""")
        worker = start_tuner(
            "worker", "--study", "handback", "--storage", url, "--threads", "1",
            "--checkpoint-dir", str(tmp_path / "checkpoints"),
        )
        _wait_for(lambda: _epochs_done(url, "handback") >= 1, what="an epoch")
        worker.send_signal(signal.SIGTERM)

        def ending() -> bool:
            with psycopg.connect(url, autocommit=True) as watcher:
                return watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event = 'PgSleep'", (database,)
                ).fetchone()[0] > 0

        _wait_for(ending, what="the trial's end in the server")
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        assert worker.returncode == 143, output
        assert "Traceback" not in output and "storage unreachable" not in output, output
        study = optuna.load_study(study_name="handback", storage=sqlalchemy_url(url))
        assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@contextmanager
def _sigint_ignored(ignored: bool) -> Iterator[None]:
    """What a script's ``cmd &`` does: the processes started meanwhile inherit SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.getsignal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("ignored", [False, True], ids=["terminal", "script-background"])
def test_ctrl_c_while_workers_start_stops_them_all(write_spec, sqlite_url, ignored):
    """The workers are still importing torch when the Ctrl-C comes: they stop, not fail or run on."""
    spec = small_spec("early", workload="paced_workload:paced", budget={"n_trials": 4})
    with _sigint_ignored(ignored):
        run = start_tuner("run", str(write_spec(spec)), "--workers", "2", "--storage", sqlite_url)
    parent = psutil.Process(run.pid)
    _wait_for(lambda: len(parent.children()) == 2, what="two workers")
    workers = parent.children()
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output
    assert "interrupted: 0 of 4 trials finished; run the same command again to resume" in output
    assert not any(worker.is_running() for worker in workers)


def _paced_run(write_spec, sqlite_url: str, name: str, budget: dict) -> tuple[tuple[str, ...], subprocess.Popen]:
    """``tuner run`` of a study of one paced trial of 8 epochs, without a pruner: its arguments
    and the process. A stop in the last epoch lets the trial finish: six epochs of 0.5 s after
    the first is seen leave time for a signal on a loaded machine."""
    spec = small_spec(name, workload="paced_workload:paced", budget=budget, pruner={"name": "none"})
    spec["search"]["epochs"] = {"low": 8, "high": 8}
    create_study(parse_spec(spec), sqlite_url)
    args = ("run", str(write_spec(spec)), "--storage", sqlite_url)
    return args, start_tuner(*args)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stopped", "stop_signal"),
    [("run", signal.SIGINT), ("run twice", signal.SIGINT), ("run", signal.SIGHUP), ("its worker", signal.SIGTERM)],
)
def test_ctrl_c_mid_run_exits_130_and_the_same_command_resumes(write_spec, sqlite_url, stopped, stop_signal):
    """Ctrl-C on the run, once or twice (the second abandons the epoch), its terminal closed
    (SIGHUP), or a SIGTERM sent to its one worker alone (kill PID), which leaves the budget as unmet."""
    args, run = _paced_run(write_spec, sqlite_url, "midrun", {"n_trials": 1})
    _wait_for(lambda: _epochs_done(sqlite_url, "midrun") >= 1, what="an epoch")
    target = psutil.Process(run.pid).children()[0] if stopped == "its worker" else run
    target.send_signal(stop_signal)
    if stopped == "run twice":
        time.sleep(0.1)  # two signals at once may reach the process as one
        target.send_signal(stop_signal)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + stop_signal, output
    if stopped != "its worker":
        assert f"{stop_signal.name}: stopping workers after their current epoch" in output
        assert ("SIGINT: stopping workers now, their current epoch abandoned" in output) == (stopped == "run twice")
    assert "interrupted: 0 of 1 trials finished; run the same command again to resume" in output, output
    study = optuna.load_study(study_name="midrun", storage=sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs["stop_reason"] == "worker_stopped"
    again = tuner(*args)
    assert again.returncode == 0, again.stderr
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["retried_from"] == 0


@pytest.mark.slow
def test_workers_of_a_killed_run_hand_their_trials_back_and_stop(write_spec, sqlite_url):
    """``tuner run`` SIGKILLed (the OOM killer, kill -9) forwards no signal: its workers see it
    gone, hand their trials back after the epoch and exit, and the same command resumes."""
    spec = small_spec("orphans", workload="paced_workload:paced", budget={"n_trials": 2}, pruner={"name": "none"})
    spec["search"]["epochs"] = {"low": 8, "high": 8}
    create_study(parse_spec(spec), sqlite_url)
    args = ("run", str(write_spec(spec)), "--workers", "2", "--storage", sqlite_url)
    run = start_tuner(*args)
    _wait_for(lambda: len(_load(sqlite_url, "orphans").get_trials(states=(TrialState.RUNNING,))) == 2, what="two trials")
    workers = psutil.Process(run.pid).children()
    run.kill()
    run.communicate(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive
    study = _load(sqlite_url, "orphans")
    # One worker may end its trial before it sees the run gone, where the other started late.
    handed_back = study.get_trials(states=(TrialState.FAIL,))
    assert handed_back and all(t.user_attrs["stop_reason"] == "worker_stopped" for t in handed_back)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    again = tuner(*args)
    assert again.returncode == 0, again.stderr
    assert len(_load(sqlite_url, "orphans").get_trials(states=(TrialState.COMPLETE,))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_study_deleted_while_it_runs_is_named(write_spec, sqlite_url, command):
    """``optuna delete-study`` while workers train (a study started over): Optuna's next read
    raised a bare KeyError('Record does not exist.')."""
    spec = small_spec("deleted", workload="paced_workload:paced", budget={"n_trials": 4}, pruner={"name": "none"})
    spec["search"]["epochs"] = {"low": 8, "high": 8}
    create_study(parse_spec(spec), sqlite_url)
    if command == "run":
        process = start_tuner("run", str(write_spec(spec)), "--storage", sqlite_url)
    else:
        process = start_tuner("worker", "--study", "deleted", "--storage", sqlite_url)
    _wait_for(lambda: _epochs_done(sqlite_url, "deleted") >= 1, what="an epoch")
    optuna.delete_study(study_name="deleted", storage=sqlite_url)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert output.rstrip().endswith(f"error: Study 'deleted' was deleted from storage {sqlite_url!r} while in use."), output


@pytest.mark.slow
def test_ctrl_c_past_a_spent_time_budget_does_not_promise_a_resume(write_spec, sqlite_url):
    """The time budget runs out while the worker trains its trial: Ctrl-C hands it back, and the
    same command would start no worker for it."""
    args, run = _paced_run(write_spec, sqlite_url, "overtime", {"timeout_s": 1})
    _wait_for(lambda: _epochs_done(sqlite_url, "overtime") >= 2, what="two epochs, past the budget's second")
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output
    assert "interrupted: 0 trials finished; the budget is met: the same command starts no more trials" in output
    again = tuner(*args)
    assert "has met its budget (its 1 s have passed); no workers started" in again.stderr


def _pg_cluster() -> tuple[str, str]:
    line = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True).stdout.split()
    return line[0], line[1]


@pytest.mark.postgres
@pytest.mark.slow
def test_workers_survive_a_database_restart(tmp_path, write_spec, postgres_url):
    spec = small_spec("restart", workload="user_workloads:slow_loop", budget={"n_trials": 12})
    spec["search"]["epochs"] = {"low": 3, "high": 4}
    assert tuner("create", str(write_spec(spec)), "--storage", postgres_url).returncode == 0
    workers = [start_tuner("worker", "--study", "restart", "--storage", postgres_url, "--threads", "1") for _ in range(3)]
    url = sqlalchemy_url(postgres_url)

    def finished() -> int:
        return len(optuna.load_study(study_name="restart", storage=url).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))

    _wait_for(lambda: finished() >= 2, what="two finished trials")
    version, cluster = _pg_cluster()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"], check=True)
    for worker in workers:
        output, _ = worker.communicate(timeout=180)
        assert worker.returncode == 0, output
    study = optuna.load_study(study_name="restart", storage=url)
    retried = {n for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in study.trials if t.number not in retried]
    assert len(counted) == 12 and all(t.state.is_finished() for t in counted)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.postgres
def test_a_worker_whose_proxy_loses_its_database_stops_and_leaves_its_trial_running(tmp_path, write_spec, postgres_url, monkeypatch):
    """The proxy's storage error reached the worker as gRPC's UNKNOWN, and the worker failed its
    trial for good as the workload's error; it now stops naming the proxy and its storage (exit
    2, as on a lost database), and leaves the trial running, to be retried once its lease runs
    out. A trigger ends the connection of every epoch's write, as a server that goes down does:
    the proxy waits its TUNER_DB_RETRY_S for nothing, while a trial's end could be written."""
    import psycopg

    database = f"{postgres_url.rsplit('/', 1)[1]}_proxied"
    url = f"{postgres_url.rsplit('/', 1)[0]}/{database}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")  # left by a run cut short
        admin.execute(f"CREATE DATABASE {database}")
    monkeypatch.setenv("TUNER_DB_RETRY_S", "1")  # the proxy's, and its worker's
    try:
        with serve_proxy(url) as grpc_url:
            _, worker = _worker_two_epochs_in(write_spec, grpc_url, "proxied", tmp_path / "checkpoints")
            with psycopg.connect(url, autocommit=True) as owner:
                owner.execute("""
                    CREATE FUNCTION lost() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$;
                    CREATE TRIGGER lost BEFORE INSERT ON trial_intermediate_values
                        FOR EACH ROW EXECUTE FUNCTION lost()""")
            output, _ = worker.communicate(timeout=60)
        assert worker.returncode == 2, output
        assert f"error: The gRPC proxy at '{grpc_url}' cannot use its storage: Lost the storage" in output
        [trial] = _load(url, "proxied").trials
        assert trial.state == TrialState.RUNNING and "error" not in trial.user_attrs
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A Redis server of the test's own, which keeps its data in an append-only file in
    ``folder`` across a restart, as a production server would."""
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    _wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0, 30, "Redis")
    return server


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["within the wait", "past the wait"])
def test_a_lost_redis_is_waited_for_and_past_the_wait_the_trial_resumes_once_it_is_back(tmp_path, write_spec, monkeypatch, outage):
    """A Redis restarted within ``TUNER_DB_RETRY_S`` is waited for and the trial trains on; one
    gone longer stops the worker, naming the server, and the trial, left running, is retried
    when its lease runs out. redis's own ConnectionError failed the trial for good, as the
    workload's error."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    monkeypatch.setenv("TUNER_DB_RETRY_S", "60" if outage == "within the wait" else "1")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    checkpoints = tmp_path / "checkpoints"
    server = _start_redis(port, tmp_path)
    try:
        args, first = _worker_two_epochs_in(write_spec, url, "lost", checkpoints)
        server.terminate()  # SIGTERM: Redis writes its file and exits
        server.wait(timeout=30)
        if outage == "within the wait":
            time.sleep(2)
            server = _start_redis(port, tmp_path)
            output, _ = first.communicate(timeout=120)
            assert first.returncode == 0, output
            assert "Redis unreachable" in output
            (trial,) = _load(url, "lost").trials
            assert trial.state == TrialState.COMPLETE
            assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
            return
        output, _ = first.communicate(timeout=120)
        assert first.returncode == 2, output
        assert f"Lost Redis at '{url}' and it did not come back" in output
        server = _start_redis(port, tmp_path)
        second = start_tuner(*args)
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 0, output
        _assert_resumed(url, "lost", checkpoints, monkeypatch, "its worker stopped sending heartbeats")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_budget_is_exact_with_eight_workers(tmp_path, write_spec, postgres_url, attempt):
    name = f"exact-{attempt}"
    spec = small_spec(name, workload="user_workloads:own_loop", budget={"n_trials": 30})
    result = tuner("run", str(write_spec(spec)), "--workers", "8", "--storage", postgres_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=name, storage=sqlalchemy_url(postgres_url))
    assert len(study.trials) == 30
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def test_a_raising_trial_fails_alone(sqlite_url, write_spec):
    spec = small_spec("sometimes", workload="user_workloads:raises_on_large_batch", budget={"n_trials": 8})
    spec["sampler"] = {"name": "random", "seed": 0}
    spec["search"]["batch_size"] = {"low": 32, "high": 256, "scale": "pow2"}
    assert tuner("create", str(write_spec(spec)), "--storage", sqlite_url).returncode == 0
    result = tuner("worker", "--study", "sometimes", "--storage", sqlite_url, "--worker-index", "0")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="sometimes", storage=sqlite_url)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(t.params["batch_size"] > 64 for t in failed)
    assert failed[0].user_attrs["error"].startswith("ValueError: batch")
    assert len([t for t in study.trials if t.state.is_finished()]) == 8
    listed = tuner("trials", "--study", "sometimes", "--storage", sqlite_url, "--format", "csv").stdout
    assert "ValueError: batch" in listed


def test_a_run_whose_every_trial_failed_exits_1(sqlite_url, write_spec):
    """Fewer failures than stop a worker, but no trial completed: no answer, and exit 1 says so."""
    spec = small_spec("all-failed", workload="user_workloads:raises", budget={"n_trials": 2})
    result = tuner("run", str(write_spec(spec)), "--storage", sqlite_url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No trial of study 'all-failed' completed (2 failed, 0 pruned)" in " ".join(result.stderr.split())


def test_a_broken_workload_stops_the_worker(sqlite_url, write_spec):
    spec = small_spec("broken", workload="user_workloads:raises", budget={"n_trials": 7})
    assert tuner("create", str(write_spec(spec)), "--storage", sqlite_url).returncode == 0
    result = tuner("worker", "--study", "broken", "--storage", sqlite_url)
    assert result.returncode == 1
    assert "5 consecutive failed trials" in result.stderr
    study = optuna.load_study(study_name="broken", storage=sqlite_url)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 5
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2


def test_a_study_made_again_under_its_name_trains_its_trials_afresh(tmp_path, sqlite_url):
    """Deleting the SQLite file and running the spec again makes a new study: its trial 0 must
    not resume from the checkpoint that the deleted study's trial 0 left in the same folder."""
    spec = parse_spec(small_spec("again", budget={"n_trials": 1}, pruner={"name": "none"}))
    options = WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "checkpoints", keep_checkpoints=True)
    create_study(spec, sqlite_url)
    run_worker("again", sqlite_url, options)
    Path(sqlite_url.removeprefix("sqlite:///")).unlink()
    create_study(spec, sqlite_url)
    run_worker("again", sqlite_url, options)
    (trial,) = optuna.load_study(study_name="again", storage=sqlite_url).trials
    assert trial.state == TrialState.COMPLETE
    assert "resumed_from_epoch" not in trial.user_attrs
    assert len(list((tmp_path / "checkpoints").rglob("trial-0.pt"))) == 2


def test_a_finished_trial_leaves_no_half_written_checkpoint(tmp_path, sqlite_url):
    """A worker killed while writing a checkpoint leaves its temp file beside it; the trial's end
    removes it with the checkpoint."""
    spec = parse_spec(small_spec("half", budget={"n_trials": 1}, pruner={"name": "none"}))
    folder = study_checkpoint_dir(create_study(spec, sqlite_url), tmp_path / "checkpoints")
    folder.mkdir(parents=True)
    (folder / ".trial-0.pt.99999.tmp").write_bytes(b"the first bytes of a checkpoint")
    run_worker("half", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "checkpoints"))
    assert optuna.load_study(study_name="half", storage=sqlite_url).trials[0].state == TrialState.COMPLETE
    assert not list(folder.iterdir())


def test_a_checkpoint_folder_that_cannot_be_made_stops_the_worker_before_its_first_trial(tmp_path, sqlite_url):
    """Every trial would fail on its first save, and the worker exit 1 with the bare OSError."""
    create_study(parse_spec(small_spec("nowhere", budget={"n_trials": 1}, pruner={"name": "none"})), sqlite_url)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BadInputError, match="checkpoint folder .*a-file.* cannot be created or written .*--checkpoint-dir"):
        run_worker("nowhere", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "a-file" / "checkpoints"))
    trials = optuna.load_study(study_name="nowhere", storage=sqlite_url).trials
    assert all(trial.state == TrialState.WAITING for trial in trials)


@pytest.mark.parametrize("workload", ["stopped_once_loop", "stopped_once_blobs"])
def test_a_retry_that_starts_again_records_its_own_epochs_only(tmp_path, sqlite_url, monkeypatch, workload):
    """A retry without a checkpoint to resume (a training function, or a torch trial whose
    checkpoint folder the next worker does not share) trains from epoch 1: its history is its
    own epochs, not its original's followed by its own."""
    monkeypatch.setenv("STOP_ONCE_FILE", str(tmp_path / "stopped"))
    spec = small_spec("again", workload=f"user_workloads:{workload}", budget={"n_trials": 1}, pruner={"name": "none"})
    spec["search"]["epochs"] = {"low": 4, "high": 4}
    create_study(parse_spec(spec), sqlite_url)
    run_worker("again", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "here"))
    run_worker("again", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "elsewhere"))
    original, retry = optuna.load_study(study_name="again", storage=sqlite_url).trials
    assert original.user_attrs["stop_reason"] == "worker_stopped" and original.user_attrs["history"]
    assert retry.state == TrialState.COMPLETE and "resumed_from_epoch" not in retry.user_attrs
    assert [entry["epoch"] for entry in retry.user_attrs["history"]] == [1, 2, 3, 4]


def test_a_retry_that_starts_again_shows_its_own_values_not_its_originals(tmp_path, sqlite_url, monkeypatch):
    """The retry inherits its original's per-epoch values; trained again from epoch 1 without
    repeating them, its own must be what the pruner and the dashboard see."""
    monkeypatch.setenv("STOP_ONCE_FILE", str(tmp_path / "stopped"))
    spec = small_spec("unrepeated", workload="user_workloads:stopped_once_unrepeatable_loop", budget={"n_trials": 1})
    spec["search"]["epochs"] = {"low": 4, "high": 4}
    create_study(parse_spec(spec), sqlite_url)
    run_worker("unrepeated", sqlite_url, WorkerOptions(device="cpu"))
    run_worker("unrepeated", sqlite_url, WorkerOptions(device="cpu"))
    original, retry = optuna.load_study(study_name="unrepeated", storage=sqlite_url).trials
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retried_from"] == original.number
    own = {entry["epoch"]: entry["val_accuracy"] for entry in retry.user_attrs["history"]}
    assert retry.intermediate_values == pytest.approx(own)
    assert retry.intermediate_values[1] != pytest.approx(original.intermediate_values[1])
