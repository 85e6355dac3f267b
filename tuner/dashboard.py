"""optuna-dashboard on a tuner storage, with the artifact store the workers write to."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna_dashboard

from tuner.artifacts import artifact_store, default_artifact_dir
from tuner.errors import BadInputError
from tuner.storages import make_storage, storage_url

_logger = logging.getLogger("tuner.dashboard")


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the log only when asked: a dashboard polls every few seconds."""

    def log_message(self, format: str, *args: object) -> None:
        _logger.debug(format, *args)


def serve(
    storage: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_dir: Path | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve optuna-dashboard's WSGI app (one request at a time, as its own server does) until
    Ctrl-C or SIGTERM.

    The server is stopped from a thread on the signal rather than by an exception, which a
    request being handled at that moment would swallow.
    """
    url = storage_url(storage)
    opened = make_storage(url, create=False)
    folder = artifact_dir or default_artifact_dir(url)
    try:
        store = artifact_store(folder)
    except OSError as error:  # a file of the name, a folder this user may not write in
        raise BadInputError(
            f"Cannot use {str(folder)!r} as the artifact folder: {error.strerror}; give another with --artifact-dir."
        ) from None
    app = optuna_dashboard.wsgi(opened, artifact_store=store)
    try:
        server = make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise BadInputError(f"Port {port} on {host} is in use; choose another with --port.") from None
        # A name that does not resolve, an address of another machine or an IPv6 one (the server
        # is IPv4), a port this user may not bind: an argument to change, not a failure.
        if isinstance(error, socket.gaierror) or error.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise BadInputError(
                f"Cannot serve on {host}:{port}: {error.strerror}; --host takes an IPv4 address or "
                "name of this machine, such as 127.0.0.1 or 0.0.0.0."
            ) from None
        raise

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    # Set for SIGINT too: a process started in the background inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    announce(f"optuna-dashboard at http://{host}:{port}/dashboard/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
