"""Storage URLs: the one in effect, its driver spelled out, and as it may be printed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tuner.errors import StorageError

DEFAULT_STORAGE = "sqlite:///tuner.db"

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql"}


def storage_url(url: str | None = None) -> str:
    """The URL in effect: the argument, else ``TUNER_STORAGE``, else ``sqlite:///tuner.db``."""
    return url or os.environ.get("TUNER_STORAGE") or DEFAULT_STORAGE


def _credentials(url: str) -> tuple[int, str]:
    """Where the address begins (after any ``scheme://``) and what stands before its last ``@``
    ahead of the query.

    Read by hand, not by a URL parser: a parser splits at the first ``@``, so a password that
    holds one, or a URL missing its ``://``, would leave part of a password where it is printed.
    The query begins at the first ``?`` past the first ``@``: one before it is the password's,
    as SQLAlchemy reads it.
    """
    start = url.index("://") + 3 if "://" in url else 0
    address = url[start:]
    query = address.find("?", max(address.find("@"), 0))
    credentials, at, _ = (address if query < 0 else address[:query]).rpartition("@")
    return start, credentials if at else ""


# A password given in the query, as libpq and SQLAlchemy take it (``?password=...``).
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL as it may be printed: any password, before the host or in the query, replaced
    by ``***``."""
    start, credentials = _credentials(url)
    rest = _QUERY_PASSWORD.sub(r"\1***", url[start + len(credentials):])
    if not credentials and start:
        # No '@': a 'user:password' whose '@host' was left out reads as a host and a port
        # that is no number, and would be printed whole.
        authority = re.match(r"[^/?]*", rest).group()
        host, colon, port = authority.partition(":")
        if colon and port and not port.isdigit() and not host.startswith("["):
            return f"{url[:start]}{host}:***{rest[len(authority):]}"
    if ":" not in credentials:
        return f"{url[:start]}{credentials}{rest}"
    user = credentials.split(":", 1)[0]
    return f"{url[:start]}{user}:***{rest}"


def check_credentials(url: str) -> None:
    """Refuse an ``@`` inside a user or password, which drivers read as the end of it."""
    if "@" in _credentials(url)[1]:
        raise StorageError(
            f"Storage URL {mask_url(url)!r} has an '@' in its user or password; write it as %40."
        )


def journal_file(url: str) -> Path | None:
    """The file of a journal storage URL (``journal:///PATH`` or a path ending in ``.log``); a
    URL of another scheme ending in ``.log`` (``sqlite:///study.log``) names no journal."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://"))
    if url.endswith(".log") and "://" not in url:
        return Path(url)
    return None


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, whatever its driver (``sqlite+pysqlite://``) or query; None for
    another database or one in memory. With ``uri=true`` the database is a ``file:`` URI
    (``sqlite:///file:ro.db?mode=ro&uri=true``)."""
    try:
        parsed = make_url(sqlalchemy_url(url))
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if parsed.query.get("uri") == "true":
        database = "" if parsed.query.get("mode") == "memory" else urlparse(database).path
    return Path(database) if database and database != ":memory:" else None


def beside_storage(url: str, name: str) -> Path:
    """Folder ``name`` beside a SQLite or journal file, else ``./name``: where a storage's
    checkpoints and artifacts go by default, so that every local reader finds them."""
    url = storage_url(url)
    file = sqlite_file(url) or journal_file(url)
    return file.resolve().parent / name if file is not None else Path(name).resolve()


def sqlalchemy_url(url: str) -> str:
    """Spell out the driver: psycopg 3 for PostgreSQL, PyMySQL for MySQL."""
    scheme, sep, rest = url.partition("://")
    return f"{_DRIVERS.get(scheme, scheme)}{sep}{rest}"
