"""When SQLite transactions begin: with the write lock where their reads decide their writes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy

_read_then_write = threading.local()


@contextlib.contextmanager
def reads_kept_until_written() -> Iterator[None]:
    """Within: SQLite transactions take the write lock when they begin, so that nothing they
    read can change before they write (see ``begin_sqlite``)."""
    _read_then_write.active = True
    try:
        yield
    finally:
        _read_then_write.active = False


def begin_sqlite(connection: sqlalchemy.engine.Connection) -> None:
    """Begin the SQLite transactions whose reads decide their writes with the write lock.

    Python's sqlite3 would begin a transaction at its first write, so a claim (a WAITING trial
    read, then set RUNNING) would read and write in two transactions and two workers could both
    win one trial. Claims and slot top-ups begin ``IMMEDIATE``: a second claimer waits for the
    first to commit, then reads the trial taken. Every other transaction begins at its first
    write (``begin_at_first_write``): begun at its first read instead, it would be refused
    whenever another worker wrote in between, which with several workers is most of the time.
    """
    if getattr(_read_then_write, "active", False):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")


def begin_at_first_write(
    connection: sqlalchemy.engine.Connection, cursor: Any, statement: str, *args: Any
) -> None:
    if not connection.connection.dbapi_connection.in_transaction and statement.lstrip()[:6].upper() in _WRITES:
        cursor.execute("BEGIN")
