"""``tuner proxy``: Optuna's gRPC storage proxy, with a study created and run through it."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from conftest import TESTS, small_spec, start_tuner, tuner
from tuner.errors import StorageError
from tuner.spec import parse_spec
from tuner.storages import GrpcStorageProxy, claim_next_waiting_trial, make_storage, one_write, record_epochs, set_user_attrs, slot_counts
from tuner.study import WAITING_AHEAD, budget_state, create_study, load_study

ENV = {"PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}


# Optuna's own proxy, as a plain Optuna user would run it.
OPTUNA_PROXY = (
    "import sys, optuna; optuna.storages.run_grpc_proxy_server("
    "optuna.storages.get_storage(sys.argv[1]), host=sys.argv[2], port=int(sys.argv[3]))"
)


@contextmanager
def serve_proxy(
    storage: str, host: str = "127.0.0.1", timeout: float = 60, optuna_own: bool = False, port: int | None = None
) -> Iterator[str]:
    """Run ``tuner proxy`` (or Optuna's own) on ``port``, else a free port of ``host`` (an IPv6
    address in brackets, as gRPC takes it); yield its ``grpc://`` URL."""
    address = host.strip("[]")
    if storage.startswith("sqlite:///"):
        # tuner proxy serves a SQLite file that is there, as `tuner create` leaves it; in an
        # empty one it makes the tables.
        Path(storage.removeprefix("sqlite:///")).touch()
    if port is None:
        port = free_port(address)
    command = (
        [sys.executable, "-c", OPTUNA_PROXY, storage, host, str(port)] if optuna_own
        else [sys.executable, "-m", "tuner", "proxy", "--storage", storage, "--host", host, "--port", str(port)]
    )
    # A file, not a pipe: a pipe nobody reads fills up and blocks the proxy's next write.
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV})

    def printed() -> str:
        output.seek(0)
        return output.read()

    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, printed()
            try:
                socket.create_connection((address, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the proxy does not listen on {host}:{port}"
                time.sleep(0.2)
        yield f"grpc://{host}:{port}"
    finally:
        process.send_signal(signal.SIGTERM)  # as docker stop and Kubernetes stop it
        code = process.wait(timeout=30)
        assert optuna_own or code == 0, printed()
        output.close()


@contextmanager
def storage_of_kind(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL of each kind that tells a dead worker's trial: a database with its own
    heartbeats (``sqlite``, ``postgres``), leases on a journal file (``journal``), on Redis (``redis``) and
    through ``tuner proxy`` on SQLite (``grpc``)."""
    if kind in ("sqlite", "postgres", "redis"):
        yield request.getfixturevalue(f"{kind}_url")
    elif kind == "journal":
        yield str(tmp_path / "journal.log")
    else:
        with serve_proxy(request.getfixturevalue("sqlite_url")) as url:
            yield url


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as probe:
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("where", "refusal"),
    [
        ("{}/study.log", "The gRPC proxy serves database storages only"),
        # As every command but `tuner create` and `tuner run` refuses it: an empty file was made.
        ("sqlite:///{}/missing.db", "{url}: no such file; studies are created by `tuner create` or `tuner run`."),
    ],
    ids=["journal", "missing sqlite"],
)
def test_proxy_refuses_a_storage_it_cannot_serve_and_makes_no_file(tmp_path: Path, where: str, refusal: str):
    url = where.format(tmp_path)
    result = tuner("proxy", "--storage", url, "--port", str(free_port()), timeout=30)
    assert result.returncode == 2, result.stderr
    assert refusal.format(url=url) in result.stderr
    assert list(tmp_path.iterdir()) == []


def _has_ipv6_loopback() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_a_proxy_on_an_ipv6_address_is_reached_at_the_url_it_prints(sqlite_url, write_spec):
    """``tuner proxy --host [::1]`` says it serves grpc://[::1]:PORT: that URL must open."""
    assert tuner("create", str(write_spec(small_spec("six"))), "--storage", sqlite_url).returncode == 0
    with serve_proxy(sqlite_url, host="[::1]") as url:
        assert url.startswith("grpc://[::1]:")
        result = tuner("status", "--study", "six", "--storage", url, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "six" in result.stdout


def test_a_second_proxy_on_a_served_port_is_refused(tmp_path: Path, sqlite_url):
    """gRPC would let the second bind the port too and share the workers' calls between the
    two proxies' databases; it must fail as any taken port does."""
    with serve_proxy(sqlite_url) as url:
        port = url.rpartition(":")[2]
        (tmp_path / "other.db").touch()
        result = tuner("proxy", "--storage", f"sqlite:///{tmp_path / 'other.db'}", "--port", port, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"Cannot listen on 127.0.0.1:{port}" in result.stderr


def test_study_is_created_and_run_through_the_proxy(sqlite_url, write_spec, tmp_path: Path):
    """Behind the proxy a worker cannot lock the database: the proxy makes the slots, never
    more than the budget, and never the whole budget at once."""
    spec = small_spec("slots", workload="paced_workload:paced", budget={"n_trials": 24})
    env = {**ENV, "TUNER_TEST_EPOCH_S": "0"}
    with serve_proxy(sqlite_url) as url:
        created = tuner("create", str(write_spec(spec)), "--storage", url, env=env)
        assert created.returncode == 0, created.stderr
        made = optuna.load_study(study_name="slots", storage=sqlite_url).trials
        assert len(made) == WAITING_AHEAD
        assert "fixed_params" in made[0].system_attrs  # the centre of the space comes first
        workers = [
            start_tuner("worker", "--study", "slots", "--storage", url, "--device", "cpu",
                        "--checkpoint-dir", str(tmp_path / "checkpoints"), env=env)
            for _ in range(2)
        ]
        for worker in workers:
            output, _ = worker.communicate(timeout=240)
            assert worker.returncode == 0, output
        best = tuner("best", "--study", "slots", "--storage", url, "--format", "json", env=env)
        assert best.returncode == 0, best.stderr
    trials = optuna.load_study(study_name="slots", storage=sqlite_url).trials
    assert [t.number for t in trials] == list(range(24))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}


def test_optuna_own_proxy_is_named_instead_of_leaving_the_budget_unmet(sqlite_url, write_spec, tmp_path: Path):
    spec = small_spec("plain", workload="paced_workload:paced", budget={"n_trials": 20})
    env = {**ENV, "TUNER_TEST_EPOCH_S": "0"}
    with serve_proxy(sqlite_url, optuna_own=True) as url:
        created = tuner("create", str(write_spec(spec)), "--storage", url, env=env)
        assert created.returncode != 0
        assert "tuner proxy" in created.stderr
        # Made on the database, which makes the first slots; the workers behind Optuna's proxy
        # run those, then say why the rest cannot run.
        assert tuner("create", str(write_spec(spec)), "--storage", sqlite_url, env=env).returncode == 0
        worked = tuner("worker", "--study", "plain", "--storage", url, "--device", "cpu",
                       "--checkpoint-dir", str(tmp_path / "checkpoints"), env=env)
    assert worked.returncode != 0
    assert "tuner proxy" in worked.stderr
    states = [t.state for t in optuna.load_study(study_name="plain", storage=sqlite_url).trials]
    assert len(states) == WAITING_AHEAD
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}


@pytest.mark.parametrize("optuna_own", [False, True], ids=["tuner proxy", "optuna proxy"])
def test_records_and_intermediate_value_read_back_through_either_proxy(tmp_path: Path, optuna_own: bool):
    """tuner proxy takes a trial's records and intermediate values in one call; behind Optuna's
    own proxy, which has no such call, the worker writes them one call each."""
    with serve_proxy(f"sqlite:///{tmp_path}/proxied.db", optuna_own=optuna_own) as url:
        storage = make_storage(url)
        study = optuna.create_study(study_name="records", storage=storage)
        trial = study.ask()
        history = [{"epoch": 1, "val_accuracy": 0.5}]
        record_epochs(trial, {1: 0.5, 2: 0.75}, {"history": history, "worker": "w1"})
        set_user_attrs(trial, {"worker": "w1", "duration_s": 1.5})
        stored = optuna.load_study(study_name="records", storage=make_storage(url)).trials[0]
        assert stored.intermediate_values == {1: 0.5, 2: 0.75}
        assert stored.user_attrs == {"history": history, "worker": "w1", "duration_s": 1.5}
        assert storage._served_by_tuner is not optuna_own


@pytest.mark.parametrize("optuna_own", [False, True], ids=["tuner proxy", "optuna proxy"])
def test_claims_through_either_proxy_take_each_slot_once_with_who_runs_it(sqlite_url, optuna_own: bool):
    """tuner proxy claims a trial and writes who runs it in one call, and makes slots once half
    of them are taken; behind Optuna's own proxy, which has no such call, the worker races for
    the waiting trials and makes no slots."""
    create_study(parse_spec(small_spec("claims", budget={"n_trials": 40})), sqlite_url)
    claims = WAITING_AHEAD // 2 + 1
    with serve_proxy(sqlite_url, optuna_own=optuna_own) as url:
        storage = make_storage(url)
        study_id = storage.get_study_id_from_name("claims")
        claimed = [claim_next_waiting_trial(storage, study_id, {"worker": f"w{n}"}) for n in range(claims)]
        assert storage._served_by_tuner is not optuna_own
        # The proxy takes parameters only for the trials it knows.
        storage.set_trial_param(claimed[0], "x", 0.5, FloatDistribution(0, 1))
    trials = {t._trial_id: t for t in optuna.load_study(study_name="claims", storage=sqlite_url).trials}
    assert [trials[trial_id].number for trial_id in claimed] == list(range(claims))
    assert [trials[trial_id].user_attrs["worker"] for trial_id in claimed] == [f"w{n}" for n in range(claims)]
    assert {trials[trial_id].state for trial_id in claimed} == {TrialState.RUNNING}
    assert trials[claimed[0]].params == {"x": 0.5}
    waiting = sum(t.state == TrialState.WAITING for t in trials.values())
    assert waiting == (WAITING_AHEAD - claims if optuna_own else WAITING_AHEAD)
    assert sorted(t.number for t in trials.values()) == list(range(len(trials)))


@pytest.mark.parametrize("optuna_own", [False, True], ids=["tuner proxy", "optuna proxy"])
def test_writes_held_through_either_proxy_arrive_as_the_block_ends(sqlite_url, optuna_own: bool):
    """Within ``one_write`` a trial's parameters and records wait in the worker and arrive as
    the block ends: through tuner proxy in one call, through Optuna's own one call each."""
    create_study(parse_spec(small_spec("held", budget={"n_trials": 4})), sqlite_url)
    direct = make_storage(sqlite_url)
    with serve_proxy(sqlite_url, optuna_own=optuna_own) as url:
        study = optuna.load_study(study_name="held", storage=make_storage(url))
        trial = optuna.Trial(study, claim_next_waiting_trial(study._storage, study._study_id, {"worker": "w1"}))
        with one_write(study._storage):
            x = trial.suggest_float("x", 0, 1)
            record_epochs(trial, {1: 0.5}, {"duration_s": 1.5})
            assert direct.get_trial(trial._trial_id).params == {}
            assert study._storage.get_trial(trial._trial_id).params == {"x": x}
        stored = direct.get_trial(trial._trial_id)
        assert stored.params == {"x": x} and stored.intermediate_values == {1: 0.5}
        assert stored.user_attrs == {"worker": "w1", "duration_s": 1.5}
        with one_write(study._storage):
            study.tell(trial, 0.75)
    stored = direct.get_trial(trial._trial_id)
    assert stored.state == TrialState.COMPLETE and stored.value == 0.75


def test_a_trial_ended_meanwhile_refuses_its_end_and_its_records_through_tuner_proxy(sqlite_url):
    """A kept trial's end goes with its held records in one transaction: where another process
    ended the trial meanwhile (failed it as stale), the proxy refuses both, as a database does."""
    create_study(parse_spec(small_spec("ended", budget={"n_trials": 4})), sqlite_url)
    direct = make_storage(sqlite_url)
    with serve_proxy(sqlite_url) as url:
        study = optuna.load_study(study_name="ended", storage=make_storage(url))
        trial = optuna.Trial(study, claim_next_waiting_trial(study._storage, study._study_id, {"worker": "w1"}))
        with pytest.raises(UpdateFinishedTrialError):
            with one_write(study._storage):
                record_epochs(trial, {1: 0.5}, {"duration_s": 1.5})
                direct.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                study.tell(trial, 0.75)
    stored = direct.get_trial(trial._trial_id)
    assert stored.state == TrialState.FAIL and stored.value is None
    assert stored.intermediate_values == {} and stored.user_attrs == {"worker": "w1"}


@pytest.mark.parametrize("optuna_own", [False, True], ids=["tuner proxy", "optuna proxy"])
def test_the_budget_reads_through_either_proxy_as_on_the_database(sqlite_url, optuna_own: bool, monkeypatch):
    """tuner proxy counts a study's trials by state in one query, where Optuna's own proxy
    sends every trial; either way the budget and its clock read as on the database, and through
    tuner proxy also from a proxy whose clock keeps another time zone."""
    if not optuna_own:  # Optuna's own sends the trials' times naive, in the proxy's time zone
        monkeypatch.setenv("TZ", "Asia/Kolkata")  # the proxy's; this process keeps its own
    create_study(parse_spec(small_spec("counted", budget={"n_trials": 40})), sqlite_url)
    direct = make_storage(sqlite_url)
    study_id = direct.get_study_id_from_name("counted")
    for worker in ("w1", "w2"):
        claim_next_waiting_trial(direct, study_id, {"worker": worker})
    direct.set_trial_state_values(direct.get_all_trials(study_id)[0]._trial_id, TrialState.COMPLETE, [0.5])
    expected = budget_state(*load_study("counted", direct))
    with serve_proxy(sqlite_url, optuna_own=optuna_own) as url:
        storage = make_storage(url)
        assert (slot_counts(storage, study_id) is None) is optuna_own
        state = budget_state(*load_study("counted", storage))
    assert (state.finished, state.running, state.waiting) == (expected.finished, expected.running, expected.waiting) == (1, 1, WAITING_AHEAD - 2)
    assert expected.elapsed_s <= state.elapsed_s < expected.elapsed_s + 30


def test_a_worker_waits_for_a_proxy_that_comes_back_and_names_one_that_does_not(sqlite_url, monkeypatch):
    """A proxy restarted while its workers run (docker stop, a pod moved): their calls wait for
    it, for up to TUNER_DB_RETRY_S as for a lost database, and the trial's records and end
    arrive; where it does not come back in time the error names it. The first call failed the
    trial, which stayed RUNNING for good behind the proxy, and the worker exited with gRPC's
    raw error."""
    create_study(parse_spec(small_spec("restarted", budget={"n_trials": 2})), sqlite_url)
    direct = make_storage(sqlite_url)
    trial_id = claim_next_waiting_trial(direct, direct.get_study_id_from_name("restarted"), {"worker": "w1"})
    port = free_port()
    storage = GrpcStorageProxy(host="127.0.0.1", port=port)  # as a worker holds it: nothing listens now
    monkeypatch.setenv("TUNER_DB_RETRY_S", "0")
    with pytest.raises(StorageError, match=f"Lost the gRPC proxy at 'grpc://127.0.0.1:{port}'"):
        storage.get_study_id_from_name("restarted")
    monkeypatch.setenv("TUNER_DB_RETRY_S", "60")

    def end() -> None:
        with one_write(storage):
            storage.record_epochs(trial_id, {1: 0.5}, {"duration_s": 1.5})
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])

    with ThreadPoolExecutor(1) as pool:
        ended = pool.submit(end)
        with serve_proxy(sqlite_url, port=port):
            ended.result(timeout=30)
    stored = make_storage(sqlite_url).get_trial(trial_id)  # ``direct`` keeps the trial it claimed
    assert stored.state == TrialState.COMPLETE and stored.intermediate_values == {1: 0.5}
    assert stored.user_attrs == {"worker": "w1", "duration_s": 1.5}


def test_a_call_in_flight_as_the_proxy_stops_is_answered(sqlite_url, monkeypatch):
    """SIGTERM (docker stop, a pod moved) lets the calls under way finish: a claim cut off after
    it reached the database would be sent again, and the trial claimed first would stay RUNNING
    for good behind the proxy, with no worker."""
    create_study(parse_spec(small_spec("stopped", budget={"n_trials": 2})), sqlite_url)
    monkeypatch.setenv("TUNER_DB_RETRY_S", "3")
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    with ThreadPoolExecutor(2) as pool:
        with serve_proxy(sqlite_url) as url:
            storage = make_storage(url)
            study_id = storage.get_study_id_from_name("stopped")
            lock.execute("BEGIN EXCLUSIVE")  # the claim waits for the database inside the proxy
            claim = pool.submit(claim_next_waiting_trial, storage, study_id, {"worker": "w1"})
            time.sleep(0.5)
            pool.submit(lambda: (time.sleep(1), lock.rollback()))
        trial_id = claim.result(timeout=30)
    lock.close()
    running = optuna.load_study(study_name="stopped", storage=sqlite_url).get_trials(states=(TrialState.RUNNING,))
    assert [(trial._trial_id, trial.user_attrs["worker"]) for trial in running] == [(trial_id, "w1")]


def test_a_study_run_in_part_loads_again_through_tuner_proxy(sqlite_url):
    """A study stopped part way (Ctrl-C on tuner run) holds fewer slots than the budget and
    fewer than ``WAITING_AHEAD`` waiting, though enough that the proxy makes no more until a
    claim: run again through tuner proxy it loads, where it was refused as if behind Optuna's
    own proxy, which makes no slots."""
    spec = parse_spec(small_spec("again", budget={"n_trials": 40}))
    create_study(spec, sqlite_url)
    direct = make_storage(sqlite_url)
    study_id = direct.get_study_id_from_name("again")
    for worker in range(WAITING_AHEAD // 4):
        claim_next_waiting_trial(direct, study_id, {"worker": f"w{worker}"})
    with serve_proxy(sqlite_url) as url:
        study = create_study(spec, url)
        state = budget_state(study, spec)
    assert (state.running, state.waiting) == (WAITING_AHEAD // 4, WAITING_AHEAD - WAITING_AHEAD // 4)
