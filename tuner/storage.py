"""Storage URLs of DESIGN.md turned into Optuna storages, with passwords never shown."""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._grpc import servicer as grpc_servicer
from optuna.storages._grpc.auto_generated import api_pb2
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)

from tuner.errors import StorageError

DEFAULT_STORAGE = "sqlite:///tuner.db"
RETRY_HISTORY = "retry_history"  # the system attribute Optuna's retry callback writes on a retry
_logger = logging.getLogger("tuner.storage")

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql"}


def storage_url(url: str | None = None) -> str:
    """The URL in effect: the argument, else ``TUNER_STORAGE``, else ``sqlite:///tuner.db``."""
    return url or os.environ.get("TUNER_STORAGE") or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The URL as it may be printed: any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url


def beside_storage(url: str, name: str) -> Path:
    """Folder ``name`` beside a SQLite or journal file, else ``./name``: where a storage's
    checkpoints and artifacts go by default, so that every local reader finds them."""
    url = storage_url(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///")).resolve().parent / name
    if url.endswith(".log"):
        return Path(url.removeprefix("journal://")).resolve().parent / name
    return Path(name).resolve()


def sqlalchemy_url(url: str) -> str:
    """Spell out the driver: psycopg 3 for PostgreSQL, PyMySQL for MySQL."""
    scheme, sep, rest = url.partition("://")
    return f"{_DRIVERS.get(scheme, scheme)}{sep}{rest}"


class _HeldWrites:
    """Writes to trials held by thread within a block and sent together as it ends, by
    ``write_held``: a database's commit or the proxy's round trip each is most of what a trial's
    sampled parameters or its records cost."""

    _held: threading.local
    _running_here: dict[int, optuna.trial.FrozenTrial]

    @contextlib.contextmanager
    def one_transaction(self) -> Iterator[None]:
        """Hold this thread's parameter, attribute and epoch writes made within and write them
        in one transaction as the block ends, raised or not.

        A write within returns before it is stored, and an error it makes (a finished trial's)
        is raised as the block ends. Reading a trial writes the held writes first, except a
        trial this process runs, whose copy has them; setting a trial's state writes them with
        it. A block within a block writes with the outer one.
        """
        if self._holding() is not None:
            yield
            return
        self._held.writes = []
        try:
            yield
        finally:
            try:
                self.write_held()
            finally:
                self._held.writes = None

    def _holding(self) -> list[Any] | None:
        return getattr(self._held, "writes", None)

    def write_held(self, end: Any = None) -> None:
        """Write the writes held so far together, with ``end`` (a trial's end) where given.
        They are taken out first, and held again where writing them fails."""
        writes = self._holding()
        if writes is None:
            writes = []
        if not writes and end is None:
            return
        # Taken out first: a refused write reads the trial for its message, which writes the
        # held writes.
        pending = writes[:]
        writes.clear()
        try:
            self._write_together(pending, end)
        except BaseException:
            writes[:0] = pending
            raise

    def _write_together(self, writes: list[Any], end: Any) -> None:
        raise NotImplementedError

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.record_epochs(trial_id, {}, {key: value})

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes in one write (a commit, a round trip) instead of one each."""
        self.record_epochs(trial_id, {}, attrs)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.record_epochs(trial_id, {step: intermediate_value}, {})

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        """The trial as stored; a trial this process claimed and runs comes from its own copy
        (see ``claim_next_waiting_trial``), saving a trial's two whole reads (as Optuna's
        ``Trial`` begins and as its tell checks the trial). The copy has the held writes
        already: they stay held, to go with the trial's end."""
        kept = self._running_here.get(trial_id)
        if kept is not None:
            return copy.deepcopy(kept)
        self.write_held()
        return super().get_trial(trial_id)  # type: ignore[misc]

    # A kept trial's copy takes each write as a read would give it back.

    def _keep_param(
        self, trial_id: int, name: str, value_internal: float, distribution: optuna.distributions.BaseDistribution
    ) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.params[name] = distribution.to_external_repr(value_internal)
            kept.distributions[name] = distribution

    def _keep_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.system_attrs.update(_as_read({key: value}))

    def _keep_records(self, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.user_attrs.update(_as_read(attrs))
            kept.intermediate_values.update({step: float(value) for step, value in values.items()})


class ReconnectingRDBStorage(_HeldWrites, optuna.storages.RDBStorage):
    """An RDBStorage that waits for its database to come back.

    A restart of the server, a dropped link or a locked SQLite file fails a call with an
    operational error; each call is retried with exponential back-off until
    ``TUNER_DB_RETRY_S`` seconds (default 120) have passed, then a ``StorageError`` says so. A
    failed call's transaction was rolled back, so retrying it cannot count anything twice.
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
        checks; where no cache knows the study's earlier distribution, Optuna's own."""

        def insert(session: sqlalchemy.orm.Session) -> None:
            if previous_distribution is None:
                self._set_trial_param_without_commit(session, trial_id, param_name, param_value_internal, distribution)
                return
            optuna.distributions.check_distribution_compatibility(previous_distribution, distribution)
            session.add(models.TrialParamModel(
                trial_id=trial_id,
                param_name=param_name,
                param_value=param_value_internal,
                distribution_json=optuna.distributions.distribution_to_json(distribution),
            ))

        self._write(trial_id, insert)
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
                return _read_trials(session, study_id, states, chosen)
            except OperationalError as error:
                # As Optuna's: likely more trial ids in the IN than the database takes.
                _logger.warning("reading trials again without the ids' filter: %s", error)
                return [
                    trial for trial in _read_trials(session, study_id, states, None)
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
            with _reads_kept_until_written():
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

    def claim_trial(self, study_id: int, attrs: Mapping[str, Any], *, beat: bool = False) -> optuna.trial.FrozenTrial | None:
        """Set the next WAITING trial (retries first, then by number) RUNNING with user
        attributes, in one transaction; return it as claimed, or None when none waits.

        One query finds and locks it: on PostgreSQL and MySQL ``SKIP LOCKED`` passes over the
        trials other workers are claiming instead of queueing behind them, and SQLite's
        transaction begins with the write lock (``_begin_sqlite``). A blank slot, as most are,
        needs no read: the query says whether the trial has any rows. With ``beat``, for a
        claimer that runs the trial, the claim writes the trial's first heartbeat.
        """
        with _reads_kept_until_written(), _create_scoped_session(self.scoped_session) as session:
            row = session.execute(_NEXT_WAITING, {"study_id": study_id}).one_or_none()
            if row is None:
                return None
            trial_id, number, has_rows = row
            started = datetime.now()  # stored as naive UTC, read back as naive local time
            session.execute(_START, {"claimed_id": trial_id, "start": started.astimezone(timezone.utc).replace(tzinfo=None)})
            self._write_attrs(session, models.TrialUserAttributeModel, trial_id, attrs)
            if has_rows:
                trial = self._build_frozen_trial_from_trial_model(session.get(models.TrialModel, trial_id))
            else:
                trial = optuna.trial.FrozenTrial(
                    number=number, state=TrialState.RUNNING, value=None, values=None,
                    datetime_start=started, datetime_complete=None, params={},
                    distributions={}, user_attrs=_as_read(attrs), system_attrs={},
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
        write lock: see ``_begin_sqlite``). Workers that ran out together queue for that lock:
        the first tops up and the others find enough waiting, where topping up each one's
        shortfall again made a few slots per worker at a study-wide lock. The slots are one
        insert.
        """
        with _reads_kept_until_written(), _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            counts, _, made = self._slot_counts(session, study_id)
            holders = sum(counts.values())
            waiting = counts[TrialState.WAITING]
            if _enough_waiting(waiting, ahead):
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


_IDS_PER_QUERY = 500  # as SQLAlchemy's selectinload, which Optuna's read uses


def _read_trials(
    session: sqlalchemy.orm.Session,
    study_id: int,
    states: Container[TrialState] | None,
    chosen: sqlalchemy.ColumnElement[bool] | None,
) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in ``states`` that ``chosen`` selects, built as Optuna's
    ``_build_frozen_trial_from_trial_model`` builds them. The trials' rows are read first: a
    trial read finished has its values, params and records in the rows read after it."""
    trial = models.TrialModel.__table__
    where = [trial.c.study_id == study_id]
    if states is not None:
        where.append(trial.c.state.in_(list(states)))  # type: ignore[call-overload]
    if chosen is not None:
        where.append(chosen)
    rows = session.execute(
        sqlalchemy.select(trial.c.trial_id, trial.c.number, trial.c.state, trial.c.datetime_start, trial.c.datetime_complete)
        .where(*where)
        .order_by(trial.c.trial_id)
    ).all()
    fields: dict[int, dict[str, Any]] = {
        row.trial_id: {
            "number": row.number, "state": row.state, "value": None, "values": None,
            "datetime_start": _local_time(row.datetime_start), "datetime_complete": _local_time(row.datetime_complete),
            "params": {}, "distributions": {}, "user_attrs": {}, "system_attrs": {}, "intermediate_values": {},
            "trial_id": row.trial_id,
        }
        for row in rows
    }
    ids = list(fields)

    def children(model: type, *columns: str, order: str | None = None) -> Iterator[Any]:
        """The rows of the trials read, by their ids, a chunk at a time as the ORM's
        ``selectinload`` asks: a subquery instead made PostgreSQL scan the whole table."""
        table = model.__table__  # type: ignore[attr-defined]
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start:start + _IDS_PER_QUERY]
            query = sqlalchemy.select(table.c.trial_id, *(table.c[column] for column in columns)).where(table.c.trial_id.in_(chunk))
            for row in session.execute(query.order_by(table.c[order]) if order else query):
                yield fields[row.trial_id], row

    for found, row in children(models.TrialParamModel, "param_name", "param_value", "distribution_json", order="param_id"):
        distribution = optuna.distributions.json_to_distribution(row.distribution_json)
        found["params"][row.param_name] = distribution.to_external_repr(row.param_value)
        found["distributions"][row.param_name] = distribution
    objectives: dict[int, dict[int, float]] = {}
    for found, row in children(models.TrialValueModel, "objective", "value", "value_type"):
        value = models.TrialValueModel.stored_repr_to_value(row.value, row.value_type)
        objectives.setdefault(found["trial_id"], {})[row.objective] = value
    for trial_id, values in objectives.items():
        fields[trial_id]["values"] = [values.get(objective, 0) for objective in range(len(values))]
    for found, row in children(models.TrialUserAttributeModel, "key", "value_json"):
        found["user_attrs"][row.key] = json.loads(row.value_json)
    for found, row in children(models.TrialSystemAttributeModel, "key", "value_json"):
        found["system_attrs"][row.key] = json.loads(row.value_json)
    for found, row in children(models.TrialIntermediateValueModel, "step", "intermediate_value", "intermediate_value_type"):
        found["intermediate_values"][row.step] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
            row.intermediate_value, row.intermediate_value_type
        )
    return [optuna.trial.FrozenTrial(**found) for found in fields.values()]


