"""Files tuner writes: into folders checked before the work that fills them, and whole or not at
all."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from tuner.errors import BadInputError


def check_folder(folder: Path, what: str, option: str) -> None:
    """Refuse a folder that cannot be made or written before the work that writes there starts,
    naming ``what`` it holds and the ``option`` that sets it. Creating a scratch file is the one
    test that also holds for root and read-only mounts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise BadInputError(
            f"The {what} folder {str(folder)!r} cannot be created or written ({error.strerror or error}); "
            f"give one that can be written with {option}."
        ) from None


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it onto ``path``: a write cut
    short (a kill, a full disk) leaves what was there, not a truncated file.

    The temporary name is not the process id alone: workers in containers are all process 1, and
    a paused one back while its trial's retry runs writes the same checkpoint as the retry.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
