"""Optuna's gRPC storage proxy in front of a database, for many hundreds of workers.

Each worker that opens the database itself holds a pool of connections; behind the proxy all of
them share the proxy's one pool, and reach it with ``--storage grpc://HOST:PORT``.
"""

from __future__ import annotations

import json
import logging
import signal
from datetime import timezone
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._grpc import servicer as grpc_servicer
from optuna.storages._grpc.auto_generated import api_pb2_grpc
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from tuner.errors import BadInputError, StorageError
from tuner.storages import (
    CLAIM_METHOD,
    SLOT_COUNTS_METHOD,
    STORAGE_FAILED,
    WRITE_METHOD,
    ReconnectingRDBStorage,
    cache_claimed_trial,
    decode_json,
    encode_json,
    encode_trial,
    first_line,
    journal_file,
    make_storage,
    mask_url,
    storage_url,
)
from tuner.study import SPEC_ATTR, WAITING_AHEAD

_logger = logging.getLogger("tuner.proxy")

# One thread per database connection of the storage (tuner.storages: pool_size=2, max_overflow=2),
# so that requests queue in gRPC instead of timing out in the connection pool.
THREADS = 4
# Seconds a stopped proxy lets the calls under way finish (a transaction takes milliseconds),
# within docker stop's 10 s: a call cut off after it reached the database is sent again by its
# worker, and a claim sent twice leaves the trial claimed first RUNNING for good.
STOP_GRACE_S = 5.0


