"""A storage URL of DESIGN.md turned into an Optuna storage; a password is never shown."""

from __future__ import annotations

import json
import logging
import os
import re
import weakref
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages._cached_storage import _CachedStorage
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from tuner.errors import BadInputError, StorageError, StorageMissingError
from tuner.storages._grpc import GrpcStorageProxy
from tuner.storages._journal import JournalStorage, PromptJournalFileLock, RedisJournalBackend
from tuner.storages._lease import LeaseHeartbeat
from tuner.storages._rdb import ReconnectingRDBStorage
from tuner.storages._reconnect import first_line, permanent_error
from tuner.storages._slots import RetryStaleTrial
from tuner.storages._sqlite import begin_at_first_write, begin_sqlite
from tuner.storages._urls import check_credentials, journal_file, mask_url, sqlalchemy_url, sqlite_file, storage_url

_logger = logging.getLogger("tuner.storages")

# Not in Optuna's metadata, where every RDBStorage of the process (a plain Optuna baseline's
# too) would create it. MySQL has no IF NOT EXISTS for an index (MariaDB has) and goes without.
_TRIALS_BY_STATE_NAME = "ix_tuner_trials_study_id_state"
_TRIALS_BY_STATE = sqlalchemy.text(f"CREATE INDEX IF NOT EXISTS {_TRIALS_BY_STATE_NAME} ON trials (study_id, state)")

# Long enough for a proxy started beside its workers to come up; a wrong address fails soon.
GRPC_READY_S = 10.0

_opened_from: weakref.WeakKeyDictionary[optuna.storages.BaseStorage, str] = weakref.WeakKeyDictionary()


