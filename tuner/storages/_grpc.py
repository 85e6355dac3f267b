"""Optuna's gRPC client, with the one-round-trip calls of ``tuner proxy`` where it serves."""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._grpc import servicer as grpc_servicer
from optuna.storages._grpc.auto_generated import api_pb2, api_pb2_grpc
from optuna.storages._grpc.client import GrpcClientCache
from optuna.trial import TrialState

from tuner.errors import StorageError
from tuner.storages._held import HeldWrites
from tuner.storages._lease import LeaseHeartbeat
from tuner.storages._reconnect import Backoff

WRITE_METHOD = "/tuner.Proxy/WriteTrial"
CLAIM_METHOD = "/tuner.Proxy/ClaimNextWaitingTrial"
SLOT_COUNTS_METHOD = "/tuner.Proxy/SlotCounts"
# How ``tuner proxy`` begins the details of an UNAVAILABLE answer where its own storage failed
# (past its own TUNER_DB_RETRY_S): the proxy answered, so its worker does not wait for it again.
STORAGE_FAILED = "storage failed: "


def encode_json(message: Any) -> bytes:
    return json.dumps(message).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def encode_trial(trial: optuna.trial.FrozenTrial) -> str:
    """A trial as Optuna's gRPC proxy sends it, in a JSON message."""
    return base64.b64encode(grpc_servicer._to_proto_trial(trial).SerializeToString()).decode()


def decode_trial(text: str) -> optuna.trial.FrozenTrial:
    return grpc_servicer._from_proto_trial(api_pb2.Trial.FromString(base64.b64decode(text)))


