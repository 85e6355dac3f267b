"""The storage layer against real databases: lost connections are waited out."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from conftest import small_spec, tuner
from test_proxy import storage_of_kind
from tuner.storages import _rdb_reads
from tuner.storages._reconnect import permanent_error
from tuner.errors import StorageError, TunerError
from tuner.spec import Objective, parse_spec
from tuner.study import create_study
from tuner.storages import LEASE, PromptJournalFileLock, claim_next_waiting_trial, make_storage, one_write, rdb_backend, record_epochs, set_user_attrs, slot_maker, sqlalchemy_url
from tuner.train import reporter as reporter_module


@pytest.mark.postgres
def test_a_connection_killed_mid_query_is_reconnected(postgres_url):
    storage = make_storage(postgres_url)
    study = optuna.create_study(study_name="killed", storage=storage)
    study.enqueue_trial({"x": 1.0})
    admin = sqlalchemy.create_engine(sqlalchemy_url(postgres_url), isolation_level="AUTOCOMMIT")
    killed = []

    # The server ends this connection just before Optuna's first query on the trials table, as a
    # restart does; Optuna's fallback query then fails in the same session.
    @sqlalchemy.event.listens_for(storage.engine, "before_cursor_execute")
    def kill_once(connection, cursor, statement, parameters, context, executemany):
        if not killed and "FROM trials" in statement:
            killed.append(connection.connection.dbapi_connection.info.backend_pid)
            with admin.connect() as other:
                other.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": killed[0]})

    trials = storage.get_all_trials(study._study_id)
    admin.dispose()
    assert killed, "the fault was never injected"
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.WAITING]


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Make a file that this process cannot write: by its mode, or for root, whom modes do not
    stop, by the immutable attribute (taken off again after the test)."""
    immutable: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o444)
        elif shutil.which("chattr") and subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0:
            immutable.append(path)
        try:
            path.open("r+b").close()
        except PermissionError:
            return
        pytest.skip(f"cannot make {path} read-only here")

    yield make
    for path in immutable:
        subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.parametrize("scheme", ["sqlite:///", "sqlite+pysqlite:///"])
def test_a_database_url_ending_in_log_opens_the_database_not_a_journal(tmp_path, monkeypatch, scheme):
    """Only a plain path ending in ``.log`` is a journal: the URL's scheme read as a folder made
    a journal file at ./sqlite:/study.log."""
    monkeypatch.chdir(tmp_path)
    assert rdb_backend(make_storage(f"{scheme}study.log")) is not None
    assert not [path for path in tmp_path.iterdir() if path.is_dir()]
    assert (tmp_path / "study.log").read_bytes().startswith(b"SQLite format 3")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("attempt to write a readonly database", StorageError),
        ("file is not a database", StorageError),
        ("database disk image is malformed", StorageError),
        ("database or disk is full", TunerError),
        ("database is locked", None),
    ],
)
def test_a_sqlite_error_without_its_code_name_is_told_by_its_message(message, expected):
    """Python 3.10's sqlite3 raises its errors without ``sqlite_errorname``; there a read-only
    file was retried for TUNER_DB_RETRY_S as a lost connection."""
    error = sqlite3.OperationalError(message)
    assert not hasattr(error, "sqlite_errorname")
    refused = permanent_error(error, "sqlite:///study.db")
    if expected is None:
        assert refused is None
    else:
        assert type(refused) is expected and str(refused).endswith(f": {message}.")


def test_a_read_only_sqlite_file_fails_at_once_instead_of_being_retried(tmp_path, write_spec, read_only):
    """A file that cannot be written stays so: waiting out TUNER_DB_RETRY_S as for a lost
    connection only delays the error."""
    url = f"sqlite:///{tmp_path / 'read-only.db'}"
    make_storage(url).engine.dispose()
    read_only(tmp_path / "read-only.db")
    started = time.monotonic()
    result = tuner("create", str(write_spec(small_spec("refused"))), "--storage", url, env={"TUNER_DB_RETRY_S": "60"})
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    assert f"Storage {url!r} is read-only: attempt to write a readonly database" in result.stderr
    assert "retrying" not in result.stderr


# Each raised by the server itself: a trigger that fails the study's insert as PostgreSQL fails
# a write it has no disk for, and a database that takes no writes, as a hot standby does.
POSTGRES_REFUSALS = {
    "disk_full": (
        """CREATE FUNCTION no_space() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
               RAISE EXCEPTION 'could not extend file "base/1/2": No space left on device'
               USING ERRCODE = 'disk_full'; END $$;
           CREATE TRIGGER no_space BEFORE INSERT ON studies FOR EACH ROW EXECUTE FUNCTION no_space()""",
        1, "is on a full disk: could not extend file",
    ),
    "read_only": (
        "ALTER DATABASE {database} SET default_transaction_read_only = on",
        2, "is read-only: cannot execute INSERT in a read-only transaction",
    ),
}


@pytest.mark.postgres
@pytest.mark.parametrize("refusal", POSTGRES_REFUSALS)
def test_a_postgres_server_that_refuses_writes_for_good_fails_at_once(postgres_url, write_spec, refusal):
    """A full disk and a read-only server stay so past TUNER_DB_RETRY_S: retried as a lost
    connection, they would only delay the error and then call the storage lost."""
    import psycopg

    statement, exit_code, message = POSTGRES_REFUSALS[refusal]
    database = f"{postgres_url.rsplit('/', 1)[1]}_{refusal}"
    url = f"{postgres_url.rsplit('/', 1)[0]}/{database}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        make_storage(url).engine.dispose()
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(statement.format(database=database))
        started = time.monotonic()
        result = tuner("create", str(write_spec(small_spec("refused"))), "--storage", url, env={"TUNER_DB_RETRY_S": "60"})
        assert time.monotonic() - started < 30
        assert result.returncode == exit_code, result.stderr
        assert f"Storage {sqlalchemy_url(url)!r} {message}" in result.stderr
        assert "retrying" not in result.stderr
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


