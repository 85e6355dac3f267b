"""Database calls retried while the connection is lost, until a deadline."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)

from tuner.errors import BadInputError, StorageError, TunerError
from tuner.storages._urls import mask_url

_logger = logging.getLogger("tuner.storages")

_retrying = threading.local()


# SQLite results that no retry cures, by the name of the result code (an extended code, such as
# SQLITE_READONLY_DIRECTORY, begins with its primary's), with what each says of the database and
# whose it is to fix: the user's (exit 2) but for a full disk (exit 1). A locked or busy database
# clears when its writer commits, and an I/O error or a file that cannot be opened may be a
# network file system coming back: those are retried.
_PERMANENT_SQLITE = {
    "SQLITE_READONLY": (StorageError, "is read-only"),
    "SQLITE_NOTADB": (StorageError, "is not a SQLite database"),
    "SQLITE_CORRUPT": (StorageError, "is corrupt"),
    "SQLITE_FULL": (TunerError, "is on a full disk"),
}

# Python 3.10's sqlite3 gives no result code's name (``sqlite_errorname`` came in 3.11): SQLite's
# own message for each code above, which an extended code shares with its primary, stands in.
_SQLITE_MESSAGES = {
    "attempt to write a readonly database": "SQLITE_READONLY",
    "file is not a database": "SQLITE_NOTADB",
    "database disk image is malformed": "SQLITE_CORRUPT",
    "database or disk is full": "SQLITE_FULL",
}

# PostgreSQL's SQLSTATEs of the same kind: a full disk, and a server that takes no writes (a
# hot standby, or default_transaction_read_only); psycopg raises the first as an
# OperationalError, which would otherwise be retried as a lost connection.
_PERMANENT_POSTGRES = {
    "53100": (TunerError, "is on a full disk"),
    "25006": (StorageError, "is read-only"),
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and those it came from, each once.

    Optuna wraps a failed commit in ``StorageInternalError``, and where it falls back to a
    second query after a first one failed, the lost connection shows only as the second
    query's ``PendingRollbackError``; the whole chain is looked at.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_connection_error(error: BaseException) -> bool:
    """Whether the error, or one it came from, is a lost connection."""
    return any(
        isinstance(current, (OperationalError, InterfaceError, PendingRollbackError))
        or (isinstance(current, DBAPIError) and current.connection_invalidated)
        for current in _chain(error)
    )


def permanent_error(error: BaseException, url: str) -> TunerError | None:
    """The error to fail with at once where the database refused for good, else None."""
    for current in _chain(error):
        name = getattr(current, "sqlite_errorname", None) or _sqlite_errorname(current)
        for prefix, (kind, what) in _PERMANENT_SQLITE.items():
            if name.startswith(prefix):
                return kind(f"Storage {mask_url(url)!r} {what}: {current}.")
        if getattr(current, "sqlstate", None) in _PERMANENT_POSTGRES:
            kind, what = _PERMANENT_POSTGRES[current.sqlstate]
            return kind(f"Storage {mask_url(url)!r} {what}: {first_line(str(current))}.")
    return None


def _sqlite_errorname(error: BaseException) -> str:
    return _SQLITE_MESSAGES.get(str(error), "") if isinstance(error, sqlite3.Error) else ""


def first_line(message: str) -> str:
    """What went wrong, past SQLAlchemy's note that the error came out of an autoflush."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("(raised as a result")]
    return lines[0] if lines else message


def retry_seconds() -> float:
    """``TUNER_DB_RETRY_S``: how long a lost database is waited for; read at each call, so that a
    test or an embedding program may change it. Anything but seconds, 0 or more, is bad input
    naming the variable, where float() would say only 'could not convert string'."""
    text = os.environ.get("TUNER_DB_RETRY_S", "120")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise BadInputError(f"TUNER_DB_RETRY_S must be a number of seconds, 0 or more, not {text!r}.")
    return seconds


class Backoff:
    """The pauses between the tries of a storage that does not answer (a database, the gRPC
    proxy, Redis): 0.5 s doubling up to 10 s, for up to ``TUNER_DB_RETRY_S`` in all."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + retry_seconds()
        self.delay = 0.5

    def expired(self) -> bool:
        """Whether the next pause would end past the deadline: time to give up."""
        return time.monotonic() + self.delay > self.deadline

    def pause(self, what: str, reason: str) -> None:
        _logger.warning("%s unreachable (%s); retrying in %.1f s", what, reason, self.delay)
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 10.0)


def with_reconnect(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: optuna.storages.RDBStorage, *args: Any, **kwargs: Any) -> Any:
        if getattr(_retrying, "active", False):
            return method(self, *args, **kwargs)
        backoff = Backoff()
        _retrying.active = True
        try:
            while True:
                try:
                    return method(self, *args, **kwargs)
                except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
                    permanent = permanent_error(error, str(self.url))
                    if permanent is not None:
                        raise permanent from None
                    if not is_connection_error(error):
                        raise
                    reason = first_line(str(error.__cause__ or error))
                    if backoff.expired():
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
                    backoff.pause("storage", reason)
        finally:
            _retrying.active = False

    return call