class _WaitForProxy(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Calls retried with back-off while the proxy does not answer (restarted, rescheduled, its
    link down), for up to ``TUNER_DB_RETRY_S`` seconds as a lost database is, then a
    ``StorageError`` that says so. Without it the first call after the proxy went away failed
    the worker's trial, which then waited out the heartbeat grace to be retried, and the worker
    exited with gRPC's raw error. A proxy that lost its own storage says so (``STORAGE_FAILED``):
    that too is a ``StorageError``, for every call, Optuna's and tuner's, where it was an
    error of the workload's and failed the trial."""

    def __init__(self, address: str) -> None:
        self.address = address

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        backoff = Backoff()
        while True:
            outcome = continuation(client_call_details, request)
            if outcome.code() != grpc.StatusCode.UNAVAILABLE:
                return outcome
            reason = outcome.details() or ""
            if reason.startswith(STORAGE_FAILED):
                failure = reason.removeprefix(STORAGE_FAILED)
                raise StorageError(f"The gRPC proxy at {self.address!r} cannot use its storage: {failure}")
            if backoff.expired():
                raise StorageError(f"Lost the gRPC proxy at {self.address!r} and it did not come back: {reason}")
            backoff.pause("gRPC proxy", reason)


class GrpcStorageProxy(HeldWrites, LeaseHeartbeat, optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC client, which claims a trial and writes to a trial in one round trip each
    where ``tuner proxy`` serves: Optuna's protocol has no claim, and a call for each parameter
    and attribute.

    As on a database (``ReconnectingRDBStorage``), a trial this process claimed is kept here
    until told, writes within ``one_transaction`` are held and sent together as the block ends,
    and a kept trial's end goes with them: a trial takes three round trips (its claim, its
    parameters, its end) instead of nine. Behind Optuna's own proxy, which has none of tuner's
    calls, each write goes as Optuna's protocol allows. Heartbeats are leases (``LeaseHeartbeat``):
    the database's own do not pass through the proxy.
    """

    def _setup(self) -> None:
        super()._setup()
        self._channel = grpc.intercept_channel(self._channel, _WaitForProxy(f"grpc://{self._host}:{self._port}"))
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)
        json_call = functools.partial(
            self._channel.unary_unary, request_serializer=encode_json, response_deserializer=decode_json
        )
        self._write_trial = json_call(WRITE_METHOD)
        self._claim_next_waiting_trial = json_call(CLAIM_METHOD)
        self._slot_counts = json_call(SLOT_COUNTS_METHOD)
        self._served_by_tuner = True  # until the server says it has no such call
        self._held = threading.local()
        self._running_here: dict[int, optuna.trial.FrozenTrial] = {}

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for name in ("_write_trial", "_claim_next_waiting_trial", "_slot_counts", "_held", "_running_here"):
            del state[name]
        return state

    def _call_tuner(self, call: grpc.UnaryUnaryMultiCallable, request: dict[str, Any]) -> dict[str, Any] | None:
        """The answer of one of ``tuner proxy``'s calls; None where the server has no such call
        (Optuna's own proxy). Errors are raised as Optuna's client raises them."""
        if not self._served_by_tuner:
            return None
        try:
            return call(request)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(error.details()) from None
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UpdateFinishedTrialError(error.details()) from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(error.details()) from None
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._served_by_tuner = False
            return None

    def _write(self, write: list[Any]) -> None:
        held = self._holding()
        if held is None:
            self._write_together([write], None)
        else:
            held.append(write)

    def _write_together(self, writes: list[list[Any]], end: dict[str, Any] | None) -> None:
        """One round trip, ``end`` (a kept trial's end) after the writes; behind Optuna's own
        proxy, a call each."""
        if self._call_tuner(self._write_trial, {"writes": writes, "end": end}) is not None:
            return
        for kind, trial_id, *args in writes:
            if kind == "param":
                name, value, distribution = args
                super().set_trial_param(trial_id, name, value, optuna.distributions.json_to_distribution(distribution))
            elif kind == "records":
                values, attrs = args
                # Optuna's calls, past the ones ``HeldWrites`` routes back here.
                for key, attr in attrs.items():
                    optuna.storages.GrpcStorageProxy.set_trial_user_attr(self, trial_id, key, attr)
                for step, value in values:
                    optuna.storages.GrpcStorageProxy.set_trial_intermediate_value(self, trial_id, step, value)
            else:
                key, value = args
                super().set_trial_system_attr(trial_id, key, value)
        if end is not None:
            super().set_trial_state_values(end["trial_id"], TrialState[end["state"]], end["values"])

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
    ) -> None:
        distribution_json = optuna.distributions.distribution_to_json(distribution)
        self._write(["param", trial_id, param_name, param_value_internal, distribution_json])
        self._keep_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(["system_attr", trial_id, key, value])
        self._keep_system_attr(trial_id, key, value)

    def record_epochs(self, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
        """As ``ReconnectingRDBStorage.record_epochs``, in one round trip."""
        # JSON keys are strings: the values go as [step, value] pairs.
        self._write(["records", trial_id, list(values.items()), dict(attrs)])
        self._keep_records(trial_id, values, attrs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """A kept trial's end goes with the held writes, in one round trip and one transaction."""
        try:
            if trial_id in self._running_here and state.is_finished():
                self.write_held(end={"trial_id": trial_id, "state": state.name, "values": values})
                return True
            self.write_held()
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._running_here.pop(trial_id, None)

    def claim_next_waiting_trial(self, study_id: int, attrs: Mapping[str, Any]) -> int | None:
        """As ``ReconnectingRDBStorage.claim_next_waiting_trial``, with the trial's first lease,
        in one round trip, the trial kept here as the proxy read it; the proxy then makes the
        study's next slots, as it does after a claim by Optuna's protocol."""
        lease = self.claim_lease()
        request = {"study_id": study_id, "user_attrs": dict(attrs), "system_attrs": lease}
        answer = self._call_tuner(self._claim_next_waiting_trial, request)
        if answer is None:
            # Imported here: the module that claims on any storage imports this one.
            from tuner.storages._trials import claim_by_racing

            return claim_by_racing(self, study_id, attrs)
        if answer["trial_id"] is not None:
            self._running_here[answer["trial_id"]] = decode_trial(answer["trial"])
            if lease:
                self.lease_claimed(answer["trial_id"])
        return answer["trial_id"]


    def slot_counts(self, study_id: int) -> tuple[dict[TrialState, int], datetime | None] | None:
        """As ``ReconnectingRDBStorage.slot_counts``, counted by the proxy's database in one
        round trip; None behind Optuna's own proxy. A worker's first read of every trial would
        bring the whole study over the wire, and every worker makes one as it runs out."""
        answer = self._call_tuner(self._slot_counts, {"study_id": study_id})
        if answer is None:
            return None
        counts = {state: answer["counts"].get(state.name, 0) for state in TrialState}
        # Sent in UTC: the proxy's clock may keep another time zone than the worker's.
        first = answer["first"] and datetime.fromisoformat(answer["first"]).astimezone().replace(tzinfo=None)
        return counts, first