CLAIMS = {
    "optuna": lambda storage, trial_id: storage.set_trial_state_values(trial_id, TrialState.RUNNING),
    "tuner": lambda storage, trial_id: storage.claim_next_waiting_trial(
        storage.get_study_id_from_name("claim"), {"worker": "w"}
    ) == trial_id,
}


@pytest.mark.parametrize("claim", CLAIMS)
def test_two_workers_cannot_both_claim_one_sqlite_trial(sqlite_url, monkeypatch, caplog, claim):
    monkeypatch.setenv("TUNER_DB_RETRY_S", "30")
    first, second = make_storage(sqlite_url), make_storage(sqlite_url)
    study = optuna.create_study(study_name="claim", storage=first)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials()[0]._trial_id
    first_has_read, second_has_claimed = threading.Event(), threading.Event()

    # The first claim is held between its read of the WAITING state and its write, while the
    # second claim tries from start to end: the interleaving that would make a double claim.
    # The second must wait for the first to commit, then find the trial taken.
    @sqlalchemy.event.listens_for(first.engine, "before_cursor_execute")
    def pause_before_write(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith(("UPDATE trials", "INSERT INTO trial_user")) and not first_has_read.is_set():
            first_has_read.set()
            second_has_claimed.wait(1.0)

    def claim_second() -> None:
        assert first_has_read.wait(30)
        outcomes["second"] = CLAIMS[claim](second, trial_id)
        second_has_claimed.set()

    outcomes: dict[str, bool] = {}
    thread = threading.Thread(target=claim_second)
    thread.start()
    outcomes["first"] = CLAIMS[claim](first, trial_id)
    thread.join(30)
    assert outcomes == {"first": True, "second": False}
    assert "unreachable" not in caplog.text


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_user_attrs_written_in_one_go_read_back(kind, sqlite_url, tmp_path):
    url = sqlite_url if kind == "sqlite" else str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="attrs", storage=make_storage(url))
    trial = study.ask()
    expected = {"history": [{"epoch": 1, "val_accuracy": 0.5}], "epochs_completed": 1}
    set_user_attrs(trial, expected)
    assert trial.user_attrs == expected
    assert optuna.load_study(study_name="attrs", storage=make_storage(url)).trials[0].user_attrs == expected


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_epoch_record_and_intermediate_value_read_back(kind, sqlite_url, tmp_path):
    url = sqlite_url if kind == "sqlite" else str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="epochs", storage=make_storage(url))
    trial = study.ask()
    record_epochs(trial, {1: 0.5}, {"history": [{"epoch": 1, "val_accuracy": 0.5}]})
    record_epochs(trial, {2: 0.75, 3: 0.875}, {})
    stored = optuna.load_study(study_name="epochs", storage=make_storage(url)).trials[0]
    assert stored.intermediate_values == {1: 0.5, 2: 0.75, 3: 0.875}
    assert stored.user_attrs == {"history": [{"epoch": 1, "val_accuracy": 0.5}]}
    assert trial._cached_frozen_trial.intermediate_values == {1: 0.5, 2: 0.75, 3: 0.875}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_held_attributes_are_not_written_again_and_a_grown_history_is(kind, sqlite_url, tmp_path):
    url = sqlite_url if kind == "sqlite" else str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="held", storage=make_storage(url))
    trial = study.ask()
    history = [{"epoch": 1, "val_accuracy": 0.5}]
    record_epochs(trial, {1: 0.5}, {"history": history, "worker": "w1"})
    lines = len(Path(url).read_text().splitlines()) if kind == "journal" else None
    set_user_attrs(trial, {"worker": "w1", "history": history})
    if kind == "journal":
        assert len(Path(url).read_text().splitlines()) == lines
    history.append({"epoch": 2, "val_accuracy": 0.75})
    set_user_attrs(trial, {"worker": "w1", "history": history})
    if kind == "journal":
        assert len(Path(url).read_text().splitlines()) == lines + 1
    stored = optuna.load_study(study_name="held", storage=make_storage(url)).trials[0]
    assert stored.user_attrs == {"history": history, "worker": "w1"}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_trials_writes_within_one_write_are_one_transaction(backend, request):
    """Sampled parameters, records and an attribute commit together as the block ends; a read
    of the trial within commits them first, and a write refused (a finished trial's) is raised
    as the block ends."""
    url = request.getfixturevalue(f"{backend}_url")
    name = f"together-{request.node.name[-9:]}"
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    # A study's first trial tells the process the parameters' distributions; later ones are checked against them.
    study.tell(study.ask({"epochs": optuna.distributions.IntDistribution(2, 10)}), state=TrialState.PRUNED)
    trial = study.ask()
    engine = rdb_backend(study._storage).engine
    writes, reads, commits = [], [], []  # a commit of writes: how many writes and reads it committed

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def count_write(connection, cursor, statement, *args):
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE"):
            writes.append(statement)
        elif statement.lstrip()[:6].upper() == "SELECT":
            reads.append(statement)

    @sqlalchemy.event.listens_for(engine, "commit")
    def count_commit(connection):
        if writes:
            commits.append((len(writes), len(reads)))
            writes.clear()
        reads.clear()

    with one_write(study._storage):
        trial.suggest_int("epochs", 2, 10)
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        record_epochs(trial, {1: 0.5}, {"worker": "w1"})
        study._storage.set_trial_system_attr(trial._trial_id, "note", "n")
        assert commits == []
        assert optuna.load_study(study_name=name, storage=make_storage(url)).trials[1].params == {}
    # Five writes and three reads: the trial's state, checked once for all of them, and for the
    # parameter this process has not seen, Optuna's own write (the trial, the study's earlier
    # distribution of it); the parameter it has seen is written without a read.
    assert commits == [(5, 3)]
    stored = optuna.load_study(study_name=name, storage=make_storage(url)).trials[1]
    assert stored.params == trial.params and set(stored.params) == {"epochs", "lr"}
    assert stored.intermediate_values == {1: 0.5}
    assert stored.user_attrs == {"worker": "w1"}
    assert stored.system_attrs["note"] == "n"

    with one_write(study._storage):
        record_epochs(trial, {2: 0.75}, {})
        assert study._storage.get_trial(trial._trial_id).intermediate_values == {1: 0.5, 2: 0.75}
    study.tell(trial, 0.75)
    with pytest.raises(UpdateFinishedTrialError):
        with one_write(study._storage):
            record_epochs(trial, {3: 0.8}, {})
    assert optuna.load_study(study_name=name, storage=make_storage(url)).trials[1].intermediate_values == {1: 0.5, 2: 0.75}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_trials_parameters_held_together_go_in_as_one_statement(backend, request):
    """The parameters a trial samples within one block are one insert of many rows, each read
    back as sampled; one whose distribution differs from the study's is refused, and the others
    are still written."""
    url = request.getfixturevalue(f"{backend}_url")
    name = f"params-{request.node.name[-9:]}"
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    space = {
        "batch_size": optuna.distributions.IntDistribution(16, 1024, log=True),
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "epochs": optuna.distributions.IntDistribution(2, 10),
    }
    study.tell(study.ask(space), state=TrialState.PRUNED)
    trial = study.ask()
    inserts = []

    @sqlalchemy.event.listens_for(rdb_backend(study._storage).engine, "before_cursor_execute")
    def count(connection, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_PARAMS"):
            inserts.append(statement)

    with one_write(study._storage):
        sampled = {
            "batch_size": trial.suggest_int("batch_size", 16, 1024, log=True),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "epochs": trial.suggest_int("epochs", 2, 10),
        }
    assert len(inserts) == 1
    assert optuna.load_study(study_name=name, storage=make_storage(url)).trials[1].params == sampled

    other = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        with one_write(study._storage):
            other.suggest_int("epochs", 2, 10)
            other.suggest_categorical("lr", ["a", "b"])
    assert optuna.load_study(study_name=name, storage=make_storage(url)).trials[2].params == {"epochs": other.params["epochs"]}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("slot", ["blank", "retry"])
def test_a_trial_claimed_here_reads_as_stored_without_a_query(backend, slot, request):
    """The claimer reads its running trial from its own copy: every kind of write shows in it
    as in a read of the database, no statement is sent for it, and once told the trial is read
    from the database again."""
    url = request.getfixturevalue(f"{backend}_url")
    name = f"kept-{slot}-{request.node.name[-9:]}"
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    if slot == "blank":
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    else:  # what Optuna's retry callback leaves: parameters, attributes and values of the original
        study.enqueue_trial({"lr": 0.01}, user_attrs={"origin": 0})
        study._storage.set_trial_system_attr(study.trials[0]._trial_id, "retry_history", [0])
    backend_storage = rdb_backend(study._storage)
    trial_id = claim_next_waiting_trial(study._storage, study._study_id, {"worker": "w1"})
    statements = []

    @sqlalchemy.event.listens_for(backend_storage.engine, "before_cursor_execute")
    def count(connection, cursor, statement, *args):
        statements.append(statement)

    trial = optuna.Trial(study, trial_id)
    assert statements == []
    with one_write(study._storage):
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [16, 32])
        record_epochs(trial, {1: 0.5, 2: float("nan")}, {"history": [{"epoch": 1}]})
    trial.set_user_attr("note", ("a", 1))
    trial.report(0.75, 3)
    trial.set_constraint("out_of_memory", 1.0)
    study._storage.set_trial_system_attr(trial_id, "artifact", {"id": "x"})
    statements.clear()
    kept = study._storage.get_trial(trial_id)
    assert statements == []
    stored = optuna.load_study(study_name=name, storage=make_storage(url)).trials[0]
    for field in ("number", "state", "params", "distributions", "user_attrs", "system_attrs", "datetime_start"):
        assert getattr(kept, field) == getattr(stored, field), field
    assert kept.intermediate_values.keys() == stored.intermediate_values.keys() == {1, 2, 3}
    assert math.isnan(kept.intermediate_values[2]) and math.isnan(stored.intermediate_values[2])
    assert kept.intermediate_values[3] == stored.intermediate_values[3] == 0.75

    study.tell(trial, 0.9)
    statements.clear()
    told = study._storage.get_trial(trial_id)
    assert told.state == TrialState.COMPLETE and told.value == 0.9
    assert statements, "a told trial must be read from the database"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_heartbeat_is_one_statement_that_moves_one_row_forward(backend, request):
    url = request.getfixturevalue(f"{backend}_url")
    storage = make_storage(url)
    study = optuna.create_study(study_name=f"beat-{backend}", storage=storage)
    trial_id = study.ask()._trial_id
    backend_storage = rdb_backend(storage)
    statements = []

    @sqlalchemy.event.listens_for(backend_storage.engine, "before_cursor_execute")
    def count(connection, cursor, statement, *args):
        statements.append(statement)

    beats = []
    for _ in range(2):
        backend_storage.record_heartbeat(trial_id)
        with backend_storage.engine.connect() as connection:
            query = sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :trial_id")
            beats.append(connection.execute(query, {"trial_id": trial_id}).scalars().all())
        time.sleep(1.1)  # SQLite's CURRENT_TIMESTAMP counts whole seconds
    assert len([s for s in statements if "trial_heartbeats" in s and not s.startswith("SELECT heartbeat")]) == 2
    assert len(beats[0]) == len(beats[1]) == 1
    assert beats[1][0] > beats[0][0]
    assert backend_storage._get_stale_trial_ids(study._study_id) == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("ended_elsewhere", [False, True], ids=["told", "failed-meanwhile"])
