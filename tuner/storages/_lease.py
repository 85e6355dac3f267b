"""Heartbeats where Optuna has none (the journal file, Redis, the gRPC proxy): a lease on the
trial, a system attribute its worker refreshes and any worker judges by its age."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

_logger = logging.getLogger("tuner.storages")

# The Unix time of the trial's last heartbeat, by its worker's clock: workers on several
# machines need clocks that agree to well within the grace period (NTP does).
LEASE = "tuner:heartbeat"


class LeaseHeartbeat(BaseHeartbeat):
    """Optuna's heartbeat interface on any storage, so that ``fail_stale_trials`` and the worker's
    heartbeat thread work there as on a database.

    Only trials with a lease are judged: a trial run by plain Optuna on the same storage has
    none, and is never failed for it. A worker's claim writes the first lease with the trial
    (``write_claim_lease``), so that a worker killed before its heartbeat thread's first beat is
    noticed.
    """

    heartbeat_interval: int | None = None
    grace_period: int | None = None
    heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None

    def use_heartbeats(
        self, interval: int, grace: int, stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]
    ) -> None:
        self.heartbeat_interval = interval
        self.grace_period = grace
        self.heartbeat_stale_trial_callback = stale_trial_callback

    def claim_lease(self) -> dict[str, float]:
        """The system attribute a claim writes as the trial's first lease; none without heartbeats."""
        return {} if self.heartbeat_interval is None else {LEASE: time.time()}

    def lease_claimed(self, trial_id: int) -> None:
        """Note that the trial's claim wrote its lease just now: it stands for the first beat."""
        self._claim_beats()[trial_id] = time.monotonic()

    def _claim_beats(self) -> dict[int, float]:
        # Set on first use: the storages' own __init__ and __setstate__ stay Optuna's.
        return self.__dict__.setdefault("_leases_claimed", {})

    def record_heartbeat(self, trial_id: int) -> None:
        """The lease renewed; the claim's stands for the first beat, when younger than half an
        interval. A trial ended meanwhile (told, or failed as stale by another worker while
        this one was paused) takes no beat, and its worker learns of it at its next write, as
        it learns of a storage lost."""
        claimed_at = self._claim_beats().pop(trial_id, None)
        if claimed_at is not None and time.monotonic() - claimed_at < (self.heartbeat_interval or 0) / 2:
            return
        try:
            self.set_trial_system_attr(trial_id, LEASE, time.time())  # type: ignore[attr-defined]
        except UpdateFinishedTrialError:
            pass
        except Exception as error:  # a lost storage, a refused call, the journal's file
            # Raised, it would end the heartbeat thread, and the trial would pass for dead while
            # it trains: the next beat tries again, and a storage lost for good stops the worker
            # at its own next write.
            _logger.warning("heartbeat of trial id %d not written: %s", trial_id, error)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self.grace_period is None:
            return []
        states = (TrialState.RUNNING,)
        running = self.get_all_trials(study_id, deepcopy=False, states=states)  # type: ignore[attr-defined]
        now = time.time()
        return [t._trial_id for t in running if now - t.system_attrs.get(LEASE, now) > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def write_claim_lease(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """A claimed trial's first lease, where the storage keeps leases; with the claim, in the same
    append or round trip where the caller holds its writes together."""
    if not isinstance(storage, LeaseHeartbeat) or storage.heartbeat_interval is None:
        return
    storage.set_trial_system_attr(trial_id, LEASE, time.time())  # type: ignore[attr-defined]
    storage.lease_claimed(trial_id)


def lease_ages(trials: list[FrozenTrial]) -> dict[int, float]:
    """Seconds since each trial's last lease renewal, by trial id, for trials that hold one."""
    now = time.time()
    return {t._trial_id: now - t.system_attrs[LEASE] for t in trials if LEASE in t.system_attrs}
