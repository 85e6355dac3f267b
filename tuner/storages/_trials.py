"""What a worker does to a trial on any storage: claim it, write its records, hold writes together."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.trial import TrialState

from tuner.storages._grpc import GrpcStorageProxy
from tuner.storages._journal import JournalFileSlots, JournalStorage
from tuner.storages._lease import write_claim_lease
from tuner.storages._rdb import ReconnectingRDBStorage
from tuner.storages._slots import claim_order


def one_write(storage: object) -> contextlib.AbstractContextManager[None]:
    """A block whose writes reach the storage together: one append on tuner's journal
    (``JournalStorage.one_append``), one transaction on a database
    (``ReconnectingRDBStorage.one_transaction``), one round trip through the gRPC proxy
    (``GrpcStorageProxy.one_transaction``); elsewhere each write goes on its own."""
    if isinstance(storage, JournalStorage):
        return storage.one_append()
    if isinstance(storage, GrpcStorageProxy):
        return storage.one_transaction()
    backend = rdb_backend(storage)
    return backend.one_transaction() if backend is not None else contextlib.nullcontext()


def slot_counts(storage: object, study_id: int) -> tuple[dict[TrialState, int], datetime | None] | None:
    """Trials by state, less the failed trials a retry replaced, and the first start, where a
    database counts them (directly or behind ``tuner proxy``); None elsewhere."""
    backend = rdb_backend(storage)
    if backend is not None:
        return backend.slot_counts(study_id)
    if isinstance(storage, GrpcStorageProxy):
        return storage.slot_counts(study_id)
    return None


def claim_by_racing(storage: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]) -> int | None:
    """Claim as Optuna's storage interface allows, where nothing claims in one step: read the
    waiting trials and race the other workers for each (retries first), then write ``attrs`` and
    the first lease on the trial won; read them again when every one was lost. None when none waits."""
    while True:
        waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return None
        for frozen in sorted(waiting, key=claim_order):
            try:
                won, leased = _race(storage, frozen._trial_id)
            except UpdateFinishedTrialError:
                continue
            if won:
                with one_write(storage):
                    _write_user_attrs(storage, frozen._trial_id, attrs)
                    if not leased:
                        write_claim_lease(storage, frozen._trial_id)
                return frozen._trial_id


def _race(storage: optuna.storages.BaseStorage, trial_id: int) -> tuple[bool, bool]:
    """Whether this worker won the trial, and whether its first lease went with the claim.

    On tuner's journal (Redis) the lease goes in the claim's append: written after it, a worker
    killed in between left a running trial that no lease tells, which every other worker then
    waited for. A lost race leaves the lease on the winner's trial, whose worker renews it."""
    lease = storage.claim_lease() if isinstance(storage, JournalStorage) else {}
    if not lease:
        return storage.set_trial_state_values(trial_id, state=TrialState.RUNNING), False
    with storage.one_append():
        # What the claim returns within the append means nothing: the win is read after it.
        storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        for key, value in lease.items():
            storage.set_trial_system_attr(trial_id, key, value)
    won = storage.owns(trial_id)
    if won:
        storage.lease_claimed(trial_id)
    return won, True


def slot_maker(storage: object) -> ReconnectingRDBStorage | JournalFileSlots | None:
    """What adds a study's budget slots a few at a time and claims them, on the storages that
    can count, add and claim them under one lock (a database, a journal file); None where every
    slot is made at once and workers race for each."""
    backend = rdb_backend(storage)
    if backend is not None:
        return backend
    if isinstance(storage, optuna.storages.JournalStorage) and isinstance(
        storage._backend, optuna.storages.journal.JournalFileBackend
    ):
        return JournalFileSlots(storage)
    return None


def claim_next_waiting_trial(storage: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]) -> int | None:
    """Set the study's next WAITING trial (retries first) RUNNING with user attributes ``attrs``;
    return its id, or None when none waits. One transaction on a database, one append under a
    lock on a journal file, one round trip through ``tuner proxy``; elsewhere a race.

    The caller runs the trial: on a database it is read from the claimer's own copy until told.
    """
    claimer = storage if isinstance(storage, GrpcStorageProxy) else slot_maker(storage)
    if claimer is None:
        return claim_by_racing(storage, study_id, attrs)
    if isinstance(claimer, ReconnectingRDBStorage):
        return claimer.claim_next_waiting_trial(study_id, attrs, keep=True)
    return claimer.claim_next_waiting_trial(study_id, attrs)