def test_a_trial_run_here_ends_in_one_transaction_with_its_records(backend, ended_elsewhere, request):
    """The records held as a trial ends and its state and value commit together, with no read;
    a trial another process ended meanwhile (failed as stale) refuses the end and keeps none of
    the records."""
    url = request.getfixturevalue(f"{backend}_url")
    name = f"end-{ended_elsewhere}-{request.node.name[-9:]}"
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    trial = optuna.Trial(study, claim_next_waiting_trial(study._storage, study._study_id, {"worker": "w1"}))
    if ended_elsewhere:
        make_storage(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)
    engine = rdb_backend(study._storage).engine
    commits, statements = [], []

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def count(connection, cursor, statement, *args):
        statements.append(statement.lstrip()[:6].upper())

    @sqlalchemy.event.listens_for(engine, "commit")
    def count_commit(connection):
        commits.append(statements[:])
        statements.clear()

    if ended_elsewhere:
        with pytest.raises(UpdateFinishedTrialError):
            with one_write(study._storage):
                record_epochs(trial, {1: 0.5}, {"duration_s": 1.5})
                study.tell(trial, float("inf"))
    else:
        with one_write(study._storage):
            record_epochs(trial, {1: 0.5}, {"duration_s": 1.5})
            study.tell(trial, float("inf"))
        assert commits[0] == ["UPDATE", "INSERT", "INSERT", "INSERT"]  # state, value, attributes, intermediate value
    stored = optuna.load_study(study_name=name, storage=make_storage(url)).trials[0]
    if ended_elsewhere:
        assert stored.state == TrialState.FAIL and stored.value is None
        assert stored.intermediate_values == {} and "duration_s" not in stored.user_attrs
    else:
        assert stored.state == TrialState.COMPLETE and stored.value == float("inf")
        assert stored.intermediate_values == {1: 0.5} and stored.user_attrs == {"worker": "w1", "duration_s": 1.5}
        assert stored.datetime_complete >= stored.datetime_start


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_claim_beats_for_its_trial_so_a_worker_killed_before_its_first_beat_is_found(backend, request, monkeypatch):
    """A claimed trial has a heartbeat at once, and turns stale when no other comes; the
    heartbeat thread's first beat, just after the claim, is the claim's."""
    monkeypatch.setenv("TUNER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("TUNER_HEARTBEAT_GRACE", "2")
    url = request.getfixturevalue(f"{backend}_url")
    storage = make_storage(url)
    study = optuna.create_study(study_name=f"claim-beat-{backend}", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    trial_id = claim_next_waiting_trial(storage, study._study_id, {"worker": "w1"})
    backend_storage = rdb_backend(storage)
    statements = []

    @sqlalchemy.event.listens_for(backend_storage.engine, "before_cursor_execute")
    def count(connection, cursor, statement, *args):
        statements.append(statement)

    backend_storage.record_heartbeat(trial_id)
    assert statements == []
    assert backend_storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(3.1)  # past the grace period, in SQLite's whole seconds
    assert backend_storage._get_stale_trial_ids(study._study_id) == [trial_id]
    backend_storage.record_heartbeat(trial_id)
    assert backend_storage._get_stale_trial_ids(study._study_id) == []


def test_an_append_refused_on_a_trial_ended_elsewhere_raises_once_in_its_own_block(tmp_path):
    """The writes of a block are one append: refused on a trial another worker failed meanwhile,
    the block raises, and the next read does not raise again on the append's later lines."""
    journal = str(tmp_path / "journal.log")
    mine, other = make_storage(journal), make_storage(journal)
    study = optuna.create_study(study_name="ended", storage=mine)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    trial_id = claim_next_waiting_trial(mine, study._study_id, {"worker": "w1"})
    assert other.set_trial_state_values(trial_id, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError), one_write(mine):
        mine.set_trial_user_attr(trial_id, "epochs_completed", 3)
        mine.set_trial_intermediate_value(trial_id, 3, 0.5)
    trial = mine.get_trial(trial_id)
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {} and trial.user_attrs == {"worker": "w1"}


@pytest.mark.parametrize("kind", ["journal", "redis", "grpc"])
def test_a_lease_tells_a_dead_workers_trial_where_optuna_has_no_heartbeats(kind, request, tmp_path):
    """On a journal file, on Redis and through the proxy, a claimed trial holds a lease from its claim, turns
    stale once its worker stops renewing it, and is retried without it; a trial that plain
    Optuna runs there holds none and is never failed for it."""
    with storage_of_kind(kind, request, tmp_path) as url:
        storage = make_storage(url)
        study = optuna.create_study(study_name="lease", storage=storage)
        plain = study.ask()
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
        trial_id = claim_next_waiting_trial(storage, study._study_id, {"worker": "w1"})
        claimed = storage.get_trial(trial_id).system_attrs[LEASE]
        assert abs(time.time() - claimed) < 5
        storage.record_heartbeat(trial_id)
        assert storage.get_trial(trial_id).system_attrs[LEASE] == claimed, "the claim's lease stands for the first beat"
        assert storage._get_stale_trial_ids(study._study_id) == []
        storage.set_trial_system_attr(trial_id, LEASE, time.time() - 60)  # its worker gone for a minute
        assert storage._get_stale_trial_ids(study._study_id) == [trial_id]
        storage.record_heartbeat(trial_id)
        assert storage._get_stale_trial_ids(study._study_id) == []
        storage.set_trial_system_attr(trial_id, LEASE, time.time() - 60)
        fail_stale_trials(study)
        (retry,) = study.get_trials(states=(TrialState.WAITING,))
        assert retry.system_attrs["retry_history"] == [1] and LEASE not in retry.system_attrs
        storage.record_heartbeat(trial_id)  # a late beat of the failed trial's worker is dropped
        assert storage.get_trial(trial_id).state == TrialState.FAIL
        assert storage.get_trial(plain._trial_id).state == TrialState.RUNNING


@pytest.mark.parametrize("kind", ["journal", "redis", "grpc"])
def test_a_trial_a_worker_makes_under_a_time_budget_holds_a_lease_from_its_making(kind, request, tmp_path):
    """No slot waits under a time budget alone: the worker makes its trial, and a worker killed
    before its first beat leaves a trial that its lease still tells."""
    from tuner.worker import _claim

    with storage_of_kind(kind, request, tmp_path) as url:
        study = create_study(parse_spec(small_spec("timed", budget={"timeout_s": 600})), url)
        _claim(study, False, {"worker": "w0"})  # the trial of the spec's defaults, enqueued
        trial, _ = _claim(study, False, {"worker": "w1"})
        stored = make_storage(url).get_trial(trial._trial_id)
        assert stored.user_attrs == {"worker": "w1"} and abs(time.time() - stored.system_attrs[LEASE]) < 5


def test_a_redis_append_sent_again_is_written_once_and_lines_come_in_order(redis_url):
    """A retry after a lost reply sends the same append, token and all: Redis writes it once.
    Lines are read a thousand a round trip, from where the reader has got to."""
    backend = make_storage(redis_url)._backend
    backend.append_logs([{"line": n} for n in range(2500)])
    for _ in range(2):
        backend._append_once(args=[backend._prefix, "one-token", 60, '{"line": "retried"}'])
    lines = list(backend.read_logs(0))
    assert [line["line"] for line in lines] == [*range(2500), "retried"]
    assert [line["line"] for line in backend.read_logs(2499)] == [2499, "retried"]


def test_a_worker_killed_as_it_wins_a_trial_on_redis_leaves_the_trial_leased(redis_url, monkeypatch):
    """The claim and the trial's first lease reach Redis in one append: written after it, a
    worker killed in between left a running trial that no lease tells, and every other worker
    waited for it. The kill is a BaseException raised where the worker writes who runs it."""
    from tuner.storages import _trials

    class Killed(BaseException):
        pass

    def killed(*args: object) -> None:
        raise Killed

    storage = make_storage(redis_url)
    study = optuna.create_study(study_name="won", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    monkeypatch.setattr(_trials, "_write_user_attrs", killed)
    with pytest.raises(Killed):
        claim_next_waiting_trial(storage, study._study_id, {"worker": "w1"})
    (trial,) = make_storage(redis_url).get_all_trials(study._study_id)
    assert trial.state == TrialState.RUNNING and "worker" not in trial.user_attrs
    assert abs(time.time() - trial.system_attrs[LEASE]) < 5


def test_a_redis_back_without_its_journal_is_an_error_not_an_empty_study(redis_url):
    """Restarted without its data, Redis would take this worker's writes as a new journal's
    first lines, which no reader sees: the worker stops, saying what happened."""
    import redis

    storage = make_storage(redis_url)
    study = optuna.create_study(study_name="forgotten", storage=storage)
    study.ask()
    redis.Redis.from_url(redis_url).flushdb()
    with pytest.raises(StorageError, match="holds 0 lines of the journal, of the [0-9]+ this process read"):
        study.ask()


def test_a_heartbeat_that_cannot_be_written_is_logged_and_the_next_one_tried(tmp_path, monkeypatch, caplog):
    """Raised, a failed beat ended the heartbeat thread, and the trial passed for dead while it
    trained."""
    storage = make_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(study_name="beats", storage=storage)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    trial_id = claim_next_waiting_trial(storage, study._study_id, {"worker": "w1"})
    storage.record_heartbeat(trial_id)  # the claim's lease stands for this one
    storage.set_trial_system_attr(trial_id, LEASE, time.time() - 60)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "set_trial_system_attr", disk_full)
    storage.record_heartbeat(trial_id)
    assert f"heartbeat of trial id {trial_id} not written: [Errno 28] No space left on device" in caplog.text
    monkeypatch.undo()
    storage.record_heartbeat(trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_trials_are_indexed_by_study_and_state_once_whoever_opens_the_storage_first(backend, request):
    url = request.getfixturevalue(f"{backend}_url")
    engines = [rdb_backend(make_storage(url)).engine for _ in range(2)]
    indexes = sqlalchemy.inspect(engines[1]).get_indexes("trials")
    assert [ix["column_names"] for ix in indexes if ix["column_names"][-1] == "state"] == [["study_id", "state"]]


@pytest.mark.postgres
def test_opening_an_indexed_database_does_not_wait_for_its_writers(postgres_url, monkeypatch):
    """PostgreSQL's CREATE INDEX IF NOT EXISTS waits for the table's writers even where the
    index is made: a worker starting, or ``tuner status``, must not queue behind them."""
    import psycopg

    make_storage(postgres_url)
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=3000")  # a wait for the lock ends in 3 s
    with psycopg.connect(postgres_url) as writer:
        writer.execute("LOCK TABLE trials IN ROW EXCLUSIVE MODE")  # as a write holds it until its commit
        started = time.monotonic()
        make_storage(postgres_url)
        assert time.monotonic() - started < 2


def _fill(connection, first: int, count: int, state: str) -> None:
    """``count`` trials of study 1 from number ``first``; finished ones with a trial's rows."""
    connection.execute(
        f"INSERT INTO trials (number, study_id, state) SELECT g, 1, '{state}' FROM generate_series({first}, {first + count - 1}) g"
    )
    if state != "COMPLETE":
        return
    per_trial = {
        "trial_intermediate_values (trial_id, step, intermediate_value, intermediate_value_type)": ("s, 0.5, 'FINITE'", 10),
        "trial_user_attributes (trial_id, key, value_json)": ("'k' || s, '1'", 9),
        "trial_params (trial_id, param_name, param_value, distribution_json)": ("'p' || s, 1, '{}'", 3),
        "trial_system_attributes (trial_id, key, value_json)": ("'artifacts:curve', '1'", 1),
        "trial_values (trial_id, objective, value, value_type)": ("s - 1, 1, 'FINITE'", 1),
    }
    for table, (columns, rows) in per_trial.items():
        connection.execute(
            f"INSERT INTO {table} SELECT t.trial_id, {columns} FROM trials t, generate_series(1, {rows}) s "
            f"WHERE t.number >= {first}"
        )


@pytest.mark.postgres
@pytest.mark.parametrize("statistics", ["current", "taken_at_the_first_slots"])
def test_a_claim_planned_for_any_study_reads_no_other_trials_rows(postgres_url, statistics):
    """psycopg prepares a statement run five times, and PostgreSQL then plans it once for any
    parameters. That plan of the claim must look its trial up, not read every row of the
    parameter, value and attribute tables, even with statistics taken when the study's first
    slots were all its trials."""
    import psycopg
    from sqlalchemy.dialects import postgresql

    from tuner.storages._rdb import _NEXT_WAITING

    admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
    url = f"{postgres_url}_plans"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {url.rsplit('/', 1)[1]}")
    try:
        storage = make_storage(url)
        optuna.create_study(study_name="planned", storage=storage)
        rdb_backend(storage).engine.dispose()
        statement = _NEXT_WAITING.params(study_id=987654321).compile(
            dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True}
        )
        with psycopg.connect(url, autocommit=True) as connection:
            if statistics == "current":
                _fill(connection, 0, 3000, "COMPLETE")
                _fill(connection, 3000, 16, "WAITING")
                connection.execute("ANALYZE")
            else:
                _fill(connection, 0, 16, "WAITING")
                connection.execute("ANALYZE")
                _fill(connection, 16, 3000, "COMPLETE")
            connection.execute("SET plan_cache_mode = force_generic_plan")
            connection.execute(f"PREPARE claim(integer) AS {str(statement).replace('987654321', '$1')}")
            plan = "\n".join(row[0] for row in connection.execute("EXPLAIN EXECUTE claim(1)"))
            claimed = connection.execute("EXECUTE claim(1)").fetchone()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    assert "Seq Scan on trial_" not in plan and "hashed" not in plan, plan
    # The first WAITING trial, a blank slot.
    assert claimed[1:] == (3000 if statistics == "current" else 0, False)


def _claimed(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    try:
        return storage.set_trial_state_values(trial_id, TrialState.RUNNING)
    except UpdateFinishedTrialError:  # another worker took it and finished it meanwhile
        return False


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "journal"])
def test_workers_that_ran_out_together_top_up_once(backend, request, tmp_path):
    """Workers that find no slot queue at the slots' lock and, meanwhile, others claim: the
    first one's slots are enough for the rest, and none adds more until fewer than half of
    them wait; then one top-up fills them again, numbered on."""
    url = str(tmp_path / "slots.log") if backend == "journal" else request.getfixturevalue(f"{backend}_url")
    name = f"top-up-{backend}"
    storage = make_storage(url)
    study_id = optuna.create_study(study_name=name, storage=storage)._study_id
    maker = slot_maker(storage)
    assert maker.add_waiting_trials(study_id, 40, 16) == 16
    waiting = []
    for worker in range(9):
        assert claim_next_waiting_trial(storage, study_id, {"worker": worker}) is not None
        waiting.append(maker.add_waiting_trials(study_id, 40, 16))
    assert waiting == [15, 14, 13, 12, 11, 10, 9, 8, 16]
    trials = make_storage(url).get_all_trials(study_id, deepcopy=False)
    assert [t.number for t in trials] == list(range(25))
    assert [t.state for t in trials] == [TrialState.RUNNING] * 9 + [TrialState.WAITING] * 16


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "journal"])
def test_slots_added_ahead_by_racing_workers_never_pass_the_budget(backend, request, monkeypatch, tmp_path):
    """Eight workers, each with its own connections, take WAITING trials and top them up three
    at a time as they run out; the study ends with exactly the budget, every trial run once."""
    monkeypatch.setenv("TUNER_DB_RETRY_S", "60")
    url = str(tmp_path / "slots.log") if backend == "journal" else request.getfixturevalue(f"{backend}_url")
    name = f"ahead-{backend}-{request.node.name[-8:]}"
    n_trials = 40
    optuna.create_study(study_name=name, storage=make_storage(url))
    ran: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            storage = make_storage(url)
            study_id = storage.get_study_id_from_name(name)
            while True:
                waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
                won = next((t for t in waiting if _claimed(storage, t._trial_id)), None)
                if won is not None:
                    ran.append(won.number)
                    storage.set_trial_state_values(won._trial_id, TrialState.COMPLETE, [0.0])
                elif not slot_maker(storage).add_waiting_trials(study_id, n_trials, ahead=3):
                    return
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    trials = optuna.load_study(study_name=name, storage=make_storage(url)).get_trials()
    assert len(trials) == n_trials
    assert sorted(ran) == list(range(n_trials))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_slot_counts_leave_out_retried_trials(sqlite_url):
    storage = make_storage(sqlite_url)
    study = optuna.create_study(study_name="counted", storage=storage)
    study.add_trials([optuna.trial.create_trial(state=TrialState.WAITING)] * 3)
    first, second, _ = study.get_trials()
    storage.set_trial_state_values(first._trial_id, TrialState.RUNNING)
    storage.set_trial_state_values(first._trial_id, TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(first._trial_id))
    storage.set_trial_state_values(second._trial_id, TrialState.RUNNING)
    counts, first_start = storage.slot_counts(study._study_id)
    assert counts[TrialState.FAIL] == 0  # the failed trial's retry holds its slot
    assert counts[TrialState.WAITING] == 2 and counts[TrialState.RUNNING] == 1
    assert first_start is not None