def _local_time(stored: datetime | None) -> datetime | None:
    """A stored (naive UTC) time as Optuna's trial model gives it back: naive local time."""
    return None if stored is None else stored.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)


def _enough_waiting(waiting: int, ahead: int) -> bool:
    """Whether the slots that wait spare a top-up: at least half of ``ahead`` (and one)."""
    return waiting >= max(1, ahead // 2)


def slot_holders(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that hold a budget slot: every trial except failed ones that were retried."""
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}
    return [t for t in trials if t.number not in retried]


WRITE_METHOD = "/tuner.Proxy/WriteTrial"
CLAIM_METHOD = "/tuner.Proxy/ClaimNextWaitingTrial"
SLOT_COUNTS_METHOD = "/tuner.Proxy/SlotCounts"


def encode_json(message: Any) -> bytes:
    return json.dumps(message).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def encode_trial(trial: optuna.trial.FrozenTrial) -> str:
    """A trial as Optuna's gRPC proxy sends it, in a JSON message."""
    return base64.b64encode(grpc_servicer._to_proto_trial(trial).SerializeToString()).decode()


def decode_trial(text: str) -> optuna.trial.FrozenTrial:
    return grpc_servicer._from_proto_trial(api_pb2.Trial.FromString(base64.b64decode(text)))


class GrpcStorageProxy(_HeldWrites, optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC client, which claims a trial and writes to a trial in one round trip each
    where ``tuner proxy`` serves: Optuna's protocol has no claim, and a call for each parameter
    and attribute.

    As on a database (``ReconnectingRDBStorage``), a trial this process claimed is kept here
    until told, writes within ``one_transaction`` are held and sent together as the block ends,
    and a kept trial's end goes with them: a trial takes three round trips (its claim, its
    parameters, its end) instead of nine. Behind Optuna's own proxy, which has none of tuner's
    calls, each write goes as Optuna's protocol allows.
    """

    def _setup(self) -> None:
        super()._setup()
        json_call = functools.partial(
            self._channel.unary_unary, request_serializer=encode_json, response_deserializer=decode_json
        )
        self._write_trial = json_call(WRITE_METHOD)
        self._claim_next_waiting_trial = json_call(CLAIM_METHOD)
        self._slot_counts = json_call(SLOT_COUNTS_METHOD)
        self._served_by_tuner = True  # until the server says it has no such call
        self._held = threading.local()
        self._running_here: dict[int, optuna.trial.FrozenTrial] = {}

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for name in ("_write_trial", "_claim_next_waiting_trial", "_slot_counts", "_held", "_running_here"):
            del state[name]
        return state

    def _call_tuner(self, call: grpc.UnaryUnaryMultiCallable, request: dict[str, Any]) -> dict[str, Any] | None:
        """The answer of one of ``tuner proxy``'s calls; None where the server has no such call
        (Optuna's own proxy). Errors are raised as Optuna's client raises them."""
        if not self._served_by_tuner:
            return None
        try:
            return call(request)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(error.details()) from None
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UpdateFinishedTrialError(error.details()) from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(error.details()) from None
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._served_by_tuner = False
            return None

    def _write(self, write: list[Any]) -> None:
        held = self._holding()
        if held is None:
            self._write_together([write], None)
        else:
            held.append(write)

    def _write_together(self, writes: list[list[Any]], end: dict[str, Any] | None) -> None:
        """One round trip, ``end`` (a kept trial's end) after the writes; behind Optuna's own
        proxy, a call each."""
        if self._call_tuner(self._write_trial, {"writes": writes, "end": end}) is not None:
            return
        for kind, trial_id, *args in writes:
            if kind == "param":
                name, value, distribution = args
                super().set_trial_param(trial_id, name, value, optuna.distributions.json_to_distribution(distribution))
            elif kind == "records":
                values, attrs = args
                # Optuna's calls, past the ones ``_HeldWrites`` routes back here.
                for key, attr in attrs.items():
                    optuna.storages.GrpcStorageProxy.set_trial_user_attr(self, trial_id, key, attr)
                for step, value in values:
                    optuna.storages.GrpcStorageProxy.set_trial_intermediate_value(self, trial_id, step, value)
            else:
                key, value = args
                super().set_trial_system_attr(trial_id, key, value)
        if end is not None:
            super().set_trial_state_values(end["trial_id"], TrialState[end["state"]], end["values"])

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
    ) -> None:
        distribution_json = optuna.distributions.distribution_to_json(distribution)
        self._write(["param", trial_id, param_name, param_value_internal, distribution_json])
        self._keep_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(["system_attr", trial_id, key, value])
        self._keep_system_attr(trial_id, key, value)

    def record_epochs(self, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
        """As ``ReconnectingRDBStorage.record_epochs``, in one round trip."""
        # JSON keys are strings: the values go as [step, value] pairs.
        self._write(["records", trial_id, list(values.items()), dict(attrs)])
        self._keep_records(trial_id, values, attrs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """A kept trial's end goes with the held writes, in one round trip and one transaction."""
        try:
            if trial_id in self._running_here and state.is_finished():
                self.write_held(end={"trial_id": trial_id, "state": state.name, "values": values})
                return True
            self.write_held()
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._running_here.pop(trial_id, None)

    def claim_next_waiting_trial(self, study_id: int, attrs: Mapping[str, Any]) -> int | None:
        """As ``ReconnectingRDBStorage.claim_next_waiting_trial``, in one round trip, the trial
        kept here as the proxy read it; the proxy then makes the study's next slots, as it does
        after a claim by Optuna's protocol."""
        answer = self._call_tuner(self._claim_next_waiting_trial, {"study_id": study_id, "user_attrs": dict(attrs)})
        if answer is None:
            return claim_by_racing(self, study_id, attrs)
        if answer["trial_id"] is not None:
            self._running_here[answer["trial_id"]] = decode_trial(answer["trial"])
        return answer["trial_id"]


    def slot_counts(self, study_id: int) -> tuple[dict[TrialState, int], datetime | None] | None:
        """As ``ReconnectingRDBStorage.slot_counts``, counted by the proxy's database in one
        round trip; None behind Optuna's own proxy. A worker's first read of every trial would
        bring the whole study over the wire, and every worker makes one as it runs out."""
        answer = self._call_tuner(self._slot_counts, {"study_id": study_id})
        if answer is None:
            return None
        counts = {state: answer["counts"].get(state.name, 0) for state in TrialState}
        # Sent in UTC: the proxy's clock may keep another time zone than the worker's.
        first = answer["first"] and datetime.fromisoformat(answer["first"]).astimezone().replace(tzinfo=None)
        return counts, first


def slot_counts(storage: object, study_id: int) -> tuple[dict[TrialState, int], datetime | None] | None:
    """Trials by state, less the failed trials a retry replaced, and the first start, where a
    database counts them (directly or behind ``tuner proxy``); None elsewhere."""
    backend = rdb_backend(storage)
    if backend is not None:
        return backend.slot_counts(study_id)
    if isinstance(storage, GrpcStorageProxy):
        return storage.slot_counts(study_id)
    return None


def claim_order(trial: optuna.trial.FrozenTrial) -> tuple[bool, int]:
    """Which waiting trial a worker takes first: retries, then by number."""
    return RETRY_HISTORY not in trial.system_attrs, trial.number


def claim_by_racing(storage: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]) -> int | None:
    """Claim as Optuna's storage interface allows, where nothing claims in one step: read the
    waiting trials and race the other workers for each (retries first), then write ``attrs`` on
    the trial won; read them again when every one was lost. None when none waits."""
    while True:
        waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return None
        for frozen in sorted(waiting, key=claim_order):
            try:
                won = storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING)
            except UpdateFinishedTrialError:
                continue
            if won:
                _write_user_attrs(storage, frozen._trial_id, attrs)
                return frozen._trial_id


class JournalStorage(optuna.storages.JournalStorage):
    """Optuna's journal storage, whose writes within ``one_append()`` reach the journal together.

    Each append takes the journal's lock and, on a file, flushes it to disk: the writes of a
    trial that belong together (a claim and who runs it, the sampled parameters, the records of
    its end and its state) cost one append instead of one each.
    """

    def __init__(self, backend: optuna.storages.journal.BaseJournalBackend) -> None:
        self._held = threading.local()  # before Optuna's first read of the journal
        super().__init__(backend)
        self._no_trial_created_yet()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._held = threading.local()
        super().__setstate__(state)
        self._no_trial_created_yet()

    def _no_trial_created_yet(self) -> None:
        """What Optuna's ``restore_replay_result`` sets: a trial created within ``one_append``
        reads it before the replay of any creation of this process has set it."""
        self._replay_result._last_created_trial_id_by_this_process = -1

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_held"]
        return state

    def _holding(self) -> list[dict[str, Any]] | None:
        return getattr(self._held, "logs", None)

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        held = self._holding()
        if held is None:
            super()._write_log(op_code, extra_fields)
        else:
            held.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})

    def _sync_with_backend(self) -> None:
        # Within ``one_append`` reads see the journal as it was when the block began: the
        # thread's own writes are not in it yet, and reading after each of them is what the
        # block saves.
        if self._holding() is None:
            super()._sync_with_backend()

    @contextlib.contextmanager
    def one_append(self) -> Iterator[None]:
        """Hold this thread's writes made within and append them as the block ends, raised or not.

        A write within returns before its line is in the journal: what it returns (a claim's
        win, a new trial's id) means nothing, and an error its line makes (a finished trial's)
        is raised as the block ends. A block within a block appends with the outer one.
        """
        if self._holding() is not None:
            yield
            return
        self._held.logs = []
        try:
            yield
        finally:
            logs, self._held.logs = self._held.logs, None
            if logs:
                with self._thread_lock:
                    self._backend.append_logs(logs)
                    self._sync_with_backend()


