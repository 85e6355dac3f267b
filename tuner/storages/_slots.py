"""Budget slots: which trials hold one, which waiting trial is claimed first, when to top up."""

from __future__ import annotations

import copy

import optuna

from tuner.storages._lease import LEASE

RETRY_HISTORY = "retry_history"  # the system attribute Optuna's retry callback writes on a retry
# On a retry: how many of the trials before it in its retry history were handed back by a stopped
# worker (SIGTERM, Ctrl-C) rather than failed by a dead one.
HAND_BACKS = "tuner:hand_backs"


class RetryStaleTrial:
    """Optuna's retry of a heartbeat-stale trial (its intermediate values inherited), at most
    ``max_retry`` times after a dead worker: the hand-backs in its retry history are no failures,
    and a trial that SIGTERMs of preemptible machines moved twice still has its retries."""

    def __init__(self, max_retry: int | None) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        hand_backs = trial.system_attrs.get(HAND_BACKS, 0)
        queue_retry(study, trial, None if self.max_retry is None else self.max_retry + hand_backs)


def queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry: int | None) -> None:
    """Optuna's retry of ``trial``, its intermediate values inherited, unless it was retried
    ``max_retry`` times. Without the lease, which Optuna would copy with the other system
    attributes: a worker racing for the copy claims it before it writes a lease of its own, and
    the old one would make the copy pass for stale in between."""
    trial = copy.copy(trial)
    trial.system_attrs = {key: value for key, value in trial.system_attrs.items() if key != LEASE}
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)(study, trial)


def enough_waiting(waiting: int, ahead: int) -> bool:
    """Whether the slots that wait spare a top-up: at least half of ``ahead`` (and one)."""
    return waiting >= max(1, ahead // 2)


def slot_holders(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that hold a budget slot: every trial except failed ones that were retried."""
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}
    return [t for t in trials if t.number not in retried]


def claim_order(trial: optuna.trial.FrozenTrial) -> tuple[bool, int]:
    """Which waiting trial a worker takes first: retries, then by number."""
    return RETRY_HISTORY not in trial.system_attrs, trial.number