class SlotMakingStorage(_CachedStorage):
    """Optuna's cache of finished trials, which also makes a study's next budget slots.

    A worker behind the proxy cannot take the database's lock, so the proxy makes the slots for
    it, as a worker on the database makes them itself: up to ``WAITING_AHEAD`` at a time, when
    ``tuner create`` writes the spec (its budget) and after each slot a worker claims. Every
    slot of the budget made at creation would make each claim read all of them.
    """

    def __init__(self, database: ReconnectingRDBStorage) -> None:
        super().__init__(database)
        self.database = database

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        won = super().set_trial_state_values(trial_id, state, values)
        if won and state == TrialState.RUNNING:
            self._make_slots(self.database.get_study_id_of_trial(trial_id))
        return won

    def claim_trial(
        self, study_id: int, attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
    ) -> FrozenTrial | None:
        """The database's claim in one transaction, then the slots after it, as after a claim
        by Optuna's protocol; the trial as claimed, for its worker to keep. The cache is told
        of the trial, which it may not have read: it takes parameters only for trials it knows."""
        trial = self.database.claim_trial(study_id, attrs, system_attrs=system_attrs)
        if trial is None:
            return None
        cache_claimed_trial(self, study_id, trial)
        self._make_slots(study_id)
        return trial

    def set_trial_param_of_any_trial(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        """``set_trial_param``, also for a trial the cache does not know (claimed before the
        proxy started), which the database checks itself."""
        try:
            self.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        except KeyError:
            self.database.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_system_attr(study_id, key, value)
        if key == SPEC_ATTR:
            self._make_slots(study_id)

    def _make_slots(self, study_id: int) -> None:
        raw = self.get_study_system_attrs(study_id).get(SPEC_ATTR)
        n_trials = json.loads(raw)["budget"].get("n_trials") if raw else None
        if n_trials is not None:
            self.database.add_waiting_trials(study_id, n_trials, WAITING_AHEAD)


def write_handler(storage: SlotMakingStorage) -> grpc.GenericRpcHandler:
    """The call ``GrpcStorageProxy`` makes for a trial's writes: parameters, user attributes
    and intermediate values, system attributes and, where given, the trial's end, in one round
    trip and one transaction, where Optuna's protocol has a call, and a transaction, for each.
    Errors are told as Optuna's proxy tells them."""
    database = storage.database

    def write(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            with database.one_transaction():
                for kind, trial_id, *args in request["writes"]:
                    if kind == "param":
                        name, value, distribution = args
                        storage.set_trial_param_of_any_trial(trial_id, name, value, json_to_distribution(distribution))
                    elif kind == "records":
                        values, attrs = args
                        database.record_epochs(trial_id, {int(step): value for step, value in values}, attrs)
                    else:
                        key, value = args
                        database.set_trial_system_attr(trial_id, key, value)
                end = request["end"]
                if end is not None:
                    database.end_trial(end["trial_id"], TrialState[end["state"]], end["values"])
        except KeyError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except UpdateFinishedTrialError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except ValueError as error:  # a parameter's distribution unlike the study's
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return {}

    return _json_handler(WRITE_METHOD, write)


def claim_handler(storage: SlotMakingStorage) -> grpc.GenericRpcHandler:
    """The call ``GrpcStorageProxy.claim_next_waiting_trial`` makes: the next waiting trial set
    running with who runs it and its first lease, in one round trip and one transaction, where
    Optuna's protocol reads every waiting trial, then races the other workers for each, then
    writes each attribute."""

    def claim(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        trial = storage.claim_trial(request["study_id"], request["user_attrs"], request.get("system_attrs", {}))
        if trial is None:
            return {"trial_id": None}
        return {"trial_id": trial._trial_id, "trial": encode_trial(trial)}

    return _json_handler(CLAIM_METHOD, claim)


def slot_counts_handler(database: ReconnectingRDBStorage) -> grpc.GenericRpcHandler:
    """The call ``GrpcStorageProxy.slot_counts`` makes: a study's trials counted by state in one
    query, where Optuna's protocol would send every trial of the study."""

    def count(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        counts, first = database.slot_counts(request["study_id"])
        return {
            "counts": {state.name: n for state, n in counts.items()},
            "first": first and first.astimezone(timezone.utc).isoformat(),  # naive local time
        }

    return _json_handler(SLOT_COUNTS_METHOD, count)


def _json_handler(
    full_method: str, behaviour: Callable[[dict[str, Any], grpc.ServicerContext], dict[str, Any]]
) -> grpc.GenericRpcHandler:
    service, method = full_method.strip("/").split("/")
    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=decode_json, response_serializer=encode_json
    )
    return grpc.method_handlers_generic_handler(service, {method: handler})


class StorageFailures(grpc.ServerInterceptor):  # type: ignore[misc]
    """A call, Optuna's or tuner's, whose storage failed (lost past the proxy's own
    ``TUNER_DB_RETRY_S``, or refusing) is answered UNAVAILABLE with details that begin with
    ``STORAGE_FAILED``, which the worker raises as a ``StorageError``. gRPC answered UNKNOWN,
    which the worker took for its workload's error, and it failed the trial for good. The
    storage's own errors show its URL masked; SQLAlchemy's first line shows none."""

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:  # the proxy's calls are all unary
            return handler
        behaviour = handler.unary_unary

        def answer(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            except (StorageError, SQLAlchemyError, StorageInternalError) as error:
                reason = first_line(str(error))
                _logger.error("%s failed: %s", handler_call_details.method, reason)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{STORAGE_FAILED}{reason}")

        return grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def make_server(storage: BaseStorage, host: str, port: int) -> grpc.Server:
    """Optuna's proxy server (its ``make_server``) without the SO_REUSEPORT that gRPC sets by
    default: with it a second proxy on a port already served starts without a word, and the
    kernel splits the workers' calls between the two, and so between their databases."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=THREADS), interceptors=[StorageFailures()], options=[("grpc.so_reuseport", 0)]
    )
    api_pb2_grpc.add_StorageServiceServicer_to_server(grpc_servicer.OptunaStorageProxyService(storage), server)
    server.add_insecure_port(f"{host}:{port}")
    return server


def serve(storage: str | None = None, *, host: str = "127.0.0.1", port: int = 13000) -> None:
    """Serve the storage over gRPC until interrupted."""
    url = storage_url(storage)
    if url.startswith(("grpc://", "redis://")) or journal_file(url) is not None:
        raise BadInputError(
            f"The gRPC proxy serves database storages only, not {mask_url(url)!r}; "
            "use sqlite:///..., postgresql://... or mysql://..."
        )
    # The cached wrapper keeps finished trials in memory, as Optuna advises for the proxy. A
    # SQLite file is not made, as by every command but `tuner create` and `tuner run`: where its
    # name was mistyped the proxy served an empty database.
    database = make_storage(url, create=False)
    cached = SlotMakingStorage(database)  # type: ignore[arg-type]
    # SIGTERM (docker stop, Kubernetes, Slurm) ends it as Ctrl-C does; and Ctrl-C works even
    # where the proxy was started in the background by a shell, which makes children ignore it.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    try:
        # Optuna's server, as ``run_grpc_proxy_server`` makes it, with tuner's calls beside.
        server = make_server(cached, host, port)
    except RuntimeError as error:  # grpc's "Failed to bind"
        raise BadInputError(f"Cannot listen on {host}:{port}: {error}.") from None
    server.add_generic_rpc_handlers((write_handler(cached), claim_handler(cached), slot_counts_handler(database)))  # type: ignore[arg-type]
    server.start()
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=STOP_GRACE_S).wait()