def one_write(storage: object) -> contextlib.AbstractContextManager[None]:
    """A block whose writes reach the storage together: one append on tuner's journal
    (``JournalStorage.one_append``), one transaction on a database
    (``ReconnectingRDBStorage.one_transaction``), one round trip through the gRPC proxy
    (``GrpcStorageProxy.one_transaction``); elsewhere each write goes on its own."""
    if isinstance(storage, JournalStorage):
        return storage.one_append()
    if isinstance(storage, GrpcStorageProxy):
        return storage.one_transaction()
    backend = rdb_backend(storage)
    return backend.one_transaction() if backend is not None else contextlib.nullcontext()


class PromptJournalFileLock(optuna.storages.journal.JournalFileSymlinkLock):
    """Optuna's symlink lock of a journal file, looked for every few milliseconds while it is
    taken.

    Optuna's waiter doubles its pause up to a second: with 32 workers appending to one journal,
    waiters slept on long after the lock was free, and a claim, which appends under the slots'
    lock, kept every other claimer waiting while it slept. The lock file is Optuna's own, so plain
    Optuna processes on the same journal exclude and are excluded as before. A wait longer than
    ``PROMPT_WAIT_S`` goes on in Optuna's loop, which frees a lock left by a dead holder.
    """

    PROMPT_WAIT_S = 2.0
    MAX_PAUSE_S = 0.01

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.PROMPT_WAIT_S
        pause_s = 0.0005
        while time.monotonic() < deadline:
            try:
                os.symlink(self._lock_target_file, self._lock_file)
                return True
            except FileExistsError:
                # Jittered, so that waiters woken by one release do not all try at once.
                time.sleep(pause_s * random.uniform(0.5, 1.5))
                pause_s = min(2 * pause_s, self.MAX_PAUSE_S)
        return super().acquire()