@pytest.mark.postgres
def test_a_worker_finding_no_slot_waits_for_the_slots_another_worker_just_made(postgres_url):
    """Worker A finds no WAITING trial and goes to make some; worker B makes them first. A must
    claim one of B's, not stop as if the budget were spent."""
    from conftest import small_spec
    from tuner.spec import parse_spec
    from tuner.study import create_study, load_study
    from tuner.worker import _claim

    create_study(parse_spec(small_spec("late-slots", budget={"n_trials": 40})), postgres_url)
    study_a, _ = load_study("late-slots", make_storage(postgres_url))
    study_b, _ = load_study("late-slots", make_storage(postgres_url))
    while _claim(study_b, True, {"worker": "b"}) is not None and study_b.get_trials(states=(TrialState.WAITING,)):
        pass  # B holds every slot made so far; none waits
    assert not study_a.get_trials(states=(TrialState.WAITING,))
    made = []

    @sqlalchemy.event.listens_for(study_a._storage._backend.engine, "before_cursor_execute")
    def b_tops_up_first(connection, cursor, statement, parameters, context, executemany):
        if not made and "FROM studies" in statement and "FOR UPDATE" in statement:
            made.append(study_b._storage._backend.add_waiting_trials(study_b._study_id, 40, 16))

    claimed = _claim(study_a, True, {"worker": "a"})
    assert made == [16]
    assert claimed is not None and claimed[0].user_attrs["worker"] == "a"


