"""Storage URLs: the one in effect, its driver spelled out, and as it may be printed."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_STORAGE = "sqlite:///tuner.db"

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
