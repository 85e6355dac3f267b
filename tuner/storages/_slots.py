"""Budget slots: which trials hold one, which waiting trial is claimed first, when to top up."""

from __future__ import annotations

import optuna

RETRY_HISTORY = "retry_history"  # the system attribute Optuna's retry callback writes on a retry


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