def _epoch_recorder(storage: object) -> ReconnectingRDBStorage | GrpcStorageProxy | None:
    """What writes a trial's user attributes and intermediate value at once: a database in one
    transaction, the gRPC proxy in one round trip."""
    return storage if isinstance(storage, GrpcStorageProxy) else rdb_backend(storage)


def rdb_backend(storage: object) -> ReconnectingRDBStorage | None:
    """The database storage behind ``storage``, where it is one, for the queries Optuna's
    storage interface has no call for."""
    backend = getattr(storage, "_backend", storage)  # behind Optuna's cache of finished trials
    return backend if isinstance(backend, ReconnectingRDBStorage) else None


def record_epochs(trial: optuna.Trial | optuna.trial.FixedTrial, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
    """``set_user_attrs`` and the intermediate values of steps not written before, in one
    transaction where the storage is a database, one round trip through ``tuner proxy`` and one
    append where it is a journal. A step's value may already be in the trial's cache
    (``show_value``)."""
    storage = getattr(trial, "storage", None)  # a FixedTrial (``tuner train``) has none
    if storage is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    changed = _changed(trial, attrs)
    if not changed and not values:
        return
    backend = _epoch_recorder(storage)
    if backend is None:
        with one_write(storage):
            _write_user_attrs(storage, trial._trial_id, changed)
            for step, value in values.items():
                storage.set_trial_intermediate_value(trial._trial_id, step, value)
    else:
        backend.record_epochs(trial._trial_id, values, changed)
    _hold(trial, changed)
    trial._cached_frozen_trial.intermediate_values.update(values)


def forget_values(trial: optuna.Trial | optuna.trial.FixedTrial) -> None:
    """Drop the values a trial holds for its steps: a retry's, inherited from its original, are
    not its own when it trains again from the first epoch, and kept they would hide its own from
    the pruner (``show_value``) and from the storage, where ``record_epochs`` writes over them."""
    cached = getattr(trial, "_cached_frozen_trial", None)
    if cached is not None:
        cached.intermediate_values.clear()


def show_value(trial: optuna.Trial | optuna.trial.FixedTrial, step: int, value: float) -> bool:
    """Let the pruner see a step's value before it is written; False where the trial has one
    for that step already (Optuna keeps the first value reported)."""
    cached = getattr(trial, "_cached_frozen_trial", None)  # a FixedTrial has no pruner
    if cached is None:
        return False
    if step in cached.intermediate_values:
        return False
    cached.intermediate_values[step] = value
    return True


def cache_claimed_trial(storage: optuna.storages.BaseStorage, study_id: int, trial: optuna.trial.FrozenTrial) -> None:
    """Make Optuna's cache of a study's trials know a trial claimed past it, as it knows the
    trials it creates itself: it takes parameters only for trials it knows."""
    if not isinstance(storage, _CachedStorage):
        return
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [copy.deepcopy(trial)])
        # Read again with the study's other unfinished trials until it finishes.
        storage._studies[study_id].unfinished_trial_ids.add(trial._trial_id)


def set_user_attrs(trial: optuna.Trial | optuna.trial.FixedTrial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for each attribute whose value the trial does not hold already,
    in one transaction where the storage is a database, one round trip through ``tuner proxy``
    and one append where it is a journal. A value written again is a write for nothing: through
    Optuna's own gRPC proxy, a round trip each."""
    record_epochs(trial, {}, attrs)


def _write_user_attrs(storage: optuna.storages.BaseStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    backend = _epoch_recorder(storage)
    if backend is not None:
        backend.set_trial_user_attrs(trial_id, attrs)
        return
    with one_write(storage):
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)


def _changed(trial: optuna.Trial, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes whose value differs from what the trial holds (stored, as far as this
    process knows)."""
    held = trial._cached_frozen_trial.user_attrs
    return {key: value for key, value in attrs.items() if key not in held or held[key] != value}


def _hold(trial: optuna.Trial, written: Mapping[str, Any]) -> None:
    """Remember what was written as it was then: a list that grows after being written (the
    history) must not look written already."""
    trial._cached_frozen_trial.user_attrs.update(copy.deepcopy(dict(written)))
