"""A trial's state after its last finished epoch: on disk for resuming, else in memory."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from tuner.files import write_atomically

logger = logging.getLogger("tuner.train")


class Checkpoint:
    """Holds one trial's latest state; written atomically (temp file + rename) when on disk.

    Without a directory the state stays in memory, which still lets an epoch be restarted after
    an out-of-memory error but does not survive the process.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._in_memory: bytes | None = None

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        if self.path is None:
            self._in_memory = buffer.getvalue()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, buffer.getvalue())

    def load(self) -> dict[str, Any] | None:
        if self.path is None:
            data = self._in_memory
        else:
            data = self.path.read_bytes() if self.path.exists() else None
        if data is None:
            return None
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as error:  # whatever torch and pickle raise for a damaged file
            # A file cut short or overwritten (a full disk, a copy by hand) would fail the trial
            # for good; trained again from the start, it is overwritten at the first epoch.
            logger.warning(
                "checkpoint %s cannot be read (%s: %s); the trial trains again from its first epoch",
                self.path, type(error).__name__, error,
            )
            return None

    def remove(self) -> None:
        """Forget the state; on disk, remove the file and the temp files beside it that writers
        killed mid-write left, which no one renames or reads."""
        self._in_memory = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            for temporary in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                temporary.unlink(missing_ok=True)