class JournalFileSlots:
    """Budget slots of a journal file's studies, counted, added and claimed under one lock, as a
    database counts and adds them under the lock of the study's row.

    Optuna's journal lock is held for one append only, so the lock is a file beside the journal,
    locked with flock(2) by every process that adds or claims slots; the system releases it when
    its holder dies.
    """

    def __init__(self, storage: optuna.storages.JournalStorage) -> None:
        self.storage = storage
        self.lock_path = f"{storage._backend._file_path}.slots.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, taken once this process has read the journal nearly up to now.

        Under the lock a claimer reads what every other worker appended since it last looked:
        waiting in line for the lock, then reading all that under it, made 32 workers wait
        400 ms a claim for each other's reads (13 ms each under the lock). So a worker reads
        while it waits, looking for the lock between reads, and under the lock only the last
        few appends are left to read.
        """
        pause_s = 0.001
        with open(self.lock_path, "a") as lock:
            while True:
                # Only the read: listing the study's trials each time would cost as much again,
                # more as the study grows.
                with self.storage._thread_lock:
                    self.storage._sync_with_backend()
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(pause_s)
                    pause_s = min(2 * pause_s, 0.05)
            yield

    def add_waiting_trials(self, study_id: int, n_trials: int, ahead: int) -> int:
        """As ``ReconnectingRDBStorage.add_waiting_trials``; the new slots in one append."""
        blank = optuna.trial.create_trial(state=TrialState.WAITING)
        with self._locked():
            holders = slot_holders(self.storage.get_all_trials(study_id, deepcopy=False))
            waiting = sum(t.state == TrialState.WAITING for t in holders)
            if _enough_waiting(waiting, ahead):
                return waiting
            added = max(0, min(ahead - waiting, n_trials - len(holders)))
            with one_write(self.storage):
                for _ in range(added):
                    self.storage.create_new_trial(study_id, template_trial=blank)
        return waiting + added

    def claim_next_waiting_trial(self, study_id: int, attrs: Mapping[str, Any]) -> int | None:
        """As ``ReconnectingRDBStorage.claim_next_waiting_trial``: the claim and the attributes in
        one append. Under the lock no other worker claims; in a race, a loser's attributes
        would land on the winner's trial."""
        with self._locked():
            waiting = self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
            if not waiting:
                return None
            trial_id = min(waiting, key=claim_order)._trial_id
            with one_write(self.storage):
                self.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
                for key, value in attrs.items():
                    self.storage.set_trial_user_attr(trial_id, key, value)
        return trial_id