@pytest.mark.parametrize(("interval_s", "written"), [(3600.0, {}), (0.0, {1: 0.5, 2: 0.25, 3: 0.125})])
def test_epochs_go_to_the_storage_at_most_once_an_interval(monkeypatch, sqlite_url, interval_s, written):
    """Within the interval an epoch's value stays in the worker, where the pruner sees it."""
    monkeypatch.setattr(reporter_module, "VALUE_WRITE_INTERVAL_S", interval_s)
    study = optuna.create_study(
        study_name="paced", storage=make_storage(sqlite_url), pruner=optuna.pruners.ThresholdPruner(lower=0.2)
    )
    trial = study.ask()
    reporter = reporter_module.Reporter(trial, [Objective(metric="val_accuracy")])
    for epoch, value in enumerate([0.5, 0.25, 0.125], start=1):
        reporter.record(epoch, {"val_accuracy": value})
        assert trial.should_prune() is (value < 0.2)
    stored = optuna.load_study(study_name="paced", storage=make_storage(sqlite_url)).trials[0]
    assert stored.intermediate_values == written
    reporter.write_records()
    stored = optuna.load_study(study_name="paced", storage=make_storage(sqlite_url)).trials[0]
    assert stored.intermediate_values == {1: 0.5, 2: 0.25, 3: 0.125}
    assert stored.user_attrs["epochs_completed"] == 3


