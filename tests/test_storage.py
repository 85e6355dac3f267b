"""The storage layer against real databases: lost connections are waited out."""

from __future__ import annotations

import threading

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tuner.storage import make_storage, set_user_attrs, sqlalchemy_url


@pytest.mark.postgres
def test_a_connection_killed_mid_query_is_reconnected(postgres_url):
    storage = make_storage(postgres_url)
    study = optuna.create_study(study_name="killed", storage=storage)
    study.enqueue_trial({"x": 1.0})
    admin = sqlalchemy.create_engine(sqlalchemy_url(postgres_url), isolation_level="AUTOCOMMIT")
    killed = []

    # The server ends this connection between the pool's ping and Optuna's first query on the
    # trials table, as a restart does; Optuna's fallback query then fails in the same session.
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


def test_two_workers_cannot_both_claim_one_sqlite_trial(sqlite_url, monkeypatch):
    monkeypatch.setenv("TUNER_DB_RETRY_S", "30")
    first, second = make_storage(sqlite_url), make_storage(sqlite_url)
    study = optuna.create_study(study_name="claim", storage=first)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials()[0]._trial_id
    first_has_read, second_has_claimed = threading.Event(), threading.Event()

    # The first claim is held between its read of the WAITING state and its write, while the
    # second claim runs from start to end: the interleaving that makes a double claim.
    @sqlalchemy.event.listens_for(first.engine, "before_cursor_execute")
    def pause_before_write(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE trials") and not first_has_read.is_set():
            first_has_read.set()
            assert second_has_claimed.wait(30)

    def claim_second() -> None:
        assert first_has_read.wait(30)
        outcomes["second"] = second.set_trial_state_values(trial_id, TrialState.RUNNING)
        second_has_claimed.set()

    outcomes: dict[str, bool] = {}
    thread = threading.Thread(target=claim_second)
    thread.start()
    outcomes["first"] = first.set_trial_state_values(trial_id, TrialState.RUNNING)
    thread.join(30)
    assert outcomes == {"first": False, "second": True}


def test_user_attrs_written_in_one_go_read_back(sqlite_url):
    study = optuna.create_study(storage=make_storage(sqlite_url))
    trial = study.ask()
    expected = {"history": [{"epoch": 1, "val_accuracy": 0.5}], "epochs_completed": 1}
    set_user_attrs(trial, expected)
    assert trial.user_attrs == expected
    assert study.trials[0].user_attrs == expected