def slot_maker(storage: object) -> ReconnectingRDBStorage | JournalFileSlots | None:
    """What adds a study's budget slots a few at a time and claims them, on the storages that
    can count, add and claim them under one lock (a database, a journal file); None where every
    slot is made at once and workers race for each."""
    backend = rdb_backend(storage)
    if backend is not None:
        return backend
    if isinstance(storage, optuna.storages.JournalStorage) and isinstance(
        storage._backend, optuna.storages.journal.JournalFileBackend
    ):
        return JournalFileSlots(storage)
    return None


def claim_next_waiting_trial(storage: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]) -> int | None:
    """Set the study's next WAITING trial (retries first) RUNNING with user attributes ``attrs``;
    return its id, or None when none waits. One transaction on a database, one append under a
    lock on a journal file, one round trip through ``tuner proxy``; elsewhere a race.

    The caller runs the trial: on a database it is read from the claimer's own copy until told.
    """
    claimer = storage if isinstance(storage, GrpcStorageProxy) else slot_maker(storage)
    if claimer is None:
        return claim_by_racing(storage, study_id, attrs)
    if isinstance(claimer, ReconnectingRDBStorage):
        return claimer.claim_next_waiting_trial(study_id, attrs, keep=True)
    return claimer.claim_next_waiting_trial(study_id, attrs)


