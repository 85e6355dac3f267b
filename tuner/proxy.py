"""Optuna's gRPC storage proxy in front of a database, for many hundreds of workers.

Each worker that opens the database itself holds a pool of connections; behind the proxy all of
them share the proxy's one pool, and reach it with ``--storage grpc://HOST:PORT``.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import optuna

from tuner.errors import BadInputError
from tuner.storage import make_storage, mask_url, storage_url

# One thread per database connection of the storage (tuner.storage: pool_size=2, max_overflow=2),
# so that requests queue in gRPC instead of timing out in the connection pool.
THREADS = 4


def serve(storage: str | None = None, *, host: str = "127.0.0.1", port: int = 13000) -> None:
    """Serve the storage over gRPC until interrupted."""
    url = storage_url(storage)
    if url.startswith(("grpc://", "redis://", "journal://")) or url.endswith(".log"):
        raise BadInputError(
            f"The gRPC proxy serves database storages only, not {mask_url(url)!r}; "
            "use sqlite:///..., postgresql://... or mysql://..."
        )
    # The cached wrapper keeps finished trials in memory, as Optuna advises for the proxy.
    cached = optuna.storages.get_storage(make_storage(url))
    # SIGTERM (docker stop, Kubernetes, Slurm) ends it as Ctrl-C does; and Ctrl-C works even
    # where the proxy was started in the background by a shell, which makes children ignore it.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    try:
        optuna.storages.run_grpc_proxy_server(
            cached, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=THREADS)
        )
    except RuntimeError as error:  # grpc's "Failed to bind"
        raise BadInputError(f"Cannot listen on {host}:{port}: {error}.") from None
    except KeyboardInterrupt:
        pass