def _seconds_setting(name: str, default: int) -> int:
    """A whole number of seconds above 0 from the environment variable ``name``: anything else
    is bad input naming the variable, where int() or Optuna would say only 'invalid literal'."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise BadInputError(f"{name} must be a whole number of seconds above 0, not {text!r}.")
    return seconds


def _heartbeat_settings() -> tuple[int, int]:
    """The heartbeat interval and grace period; a grace no longer than the interval is bad
    input: a live worker's trial would pass for dead between two beats, and be failed and
    retried under it."""
    interval = _seconds_setting("TUNER_HEARTBEAT_INTERVAL", 10)
    grace = _seconds_setting("TUNER_HEARTBEAT_GRACE", 3 * interval)
    if grace <= interval:
        raise BadInputError(
            f"TUNER_HEARTBEAT_GRACE ({grace} s) must be longer than TUNER_HEARTBEAT_INTERVAL ({interval} s)."
        )
    return interval, grace


def _storage_file(url: str, path: Path, create: bool) -> None:
    """Make the folder of a storage file that may be created; else the file must be there, since
    SQLite and the journal would create it, empty, where a name was mistyped. A folder is
    refused by name, where the journal would fail on opening it as a file."""
    if path.is_dir():
        raise StorageError(f"{mask_url(url)}: {str(path)!r} is a folder; name a file in it.")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise StorageMissingError(f"{mask_url(url)}: no such file; studies are created by `tuner create` or `tuner run`.")


def _open_rdb_storage(url: str, max_retries: int, create: bool) -> optuna.storages.RDBStorage:
    full_url = sqlalchemy_url(url)
    try:
        parsed = make_url(full_url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StorageError(f"Storage URL {mask_url(url)!r} is not a valid database URL.") from None
    # No ping before each transaction (Optuna pings on MySQL only): a connection lost since its
    # last use fails its first query, which with_reconnect retries on a fresh one.
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        # Several worker processes write one file: wait for the lock instead of failing. The
        # driver's own transaction handling is switched off so that begin_sqlite and
        # begin_at_first_write can begin transactions themselves (see there).
        engine_kwargs["connect_args"] = {"timeout": 60, "isolation_level": None}
        path = sqlite_file(url)
        if path is None:
            raise StorageError(
                f"Storage {mask_url(url)!r} is a database in memory: each process (each worker, each "
                "command) would open its own, empty, and lose it as it exits; name a file, e.g. sqlite:///tuner.db."
            )
        _storage_file(url, path, create)
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
            heartbeat_stale_trial_callback=RetryStaleTrial(max_retries),
        )
        if parsed.get_backend_name() == "sqlite":
            with storage.engine.connect() as connection:
                # WAL lets readers (dashboard, status) work while a worker writes.
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    except ImportError as error:
        # Optuna re-raises a missing driver (mysql+mysqldb://, postgresql+psycopg2://) as a
        # bare ImportError; the module that is missing is named by the error it came from.
        missing = error if isinstance(error, ModuleNotFoundError) else error.__cause__
        name = getattr(missing, "name", None)
        raise StorageError(
            f"Storage URL {mask_url(url)!r} needs the Python package {name!r}."
            if name
            else f"Storage URL {mask_url(url)!r} needs a database driver that does not load: {missing or error}."
        ) from None
    except (SQLAlchemyError, OSError) as error:
        permanent = permanent_error(error, url)
        if permanent is not None:
            raise permanent from None
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        password = parsed.password
        if password:
            # Only where it stands alone: a short password would otherwise eat into the words.
            reason = re.sub(rf"(?<!\w){re.escape(str(password))}(?!\w)", "***", reason)
        raise StorageError(f"Cannot open storage {mask_url(url)!r}: {reason}") from None
    if parsed.get_backend_name() == "sqlite":
        sqlalchemy.event.listen(storage.engine, "begin", begin_sqlite)
        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", begin_at_first_write)
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
        _logger.debug("trials not indexed by state: %s", first_line(str(error)))


def make_storage(
    url: str | None = None, *, max_retries: int = 2, create: bool = True
) -> optuna.storages.BaseStorage:
    """Open the storage a URL names; raise StorageError with the masked URL when it cannot.

    Without ``create``, a SQLite or journal file that is not there is an error rather than made:
    commands that only read must not leave an empty storage behind.
    """
    url = storage_url(url)
    check_credentials(url)
    storage = _open_storage(url, max_retries, create)
    _opened_from[storage] = url
    return storage


def storage_name(storage: optuna.storages.BaseStorage) -> str:
    """The storage as messages name it: with the masked URL ``make_storage`` opened it from,
    which ``TUNER_STORAGE`` may have chosen unseen."""
    # A study wraps a database in Optuna's cache, which was not what was opened.
    url = _opened_from.get(storage._backend if isinstance(storage, _CachedStorage) else storage)
    return "the storage" if url is None else f"storage {mask_url(url)!r}"


def _check_journal(url: str, path: Path) -> None:
    """Refuse a file that is not a journal before Optuna reads it as one and fails on a line."""
    if not path.is_file():
        return
    with path.open("rb") as journal:
        first = journal.readline()
    try:
        if first:
            json.loads(first)
    except ValueError:
        raise StorageError(f"{mask_url(url)} is not an Optuna journal file: its first line is not a JSON record.") from None


def _open_storage(url: str, max_retries: int, create: bool) -> optuna.storages.BaseStorage:
    storage = _open_storage_of_kind(url, max_retries, create)
    if isinstance(storage, LeaseHeartbeat):
        interval, grace = _heartbeat_settings()
        storage.use_heartbeats(interval, grace, RetryStaleTrial(max_retries))
    return storage


def _open_storage_of_kind(url: str, max_retries: int, create: bool) -> optuna.storages.BaseStorage:
    journal = journal_file(url)
    if journal is not None:
        _storage_file(url, journal, create)
        _check_journal(url, journal)
        path = str(journal)
        return JournalStorage(optuna.storages.journal.JournalFileBackend(path, lock_obj=PromptJournalFileLock(path)))
    if url.startswith("redis://"):
        try:
            backend = RedisJournalBackend(url)
            # Connected at once: redis connects at the first command, which failed later with
            # its bare ConnectionError, not naming the storage.
            backend._redis.ping()
            return JournalStorage(backend)
        except Exception as error:  # redis raises its own connection errors
            raise StorageError(f"Cannot open storage {mask_url(url)!r}: {error}") from None
    if url.startswith("grpc://"):
        # The last colon: an IPv6 address ([::1], as ``tuner proxy`` prints it) holds others.
        host, _, port = url.removeprefix("grpc://").rpartition(":")
        if not port.isdigit() or "@" in host or (":" in host and not host.startswith("[")):
            raise StorageError(f"Storage URL {mask_url(url)!r} must be grpc://HOST:PORT.")
        proxy = GrpcStorageProxy(host=host, port=int(port))
        try:
            proxy.wait_server_ready(timeout=GRPC_READY_S)
        except ConnectionError:
            raise StorageError(
                f"Nothing answers at {mask_url(url)!r} within {GRPC_READY_S:g} s; is `tuner proxy` running there?"
            ) from None
        return proxy
    if "://" not in url:
        raise StorageError(
            f"Storage URL {mask_url(url)!r} is not a URL; use sqlite:///PATH, postgresql://..., "
            "mysql://..., a path ending in .log, redis://... or grpc://HOST:PORT."
        )
    return _open_rdb_storage(url, max_retries, create)
