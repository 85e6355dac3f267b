"""optuna-dashboard on a tuner storage, with the artifact store the workers write to."""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import optuna_dashboard

from tuner.artifacts import artifact_store, default_artifact_dir
from tuner.errors import BadInputError
from tuner.storage import make_storage, storage_url


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(
    storage: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_dir: Path | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until Ctrl-C or SIGTERM, both of which end it quietly (the server catches
    ``KeyboardInterrupt``)."""
    url = storage_url(storage)
    opened = make_storage(url)
    store = artifact_store(artifact_dir or default_artifact_dir(url))
    # Set for SIGINT too: a process started in the background inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    announce(f"optuna-dashboard at http://{host}:{port}/dashboard/ (Ctrl-C to stop)")
    try:
        optuna_dashboard.run_server(opened, host=host, port=port, artifact_store=store)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        raise BadInputError(f"Port {port} on {host} is in use; choose another with --port.") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
