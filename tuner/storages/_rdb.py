"""Optuna's RDBStorage, reconnecting, with held writes, one-statement claims and slot counts."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Container, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import OperationalError

from tuner.storages._held import HeldWrites, as_read
from tuner.storages._rdb_reads import read_trials
from tuner.storages._reconnect import with_reconnect
from tuner.storages._slots import RETRY_HISTORY, enough_waiting
from tuner.storages._sqlite import reads_kept_until_written

_logger = logging.getLogger("tuner.storages")

# The statements of a trial's claim, writes and end, as Core on the tables: an ORM statement
# takes the ORM's compile and bulk-update steps at each execution, for nothing the ORM keeps.
_TRIALS = models.TrialModel.__table__
_TRIAL_STATE = sqlalchemy.select(_TRIALS.c.state).where(_TRIALS.c.trial_id == sqlalchemy.bindparam("trial_id"))
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_PARAMS = models.TrialParamModel.__table__


def _constant(value: Any, type_: sqlalchemy.types.TypeEngine) -> sqlalchemy.BindParameter:
    """A value written into the statement rather than sent as a parameter: a plan made for any
    parameters (see ``_NEXT_WAITING``) then knows it, and its statistics say how few trials wait."""
    return sqlalchemy.bindparam(None, value, type_=type_, literal_execute=True)


# 1 for a retry, else 0. A count rather than EXISTS: PostgreSQL may answer an EXISTS for many
# rows by hashing every row of the attributes table, where a count is looked up in the index.
_RETRIES = (
    sqlalchemy.select(sqlalchemy.func.count())
    .where(_SYSTEM_ATTRS.c.trial_id == _TRIALS.c.trial_id, _SYSTEM_ATTRS.c.key == _constant(RETRY_HISTORY, _SYSTEM_ATTRS.c.key.type))
    .scalar_subquery()
)
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert, "mysql": mysql.insert}
# The trial a claim takes, found and locked by one query: the next WAITING one, retries first.
_CLAIMED = (
    sqlalchemy.select(_TRIALS.c.trial_id, _TRIALS.c.number)
    .where(_TRIALS.c.study_id == sqlalchemy.bindparam("study_id"), _TRIALS.c.state == _constant(TrialState.WAITING, _TRIALS.c.state.type))
    .order_by(_RETRIES.desc(), _TRIALS.c.number)
    .limit(_constant(1, sqlalchemy.Integer()))
    .with_for_update(skip_locked=True)
    .subquery("claimed")
)
# With whether it has anything besides its own row: a blank slot, as most are, has nothing to
# read. Asked of the one trial found, not in the query that finds it: PostgreSQL plans a
# statement that psycopg prepared once for any parameters after five runs, and a plan that
# expects many WAITING trials (the WAITING state a parameter, or statistics taken while the
# study's first slots were most of its trials) hashed every row of the parameter, value and
# attribute tables to answer it, a whole read of each per claim.
_NEXT_WAITING = sqlalchemy.select(
    _CLAIMED.c.trial_id,
    _CLAIMED.c.number,
    sqlalchemy.or_(*(
        sqlalchemy.select(model.__table__.c.trial_id).where(model.__table__.c.trial_id == _CLAIMED.c.trial_id).exists()
        for model in (
            models.TrialParamModel, models.TrialValueModel, models.TrialIntermediateValueModel,
            models.TrialUserAttributeModel, models.TrialSystemAttributeModel,
        )
    )),
)
_START = (
    sqlalchemy.update(_TRIALS)
    .where(_TRIALS.c.trial_id == sqlalchemy.bindparam("claimed_id"))
    .values(state=TrialState.RUNNING, datetime_start=sqlalchemy.bindparam("start"))
)
# A trial's end; only an unfinished trial takes it.
_END = (
    sqlalchemy.update(_TRIALS)
    .where(
        _TRIALS.c.trial_id == sqlalchemy.bindparam("ended_id"),
        _TRIALS.c.state.not_in([state for state in TrialState if state.is_finished()]),
    )
    .values(
        state=sqlalchemy.bindparam("end_state", type_=_TRIALS.c.state.type),
        datetime_complete=sqlalchemy.bindparam("complete"),
    )
)


@functools.cache
def _upsert_statement(
    dialect: str, table: sqlalchemy.Table, keys: tuple[str, ...], columns: tuple[str, ...]
) -> sqlalchemy.Executable:
    """Insert, or on a duplicate key update ``columns``: built once, its rows given at each call,
    so that SQLAlchemy compiles it once instead of at every write."""
    insert = _INSERTS[dialect](table)
    if dialect == "mysql":
        return insert.on_duplicate_key_update({column: insert.inserted[column] for column in columns})
    # With RETURNING, SQLAlchemy sends the rows as one statement of many VALUES (its
    # "insertmanyvalues"), where an executemany is a statement a row for the server to run;
    # what it returns is not read.
    return insert.on_conflict_do_update(
        index_elements=[table.c[key] for key in keys], set_={column: insert.excluded[column] for column in columns}
    ).returning(table.c[keys[0]])


class _ParamRows(list):
    """A trial's sampled parameters held together, to go in as one insert of many rows: an ORM
    object added a parameter took a flush of the session's unit of work, and a statement a
    parameter was most of their transaction."""

    def __init__(self, dialect: str) -> None:
        super().__init__()
        self.statement = _insert_params_statement(dialect)

    def __call__(self, session: sqlalchemy.orm.Session) -> None:
        session.execute(self.statement, self)


@functools.cache
def _insert_params_statement(dialect: str) -> sqlalchemy.Executable:
    # RETURNING makes it one statement, as in ``_upsert_statement``; MySQL has none.
    insert = sqlalchemy.insert(_PARAMS)
    return insert if dialect == "mysql" else insert.returning(_PARAMS.c.param_id)


_RETRIED_METHODS = (
    {name for name in vars(optuna.storages.BaseStorage) if not name.startswith("_")}
    | {name for name in vars(optuna.storages.RDBStorage) if not name.startswith("_")}
    | {"_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials", "_set_trial_param"}
    | {"set_trial_user_attrs", "record_epochs", "slot_counts", "add_waiting_trials", "claim_next_waiting_trial"}
    | {"get_study_id_of_trial", "write_held"}
) - {"remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions"}


class ReconnectingRDBStorage(HeldWrites, optuna.storages.RDBStorage):
    """An RDBStorage that waits for its database to come back.

    A restart of the server, a dropped link or a locked SQLite file fails a call with an
    operational error; each call is retried with exponential back-off until
    ``TUNER_DB_RETRY_S`` seconds (default 120) have passed, then a ``StorageError`` says so. A
    failed call's transaction was rolled back, so retrying it cannot count anything twice. A
    SQLite file that is read-only, corrupt or full fails at once (``permanent_error``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held = threading.local()
        self._running_here: dict[int, optuna.trial.FrozenTrial] = {}
        self._claim_beats: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_held"]
        state["_running_here"] = {}  # another process runs none of this one's trials
        state["_claim_beats"] = {}
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._held = threading.local()
        super().__setstate__(state)

    def _write_together(
        self,
        writes: list[tuple[int, Callable[[sqlalchemy.orm.Session], None]]],
        end: tuple[int, Callable[[sqlalchemy.orm.Session], None]] | None,
    ) -> None:
        """One transaction, with ``end`` (a trial's end, which checks that trial's state itself)
        first; retried whole when the connection is lost, since a failed transaction wrote
        nothing."""
        # Integrity errors are not ignored, as Optuna's single writes ignore them: one would
        # roll back every write held with it.
        with _create_scoped_session(self.scoped_session) as session:
            checked = set()
            if end is not None:
                trial_id, write = end
                write(session)
                checked.add(trial_id)
            for trial_id in dict.fromkeys(trial_id for trial_id, _ in writes):
                if trial_id not in checked:
                    self._check_updatable(session, trial_id)
            for _, write in writes:
                write(session)

    def _write(self, trial_id: int, write: Callable[[sqlalchemy.orm.Session], None]) -> None:
        """Hold a write to a trial within ``one_transaction``; elsewhere commit it on its own,
        ignoring an integrity error as Optuna's single writes do. The trial's state is checked
        once a transaction, where Optuna reads the whole trial row for each write."""
        held = self._holding()
        if held is not None:
            held.append((trial_id, write))
            return
        with _create_scoped_session(self.scoped_session, True) as session:
            self._check_updatable(session, trial_id)
            write(session)

    def _check_updatable(self, session: sqlalchemy.orm.Session, trial_id: int) -> None:
        state = session.execute(_TRIAL_STATE, {"trial_id": trial_id}).scalar_one_or_none()
        if state is None:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        self.check_trial_is_updatable(trial_id, state)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
        previous_distribution: optuna.distributions.BaseDistribution | None,
    ) -> None:
        """Optuna's parameter write without its read of the trial, whose state ``_write``
        checks; where no cache knows the study's earlier distribution, Optuna's own. The
        parameters of a trial held together go in as one statement."""
        if previous_distribution is None:
            self._write(trial_id, functools.partial(
                self._set_trial_param_without_commit,
                trial_id=trial_id, param_name=param_name, param_value_internal=param_value_internal, distribution=distribution,
            ))
        else:
            optuna.distributions.check_distribution_compatibility(previous_distribution, distribution)
            row = {
                "trial_id": trial_id,
                "param_name": param_name,
                "param_value": param_value_internal,
                "distribution_json": optuna.distributions.distribution_to_json(distribution),
            }
            held = self._holding()
            if held and held[-1][0] == trial_id and isinstance(held[-1][1], _ParamRows):
                held[-1][1].append(row)
            else:
                rows = _ParamRows(self.engine.name)
                rows.append(row)
                self._write(trial_id, rows)
        self._keep_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(trial_id, functools.partial(
            self._write_attrs, model=models.TrialSystemAttributeModel, trial_id=trial_id, attrs={key: value},
        ))
        self._keep_system_attr(trial_id, key, value)

    def record_heartbeat(self, trial_id: int) -> None:
        """One upsert, where Optuna reads the heartbeat's row, then inserts or reads it again
        for update: a running trial's heartbeat is written as it starts and every interval.
        The beat its claim wrote stands for the first, when younger than half an interval."""
        claimed_at = self._claim_beats.pop(trial_id, None)
        if claimed_at is not None and time.monotonic() - claimed_at < self.get_heartbeat_interval() / 2:
            return
        if self.engine.name not in _INSERTS:
            super().record_heartbeat(trial_id)
            return
        with _create_scoped_session(self.scoped_session, True) as session:
            self._beat(session, trial_id)

    def _beat(self, session: sqlalchemy.orm.Session, trial_id: int) -> None:
        # Without a value given, the column's default gives the server's time, as Optuna's does.
        self._upsert(session, models.TrialHeartbeatModel, [{"trial_id": trial_id}], ("trial_id",), ("heartbeat",))

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[optuna.trial.FrozenTrial]:
        """Optuna's read of a study's trials, to the last attribute, from rows rather than ORM
        objects.

        Every worker's sampler, the study note, ``tuner status`` and the proxy read through
        here. A trial of tuner's is some 25 rows (its records, an intermediate value an epoch),
        and the ORM's bookkeeping of an object a row was most of a read: 10,000 trials took 11 s
        of CPU on PostgreSQL.
        """
        included = {trial_id for trial_id in included_trial_ids if trial_id <= trial_id_greater_than}
        trial_id = models.TrialModel.__table__.c.trial_id
        chosen = None
        if trial_id_greater_than > -1:
            chosen = sqlalchemy.or_(trial_id.in_(included), trial_id > trial_id_greater_than) if included else trial_id > trial_id_greater_than
        with _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)
            try:
                return read_trials(session, study_id, states, chosen)
            except OperationalError as error:
                # As Optuna's: likely more trial ids in the IN than the database takes.
                _logger.warning("reading trials again without the ids' filter: %s", error)
                return [
                    trial for trial in read_trials(session, study_id, states, None)
                    if trial._trial_id in included or trial._trial_id > trial_id_greater_than
                ]

    def get_study_id_of_trial(self, trial_id: int) -> int:
        with _create_scoped_session(self.scoped_session) as session:
            return models.TrialModel.find_or_raise_by_id(trial_id, session).study_id


    def record_epochs(self, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
        """User attributes and intermediate values (by step), in one transaction: a trial's
        most frequent write.

        Optuna reads the whole trial again for each attribute and reads a value before writing
        it; where the database has an upsert (PostgreSQL, SQLite, MySQL) this reads the trial's
        state once and writes everything in one statement per table.
        """
        self._write(trial_id, functools.partial(self._record_without_commit, trial_id=trial_id, values=values, attrs=attrs))
        self._keep_records(trial_id, values, attrs)

    def _record_without_commit(
        self, session: sqlalchemy.orm.Session, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]
    ) -> None:
        self._write_attrs(session, models.TrialUserAttributeModel, trial_id, attrs)
        if self.engine.name not in _INSERTS:
            for step, value in values.items():
                self._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
            return
        if values:
            rows = []
            for step, value in values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind})
            columns = ("intermediate_value", "intermediate_value_type")
            self._upsert(session, models.TrialIntermediateValueModel, rows, ("trial_id", "step"), columns)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """A trial run here ends in one transaction with its held writes (its records, its
        learning curve): Optuna's would be two, each reading the trial's row first."""
        try:
            if trial_id in self._running_here and state.is_finished() and self.engine.name in _INSERTS:
                return self.end_trial(trial_id, state, values)
            self.write_held()
            with reads_kept_until_written():
                return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._running_here.pop(trial_id, None)
            self._claim_beats.pop(trial_id, None)

    def end_trial(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        """A finished state and values in one transaction with the held writes: the end of a
        trial run here, or of one its worker tells through ``tuner proxy``. Where the database
        has no upsert, Optuna's ``set_trial_state_values``."""
        if self.engine.name not in _INSERTS:
            return self.set_trial_state_values(trial_id, state, values)
        self.write_held(end=(trial_id, functools.partial(
            self._finish_without_commit, trial_id=trial_id, state=state, values=values,
        )))
        return True

    def _finish_without_commit(
        self, session: sqlalchemy.orm.Session, trial_id: int, state: TrialState, values: Sequence[float] | None
    ) -> None:
        """The trial's end and values, as Optuna's ``set_trial_state_values`` writes them; the
        update takes only an unfinished trial, so that a trial another process ended meanwhile
        (a stale one, failed and retried) is refused, as Optuna's read for update refuses it."""
        ended = session.execute(
            _END, {"ended_id": trial_id, "end_state": state, "complete": datetime.now(timezone.utc).replace(tzinfo=None)}
        )
        if ended.rowcount == 0:
            self._check_updatable(session, trial_id)
        if values is not None:
            rows = []
            for objective, value in enumerate(values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
            self._upsert(session, models.TrialValueModel, rows, ("trial_id", "objective"), ("value", "value_type"))

    def claim_trial(
        self,
        study_id: int,
        attrs: Mapping[str, Any],
        *,
        system_attrs: Mapping[str, Any] | None = None,
        beat: bool = False,
    ) -> optuna.trial.FrozenTrial | None:
        """Set the next WAITING trial (retries first, then by number) RUNNING with user
        attributes ``attrs`` and system attributes ``system_attrs``, in one transaction; return
        it as claimed, or None when none waits.

        One query finds and locks it: on PostgreSQL and MySQL ``SKIP LOCKED`` passes over the
        trials other workers are claiming instead of queueing behind them, and SQLite's
        transaction begins with the write lock (``begin_sqlite``). A blank slot, as most are,
        needs no read: the query says whether the trial has any rows. With ``beat``, for a
        claimer that runs the trial, the claim writes the trial's first heartbeat.
        """
        with reads_kept_until_written(), _create_scoped_session(self.scoped_session) as session:
            row = session.execute(_NEXT_WAITING, {"study_id": study_id}).one_or_none()
            if row is None:
                return None
            trial_id, number, has_rows = row
            started = datetime.now()  # stored as naive UTC, read back as naive local time
            session.execute(_START, {"claimed_id": trial_id, "start": started.astimezone(timezone.utc).replace(tzinfo=None)})
            self._write_attrs(session, models.TrialUserAttributeModel, trial_id, attrs)
            self._write_attrs(session, models.TrialSystemAttributeModel, trial_id, system_attrs or {})
            if has_rows:
                trial = self._build_frozen_trial_from_trial_model(session.get(models.TrialModel, trial_id))
            else:
                trial = optuna.trial.FrozenTrial(
                    number=number, state=TrialState.RUNNING, value=None, values=None,
                    datetime_start=started, datetime_complete=None, params={},
                    distributions={}, user_attrs=as_read(attrs), system_attrs=as_read(system_attrs or {}),
                    intermediate_values={}, trial_id=trial_id,
                )
            # Beaten with the claim: a worker killed before its heartbeat thread's first beat
            # leaves a trial that Optuna, finding no beat for it, would never call stale.
            beat = beat and self.get_heartbeat_interval() is not None and self.engine.name in _INSERTS
            if beat:
                self._beat(session, trial_id)
        # Once committed: a claim that failed to commit is retried, or was never made.
        if beat:
            self._claim_beats[trial_id] = time.monotonic()
        return trial

    def claim_next_waiting_trial(
        self, study_id: int, attrs: Mapping[str, Any], *, keep: bool = False
    ) -> int | None:
        """``claim_trial``'s trial id. With ``keep``, the claimer runs the trial and is its only
        writer: the trial is read from a copy that this storage's writes keep current until its
        state is set, and the claim beats for it."""
        trial = self.claim_trial(study_id, attrs, beat=keep)
        if trial is None:
            return None
        if keep:
            self._running_here[trial._trial_id] = trial
        return trial._trial_id

    def _write_attrs(self, session: sqlalchemy.orm.Session, model: type, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """User or system attributes of a trial whose state was checked, in one statement."""
        if not attrs:
            return
        if self.engine.name not in _INSERTS:
            for key, attr in attrs.items():
                self._set_trial_attr_without_commit(session, model, trial_id, key, attr)
            return
        rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(attr)} for key, attr in attrs.items()]
        self._upsert(session, model, rows, ("trial_id", "key"), ("value_json",))

    def _upsert(
        self, session: sqlalchemy.orm.Session, model: type, rows: list[dict], keys: tuple[str, ...], columns: tuple[str, ...]
    ) -> None:
        session.execute(_upsert_statement(self.engine.name, model.__table__, keys, columns), rows)

    def slot_counts(self, study_id: int) -> tuple[dict[TrialState, int], datetime | None]:
        """Trials by state, less the failed trials a retry replaced, and the first start.

        What a budget check needs, counted by the database: reading every trial instead costs
        a second per call in a study of 10,000. The replaced trials all failed.
        """
        with _create_scoped_session(self.scoped_session) as session:
            counts, first, _ = self._slot_counts(session, study_id)
        return counts, first

    def _slot_counts(
        self, session: sqlalchemy.orm.Session, study_id: int
    ) -> tuple[dict[TrialState, int], datetime | None, int]:
        """``slot_counts``, and how many trials the study has made, retried ones included: the
        number of the next one, as Optuna numbers a trial by the trials made before it."""
        trial = models.TrialModel
        rows = (
            session.query(trial.state, sqlalchemy.func.count(), sqlalchemy.func.min(trial._datetime_start_utc))
            .filter(trial.study_id == study_id)
            .group_by(trial.state)
            .all()
        )
        counts = {state: 0 for state in TrialState}
        for state, count, _ in rows:
            counts[state] = count
        made = sum(counts.values())
        if counts[TrialState.FAIL]:  # only a failed trial is retried; counting retries reads every attribute row
            counts[TrialState.FAIL] -= self._count_retries(session, study_id)
        first = min((start for _, _, start in rows if start is not None), default=None)
        if first is not None:  # stored as naive UTC; trials show naive local times
            first = first.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
        return counts, first, made

    def add_waiting_trials(self, study_id: int, n_trials: int, ahead: int) -> int:
        """When fewer than half of ``ahead`` wait, add blank WAITING trials until ``ahead`` wait
        or ``n_trials`` hold a budget slot; return how many wait then (0: the budget has no slot
        left to wait).

        The study row is locked as Optuna locks it to number a new trial, so workers topping
        up at once add no more than the budget (on SQLite, the transaction begins with the
        write lock: see ``begin_sqlite``). Workers that ran out together queue for that lock:
        the first tops up and the others find enough waiting, where topping up each one's
        shortfall again made a few slots per worker at a study-wide lock. The slots are one
        insert.
        """
        with reads_kept_until_written(), _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            counts, _, made = self._slot_counts(session, study_id)
            holders = sum(counts.values())
            waiting = counts[TrialState.WAITING]
            if enough_waiting(waiting, ahead):
                return waiting
            added = max(0, min(ahead - waiting, n_trials - holders))
            if added:
                session.execute(
                    sqlalchemy.insert(models.TrialModel),
                    [{"study_id": study_id, "number": made + k, "state": TrialState.WAITING} for k in range(added)],
                )
        return waiting + added

    @staticmethod
    def _count_retries(session: sqlalchemy.orm.Session, study_id: int) -> int:
        """Trials made by Optuna's retry callback: each names the one failed trial it replaces."""
        attrs = models.TrialSystemAttributeModel
        return (
            session.query(sqlalchemy.func.count())
            .select_from(attrs)
            .join(models.TrialModel, models.TrialModel.trial_id == attrs.trial_id)
            .filter(models.TrialModel.study_id == study_id, attrs.key == RETRY_HISTORY)
            .scalar()
        )


for _name in _RETRIED_METHODS:
    setattr(ReconnectingRDBStorage, _name, with_reconnect(getattr(ReconnectingRDBStorage, _name)))