def test_a_journal_claim_waits_for_the_slots_lock_and_takes_a_slot_made_meanwhile(tmp_path):
    """A claimer that finds the slots' lock taken looks for it again and again until it is
    free, and then claims with the journal as it is by then."""
    url = str(tmp_path / "waiting.log")
    study_id = optuna.create_study(study_name="waiting", storage=make_storage(url))._study_id
    claimer, other = make_storage(url), make_storage(url)
    claimed: list[int | None] = []
    with open(f"{url}.slots.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: claimed.append(claim_next_waiting_trial(claimer, study_id, {"worker": "w"})))
        thread.start()
        time.sleep(0.3)
        made = other.create_new_trial(study_id, template_trial=optuna.trial.create_trial(state=TrialState.WAITING))
        time.sleep(0.3)
        assert thread.is_alive() and claimed == []
    thread.join(10)
    assert claimed == [made]
    assert make_storage(url).get_trial(made).user_attrs == {"worker": "w"}


@pytest.mark.parametrize("holder", ["optuna", "tuner"])
def test_the_journal_lock_is_optunas_so_either_holder_excludes_the_other(tmp_path, holder):
    """tuner's waiter looks for the lock more often than Optuna's, on the same lock file: a plain
    Optuna process and a tuner worker appending to one journal still take turns."""
    path = str(tmp_path / "shared.log")
    held, waiting = (JournalFileSymlinkLock(path), PromptJournalFileLock(path))
    if holder == "tuner":
        held, waiting = waiting, held
    assert held.acquire()
    acquired = threading.Event()
    thread = threading.Thread(target=lambda: waiting.acquire() and acquired.set())
    thread.start()
    assert not acquired.wait(0.3)
    held.release()
    assert acquired.wait(10)
    waiting.release()
    thread.join()


def test_a_journal_lock_left_by_a_dead_holder_is_freed_after_its_grace_period(tmp_path, monkeypatch):
    """Past its prompt tries, the waiter goes on in Optuna's loop, which frees a lock whose
    holder has died (its file untouched for the grace period)."""
    monkeypatch.setattr(PromptJournalFileLock, "PROMPT_WAIT_S", 0.1)
    path = str(tmp_path / "left.log")
    Path(path).touch()
    os.symlink(path, f"{path}.lock")
    lock = PromptJournalFileLock(path, grace_period=3)
    started = time.monotonic()
    assert lock.acquire()
    assert time.monotonic() - started >= 3
    lock.release()


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """Times are stored in UTC and read back in local time: here one that differs."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _comparable(trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    """The trials' attributes, a NaN as its text: NaN equals nothing, itself included."""
    return [{**vars(t), "intermediate_values": {k: repr(v) for k, v in t.intermediate_values.items()}} for t in trials]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_trials_read_as_rows_equal_optunas_own_read(backend, request, local_time_not_utc, monkeypatch):
    """tuner's read of a study's trials gives what Optuna's own RDBStorage gives, for every
    state, value kind, distribution and attribute, and for each filter its cache uses."""
    monkeypatch.setattr(_rdb_reads, "_IDS_PER_QUERY", 2)  # trials' rows read in several chunks
    url = sqlalchemy_url(request.getfixturevalue(f"{backend}_url"))
    name = f"rows-{time.time_ns()}"
    study = optuna.create_study(study_name=name, storage=make_storage(url), direction="maximize")
    distributions = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "epochs": optuna.distributions.IntDistribution(2, 10),
        "optimizer": optuna.distributions.CategoricalDistribution(["sgd", None, 3]),
    }
    params = {"lr": 0.01, "epochs": 4, "optimizer": None}
    attrs = {"history": [{"epoch": 1, "val_accuracy": 0.5}], "worker": "host:1", "note": None}
    for values, state in [([0.9], TrialState.COMPLETE), ([-math.inf], TrialState.COMPLETE), (None, TrialState.PRUNED), (None, TrialState.FAIL)]:
        study.add_trial(optuna.trial.create_trial(
            state=state, values=values, params=params, distributions=distributions, user_attrs=attrs,
            system_attrs={"retry_history": [0]}, intermediate_values={1: 0.5, 2: math.nan, 3: -math.inf},
        ))
    study.enqueue_trial({"lr": 0.001})
    running = study.ask()
    running.suggest_float("lr", 1e-4, 1e-1, log=True)
    running.report(0.25, 1)
    running.set_user_attr("worker", "host:2")
    trials = study.get_trials(deepcopy=False)
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING}
    study.enqueue_trial({"lr": 0.002})
    ids = [t._trial_id for t in study.get_trials(deepcopy=False)]
    assert len(ids) == 6

    mine, theirs = rdb_backend(study._storage), optuna.storages.RDBStorage(url)
    assert mine is not None
    study_id = study._study_id
    for states, included, greater_than in [
        (None, set(), -1),
        ((TrialState.COMPLETE, TrialState.WAITING), set(), -1),
        (None, set(), ids[2]),
        (None, {ids[0], ids[2]}, ids[3]),
        ((TrialState.RUNNING,), {ids[4]}, ids[4]),
    ]:
        read = mine._get_trials(study_id, states, included, greater_than)
        assert _comparable(read) == _comparable(theirs._get_trials(study_id, states, included, greater_than))
        assert read, (states, included, greater_than)
    with pytest.raises(KeyError):
        mine._get_trials(study_id + 1000, None, set(), -1)

    several = optuna.create_study(study_name=f"{name}-2", storage=make_storage(url), directions=["maximize", "minimize"])
    several.add_trial(optuna.trial.create_trial(values=[0.9, math.inf], params=params, distributions=distributions))
    read = mine._get_trials(several._study_id, None, set(), -1)
    assert read == theirs._get_trials(several._study_id, None, set(), -1) and read[0].values == [0.9, math.inf]