def _epoch_recorder(storage: object) -> ReconnectingRDBStorage | GrpcStorageProxy | None:
    """What writes a trial's user attributes and intermediate value at once: a database in one
    transaction, the gRPC proxy in one round trip."""
    return storage if isinstance(storage, GrpcStorageProxy) else rdb_backend(storage)


def rdb_backend(storage: object) -> ReconnectingRDBStorage | None:
    """The database storage behind ``storage``, where it is one, for the queries Optuna's
    storage interface has no call for."""
    backend = getattr(storage, "_backend", storage)  # behind Optuna's cache of finished trials
    return backend if isinstance(backend, ReconnectingRDBStorage) else None


def record_epochs(trial: optuna.Trial | optuna.trial.FixedTrial, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
    """``set_user_attrs`` and the intermediate values of steps not written before, in one
    transaction where the storage is a database, one round trip through ``tuner proxy`` and one
    append where it is a journal. A step's value may already be in the trial's cache
    (``show_value``)."""
    storage = getattr(trial, "storage", None)  # a FixedTrial (``tuner train``) has none
    if storage is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    changed = _changed(trial, attrs)
    if not changed and not values:
        return
    backend = _epoch_recorder(storage)
    if backend is None:
        with one_write(storage):
            _write_user_attrs(storage, trial._trial_id, changed)
            for step, value in values.items():
                storage.set_trial_intermediate_value(trial._trial_id, step, value)
    else:
        backend.record_epochs(trial._trial_id, values, changed)
    _hold(trial, changed)
    trial._cached_frozen_trial.intermediate_values.update(values)


def show_value(trial: optuna.Trial | optuna.trial.FixedTrial, step: int, value: float) -> bool:
    """Let the pruner see a step's value before it is written; False where the trial has one
    for that step already (Optuna keeps the first value reported)."""
    cached = getattr(trial, "_cached_frozen_trial", None)  # a FixedTrial has no pruner
    if cached is None:
        return False
    if step in cached.intermediate_values:
        return False
    cached.intermediate_values[step] = value
    return True


def cache_claimed_trial(storage: optuna.storages.BaseStorage, study_id: int, trial: optuna.trial.FrozenTrial) -> None:
    """Make Optuna's cache of a study's trials know a trial claimed past it, as it knows the
    trials it creates itself: it takes parameters only for trials it knows."""
    if not isinstance(storage, _CachedStorage):
        return
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [copy.deepcopy(trial)])
        # Read again with the study's other unfinished trials until it finishes.
        storage._studies[study_id].unfinished_trial_ids.add(trial._trial_id)


