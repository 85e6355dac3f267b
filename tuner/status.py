"""Where a study stands: trials by state, budget, best value, epochs saved by pruning, pace and
live workers. Computed here, printed by the command line."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from tuner.report import digits, format_value
from tuner.spec import StudySpec
from tuner.storages import LeaseHeartbeat, lease_ages, slot_holders
from tuner.study import FINISHED, BudgetState, budget_state

# A finished trial trained ``epochs_completed`` of its ``epochs``; a pruned one stopped early.
TRAINED = (TrialState.COMPLETE, TrialState.PRUNED)
# Stop reasons of trials that end PRUNED though no pruner stopped them.
STOPPED_UNPRUNED = ("diverged", "out_of_memory")
STATE_LABELS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass(frozen=True)
class LiveTrial:
    """A RUNNING trial as its worker last recorded it."""

    number: int
    worker: str | None
    device: str | None
    epochs_completed: int
    epochs: int | None
    heartbeat_age_s: float | None
    # Past the grace period: its worker has stopped beating, and the next worker to look fails
    # and retries the trial.
    stale: bool = False


@dataclass(frozen=True)
class StudyStatus:
    study: str
    states: dict[str, int]
    budget: BudgetState
    best_value: float | None
    pareto_size: int | None
    epochs_trained: int
    epochs_unpruned: int
    trials_per_hour: float | None
    eta_s: float | None
    live: list[LiveTrial]
    resumable: list[tuple[int, int]]

    @property
    def pruning_savings_pct(self) -> float | None:
        """Share of the epochs that the same trials would have trained without pruning."""
        if not self.epochs_unpruned:
            return None
        return 100.0 * (1.0 - self.epochs_trained / self.epochs_unpruned)


def _grace_s(study: optuna.Study) -> float | None:
    """Seconds without a heartbeat after which a trial is stale, as the storage decides."""
    if isinstance(study._storage, LeaseHeartbeat):
        return study._storage.grace_period
    backend = getattr(study._storage, "_backend", study._storage)
    if not isinstance(backend, optuna.storages.RDBStorage) or backend.heartbeat_interval is None:
        return None
    return backend.grace_period or 2 * backend.heartbeat_interval


def _heartbeat_ages(study: optuna.Study, running: list[FrozenTrial]) -> dict[int, float]:
    """Seconds since each running trial's last heartbeat, by trial id, as the database's clock
    sees it (a lease's, as this machine's); empty for storages without heartbeats."""
    if isinstance(study._storage, LeaseHeartbeat):
        return lease_ages(running)
    backend = getattr(study._storage, "_backend", study._storage)
    if not isinstance(backend, optuna.storages.RDBStorage) or backend.engine.name not in ("sqlite", "postgresql"):
        return {}
    from optuna.storages._rdb import models
    from sqlalchemy import func, select

    query = (
        select(models.TrialHeartbeatModel.trial_id, func.now() - models.TrialHeartbeatModel.heartbeat)
        .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
        .where(models.TrialModel.study_id == study._study_id)
    )
    if backend.engine.name == "sqlite":  # SQLite's now() is text: subtract Julian days instead
        query = query.with_only_columns(
            models.TrialHeartbeatModel.trial_id,
            (func.julianday(func.current_timestamp()) - func.julianday(models.TrialHeartbeatModel.heartbeat)) * 86400.0,
        )
    with backend.engine.connect() as connection:
        rows = connection.execute(query).all()
    return {trial_id: age if isinstance(age, float) else age.total_seconds() for trial_id, age in rows}


def _epochs_completed(trial: FrozenTrial) -> int:
    # A running trial's count is written with its history, every few seconds; the objective's
    # step, every epoch.
    return max(int(trial.user_attrs.get("epochs_completed", 0)), max(trial.intermediate_values, default=0))


def _epochs_unpruned(trial: FrozenTrial) -> int:
    """The epochs the trial would have trained without a pruner: a diverged or out-of-memory
    trial, PRUNED as well, could not have gone on, and no pruner saved its epochs."""
    if trial.user_attrs.get("stop_reason") in STOPPED_UNPRUNED:
        return _epochs_completed(trial)
    return int(trial.params.get("epochs", _epochs_completed(trial)))


def _trials_per_hour(finished: list[FrozenTrial], last: int) -> float | None:
    """Trials finished per hour over the ``last`` finished ones, in the time that one of them or
    more was training: parallel workers count together, and a pause between runs of the study
    (Ctrl-C at night, the same command in the morning) does not pass for a slow pace."""
    recent = sorted(finished, key=lambda t: t.datetime_complete)[-last:]
    busy_s, busy_until = 0.0, datetime.datetime.min
    for start, end in sorted((t.datetime_start, t.datetime_complete) for t in recent if t.datetime_start is not None):
        # Only the part of a trial past the end of those that started before it adds time.
        busy_s += max((end - max(start, busy_until)).total_seconds(), 0.0)
        busy_until = max(busy_until, end)
    return len(recent) * 3600.0 / busy_s if busy_s > 0 else None


def _eta_s(budget: BudgetState, per_hour: float | None) -> float | None:
    if budget.exhausted:
        return 0.0
    estimates = []
    if budget.n_trials is not None and per_hour:
        estimates.append((budget.n_trials - budget.finished) * 3600.0 / per_hour)
    if budget.timeout_s is not None:
        estimates.append(budget.timeout_s - budget.elapsed_s)
    return min(estimates, default=None)


def study_status(study: optuna.Study, spec: StudySpec, *, last: int = 10) -> StudyStatus:
    trials = slot_holders(study.get_trials(deepcopy=False))
    states = {state.name: sum(1 for t in trials if t.state == state) for state in TrialState}
    trained = [t for t in trials if t.state in TRAINED]
    budget = budget_state(study, spec)
    per_hour = _trials_per_hour([t for t in trials if t.state in FINISHED and t.datetime_complete], last)
    single = len(study.directions) == 1
    running = [t for t in trials if t.state == TrialState.RUNNING]
    heartbeats = _heartbeat_ages(study, running) if running else {}
    grace_s = _grace_s(study)
    has_complete = states["COMPLETE"] > 0
    live = [
        LiveTrial(
            t.number, t.user_attrs.get("worker"), t.user_attrs.get("device"), _epochs_completed(t),
            t.params.get("epochs"), heartbeats.get(t._trial_id),
            stale=grace_s is not None and heartbeats.get(t._trial_id, 0.0) > grace_s,
        )
        for t in running
    ]
    # The recent pace tells when the budget is met only while someone trains: with no worker
    # running, only a time budget's clock goes on.
    training = any(not t.stale for t in live)
    return StudyStatus(
        study=study.study_name,
        states=states,
        budget=budget,
        best_value=study.best_value if single and has_complete else None,
        pareto_size=None if single else len(study.best_trials),
        epochs_trained=sum(_epochs_completed(t) for t in trained),
        epochs_unpruned=sum(_epochs_unpruned(t) for t in trained),
        trials_per_hour=per_hour,
        eta_s=_eta_s(budget, per_hour if training else None),
        live=live,
        resumable=[
            (t.number, t.system_attrs["retry_history"][-1])
            for t in trials
            if t.state == TrialState.WAITING and "retry_history" in t.system_attrs
        ],
    )


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def _cells(status: StudyStatus) -> dict[str, str]:
    budget = status.budget
    used = f"{budget.finished} used, {budget.n_trials - budget.finished} left" if budget.n_trials else f"{budget.finished} used"
    if budget.timeout_s is not None:
        used += f"; {_duration(budget.elapsed_s)} used, {_duration(budget.timeout_s - budget.elapsed_s)} left"
    savings = status.pruning_savings_pct
    pace = status.trials_per_hour
    return {
        **{label: str(status.states[state]) for state, label in STATE_LABELS.items()},
        "budget": used,
        "best": (format_value(status.best_value) or "-") if status.pareto_size is None else f"{status.pareto_size} on the Pareto front",
        "epochs trained": f"{status.epochs_trained} of {status.epochs_unpruned} without pruning",
        "saved by pruning": "-" if savings is None else f"{savings:.0f}%",
        # Two digits: trials of a day each are 0.042 an hour, which one decimal showed as 0.0.
        "trials per hour": "-" if pace is None else digits(pace, 2),
        "ETA": "budget met" if budget.exhausted else _duration(status.eta_s),
        "live workers": "\n".join(
            f"trial {t.number} on {t.worker or '?'}" + (f" ({t.device})" if t.device else "")
            + f": epoch {t.epochs_completed}/{t.epochs or '?'}"
            + ("" if t.heartbeat_age_s is None else f", heartbeat {t.heartbeat_age_s:.0f} s ago")
            + (": its worker is gone; the next worker retries it" if t.stale else "")
            for t in status.live
        ) or "-",
        "waiting to resume": "\n".join(f"trial {new} (retry of {old})" for new, old in status.resumable) or "-",
    }


def status_table(statuses: list[StudyStatus]) -> Table:
    """One column per study, one row per figure: fits a terminal however many figures."""
    table = Table(title="tuner status")
    table.add_column("")
    for status in statuses:
        table.add_column(status.study, overflow="fold")
    cells = [_cells(status) for status in statuses]
    for name in cells[0] if cells else ():
        table.add_row(name, *(column[name] for column in cells))
    return table