def set_user_attrs(trial: optuna.Trial | optuna.trial.FixedTrial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for each attribute whose value the trial does not hold already,
    in one transaction where the storage is a database, one round trip through ``tuner proxy``
    and one append where it is a journal. A value written again is a write for nothing: through
    Optuna's own gRPC proxy, a round trip each."""
    record_epochs(trial, {}, attrs)


def _write_user_attrs(storage: optuna.storages.BaseStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    backend = _epoch_recorder(storage)
    if backend is not None:
        backend.set_trial_user_attrs(trial_id, attrs)
        return
    with one_write(storage):
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)


def _changed(trial: optuna.Trial, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes whose value differs from what the trial holds (stored, as far as this
    process knows)."""
    held = trial._cached_frozen_trial.user_attrs
    return {key: value for key, value in attrs.items() if key not in held or held[key] != value}


def _hold(trial: optuna.Trial, written: Mapping[str, Any]) -> None:
    """Remember what was written as it was then: a list that grows after being written (the
    history) must not look written already."""
    trial._cached_frozen_trial.user_attrs.update(copy.deepcopy(dict(written)))


_TRIAL_STATE = sqlalchemy.select(models.TrialModel.state).where(
    models.TrialModel.trial_id == sqlalchemy.bindparam("trial_id")
)
_IS_RETRY = (
    sqlalchemy.select(models.TrialSystemAttributeModel.trial_system_attribute_id)
    .where(
        models.TrialSystemAttributeModel.trial_id == models.TrialModel.trial_id,
        models.TrialSystemAttributeModel.key == RETRY_HISTORY,
    )
    .exists()
)
# Whether a trial has anything besides its own row: a blank slot has nothing to read.
_HAS_ROWS = sqlalchemy.or_(*(
    sqlalchemy.select(model.trial_id).where(model.trial_id == models.TrialModel.trial_id).exists()
    for model in (
        models.TrialParamModel, models.TrialValueModel, models.TrialIntermediateValueModel,
        models.TrialUserAttributeModel, models.TrialSystemAttributeModel,
    )
))
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert, "mysql": mysql.insert}
# Not in Optuna's metadata, where every RDBStorage of the process (a plain Optuna baseline's
# too) would create it. MySQL has no IF NOT EXISTS for an index (MariaDB has) and goes without.
_TRIALS_BY_STATE_NAME = "ix_tuner_trials_study_id_state"
_TRIALS_BY_STATE = sqlalchemy.text(f"CREATE INDEX IF NOT EXISTS {_TRIALS_BY_STATE_NAME} ON trials (study_id, state)")
# A claim's statements, as Core: the ORM would load the trial's object and flush it.
_NEXT_WAITING = (
    sqlalchemy.select(models.TrialModel.trial_id, models.TrialModel.number, _HAS_ROWS)
    .where(models.TrialModel.study_id == sqlalchemy.bindparam("study_id"), models.TrialModel.state == TrialState.WAITING)
    .order_by(sqlalchemy.case((_IS_RETRY, 0), else_=1), models.TrialModel.number)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_START = (
    sqlalchemy.update(models.TrialModel)
    .where(models.TrialModel.trial_id == sqlalchemy.bindparam("claimed_id"))
    .values(state=TrialState.RUNNING, _datetime_start_utc=sqlalchemy.bindparam("start"))
    .execution_options(synchronize_session=False)
)
# A trial's end; only an unfinished trial takes it.
_END = (
    sqlalchemy.update(models.TrialModel)
    .where(
        models.TrialModel.trial_id == sqlalchemy.bindparam("ended_id"),
        models.TrialModel.state.not_in([state for state in TrialState if state.is_finished()]),
    )
    .values(
        state=sqlalchemy.bindparam("end_state", type_=models.TrialModel.state.type),
        _datetime_complete_utc=sqlalchemy.bindparam("complete"),
    )
    .execution_options(synchronize_session=False)
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
    return insert.on_conflict_do_update(
        index_elements=[table.c[key] for key in keys], set_={column: insert.excluded[column] for column in columns}
    )
_RETRIED_METHODS = (
    {name for name in vars(optuna.storages.BaseStorage) if not name.startswith("_")}
    | {name for name in vars(optuna.storages.RDBStorage) if not name.startswith("_")}
    | {"_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials", "_set_trial_param"}
    | {"set_trial_user_attrs", "record_epochs", "slot_counts", "add_waiting_trials", "claim_next_waiting_trial"}
    | {"get_study_id_of_trial", "write_held"}
) - {"remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions"}
_retrying = threading.local()


def _as_read(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as a read gives them back: through JSON, so a tuple is a list, and a copy,
    so a list that grows after being written does not grow in the kept trial."""
    return json.loads(json.dumps(dict(attrs)))


def _is_connection_error(error: BaseException) -> bool:
    """Whether the error, or one it came from, is a lost connection.

    Optuna wraps a failed commit in ``StorageInternalError``, and where it falls back to a
    second query after a first one failed, the lost connection shows only as the second
    query's ``PendingRollbackError``; the whole chain is looked at.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OperationalError, InterfaceError, PendingRollbackError)) or (
            isinstance(current, DBAPIError) and current.connection_invalidated
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(message: str) -> str:
    """What went wrong, past SQLAlchemy's note that the error came out of an autoflush."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("(raised as a result")]
    return lines[0] if lines else message


def _with_reconnect(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: optuna.storages.RDBStorage, *args: Any, **kwargs: Any) -> Any:
        if getattr(_retrying, "active", False):
            return method(self, *args, **kwargs)
        deadline = time.monotonic() + float(os.environ.get("TUNER_DB_RETRY_S", "120"))
        delay = 0.5
        _retrying.active = True
        try:
            while True:
                try:
                    return method(self, *args, **kwargs)
                except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
                    if not _is_connection_error(error):
                        raise
                    reason = _first_line(str(error.__cause__ or error))
                    if time.monotonic() + delay > deadline:
                        raise StorageError(
                            f"Lost the storage {mask_url(str(self.url))!r} and it did not come "
                            f"back: {reason}"
                        ) from None
                    if "database is locked" in reason:
                        # Another SQLite writer held the lock past the 60 s timeout, or
                        # committed after this transaction's first read where it began at one:
                        # retried at once, with a few milliseconds of jitter between losers.
                        _logger.debug("SQLite busy (%s); retrying", reason)
                        time.sleep(random.uniform(0, 0.005))
                        continue
                    _logger.warning("storage unreachable (%s); retrying in %.1f s", reason, delay)
                    time.sleep(delay)
                    delay = min(2 * delay, 10.0)
        finally:
            _retrying.active = False

    return call


for _name in _RETRIED_METHODS:
    setattr(ReconnectingRDBStorage, _name, _with_reconnect(getattr(ReconnectingRDBStorage, _name)))


def _heartbeat_settings() -> tuple[int, int]:
    interval = int(os.environ.get("TUNER_HEARTBEAT_INTERVAL", "10"))
    grace = int(os.environ.get("TUNER_HEARTBEAT_GRACE", str(3 * interval)))
    return interval, grace


_read_then_write = threading.local()


@contextlib.contextmanager
def _reads_kept_until_written() -> Iterator[None]:
    """Within: SQLite transactions take the write lock when they begin, so that nothing they
    read can change before they write (see ``_begin_sqlite``)."""
    _read_then_write.active = True
    try:
        yield
    finally:
        _read_then_write.active = False


def _begin_sqlite(connection: sqlalchemy.engine.Connection) -> None:
    """Begin the SQLite transactions whose reads decide their writes with the write lock.

    Python's sqlite3 would begin a transaction at its first write, so a claim (a WAITING trial
    read, then set RUNNING) would read and write in two transactions and two workers could both
    win one trial. Claims and slot top-ups begin ``IMMEDIATE``: a second claimer waits for the
    first to commit, then reads the trial taken. Every other transaction begins at its first
    write (``_begin_at_first_write``): begun at its first read instead, it would be refused
    whenever another worker wrote in between, which with several workers is most of the time.
    """
    if getattr(_read_then_write, "active", False):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")


def _begin_at_first_write(
    connection: sqlalchemy.engine.Connection, cursor: Any, statement: str, *args: Any
) -> None:
    if not connection.connection.dbapi_connection.in_transaction and statement.lstrip()[:6].upper() in _WRITES:
        cursor.execute("BEGIN")


def _rdb_storage(url: str, max_retries: int) -> optuna.storages.RDBStorage:
    full_url = sqlalchemy_url(url)
    try:
        parsed = make_url(full_url)
    except ArgumentError:
        raise StorageError(f"Storage URL {mask_url(url)!r} is not a valid database URL.") from None
    # No ping before each transaction (Optuna pings on MySQL only): a connection lost since its
    # last use fails its first query, which _with_reconnect retries on a fresh one.
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        # Several worker processes write one file: wait for the lock instead of failing. The
        # driver's own transaction handling is switched off so that _begin_sqlite and
        # _begin_at_first_write can begin transactions themselves (see there).
        engine_kwargs["connect_args"] = {"timeout": 60, "isolation_level": None}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_size"] = 2
        engine_kwargs["max_overflow"] = 2
    interval, grace = _heartbeat_settings()
    try:
        storage = ReconnectingRDBStorage(
            full_url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=interval,
            grace_period=grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_retries, inherit_intermediate_values=True
            ),
        )
    except ModuleNotFoundError as error:
        raise StorageError(
            f"Storage URL {mask_url(url)!r} needs the Python package {error.name!r}."
        ) from None
    except (SQLAlchemyError, OSError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        password = parsed.password
        if password:
            reason = reason.replace(str(password), "***")
        raise StorageError(f"Cannot open storage {mask_url(url)!r}: {reason}") from None
    if parsed.get_backend_name() == "sqlite":
        with storage.engine.connect() as connection:
            # WAL lets readers (dashboard, status) work while a worker writes.
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        sqlalchemy.event.listen(storage.engine, "begin", _begin_sqlite)
        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", _begin_at_first_write)
    _index_trials_by_state(storage.engine)
    return storage


def _index_trials_by_state(engine: sqlalchemy.engine.Engine) -> None:
    """Index trials by study and state, beside Optuna's index by study: a claim, a slot count
    and a stale-trial check each look for a study's few WAITING or RUNNING trials, and by study
    alone the server read every trial of it (4 ms a claim at 10,000 trials on PostgreSQL).

    Looked up first: on PostgreSQL even a CREATE INDEX that finds the index made locks the
    table against writes while it runs. Optuna's schema is otherwise untouched; a database
    that refuses the index (no right to create one, MySQL's syntax) works as before, only
    slower.
    """
    try:
        if any(index["name"] == _TRIALS_BY_STATE_NAME for index in sqlalchemy.inspect(engine).get_indexes("trials")):
            return
        with engine.begin() as connection:
            connection.execute(_TRIALS_BY_STATE)
    except SQLAlchemyError as error:  # made at the same moment by another process, or refused
        _logger.debug("trials not indexed by state: %s", _first_line(str(error)))


def make_storage(url: str | None = None, *, max_retries: int = 2) -> optuna.storages.BaseStorage:
    """Open the storage a URL names; raise StorageError with the masked URL when it cannot."""
    url = storage_url(url)
    if url.endswith(".log") or url.startswith("journal://"):
        path = url.removeprefix("journal://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(optuna.storages.journal.JournalFileBackend(path, lock_obj=PromptJournalFileLock(path)))
    if url.startswith("redis://"):
        try:
            backend = optuna.storages.journal.JournalRedisBackend(url)
        except Exception as error:  # redis raises its own connection errors
            raise StorageError(f"Cannot open storage {mask_url(url)!r}: {error}") from None
        return JournalStorage(backend)
    if url.startswith("grpc://"):
        host, _, port = url.removeprefix("grpc://").partition(":")
        if not port.isdigit():
            raise StorageError(f"Storage URL {url!r} must be grpc://HOST:PORT.")
        return GrpcStorageProxy(host=host, port=int(port))
    if "://" not in url:
        raise StorageError(
            f"Storage URL {mask_url(url)!r} is not a URL; use sqlite:///PATH, postgresql://..., "
            "mysql://..., a path ending in .log, redis://... or grpc://HOST:PORT."
        )
    return _rdb_storage(url, max_retries)
