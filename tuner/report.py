"""Reading a study back: the best trial (or Pareto front) and every trial with its records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner.study import load_study

# Records shown in tables; everything is still in ``user_attrs``.
TABLE_RECORDS = ("effective_batch_size", "micro_batch_size", "lr_used", "epochs_completed", "train_time_s", "stop_reason")


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front of a study with several objectives, best first by
    the quality objective: Optuna lists the front by trial number, and a view that shows only
    its first rows (the study note) would leave out the newest, often the best."""
    if len(study.directions) > 1:
        objective = quality_objective(study)
        maximize = study.directions[objective] == StudyDirection.MAXIMIZE
        return sorted(study.best_trials, key=lambda trial: trial.values[objective], reverse=maximize)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [study.best_trial] if completed else []


def best_trial(study_name: str, storage: str | None = None) -> FrozenTrial | list[FrozenTrial] | None:
    """The best trial of a study; for several objectives, the trials of its Pareto front."""
    study, _ = load_study(study_name, storage)
    trials = best_trials(study)
    if len(study.directions) > 1:
        return trials
    return trials[0] if trials else None


def quality_objective(study: optuna.Study) -> int:
    """The index of the objective that measures quality: the first that is not the time."""
    return quality_index(study.metric_names or [])


def quality_index(metrics: Sequence[str]) -> int:
    """``quality_objective`` of objectives named ``metrics``, where there is no study yet."""
    return next((i for i, name in enumerate(metrics) if name != "train_time_s"), 0)


def fastest_within(study: optuna.Study, tolerance: float) -> tuple[FrozenTrial, FrozenTrial] | None:
    """The best complete trial by the quality objective, and the fastest (least recorded
    ``train_time_s``) whose value is within ``tolerance`` (a fraction of the best's magnitude)
    of it; None before any complete trial with a recorded time."""
    objective = quality_objective(study)
    timed = [
        trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "train_time_s" in trial.user_attrs
    ]
    if not timed:
        return None
    pick = max if study.directions[objective] == StudyDirection.MAXIMIZE else min
    best = pick(timed, key=lambda trial: trial.values[objective])
    margin = tolerance * abs(best.values[objective])
    close = [trial for trial in timed if abs(trial.values[objective] - best.values[objective]) <= margin]
    return best, min(close, key=lambda trial: trial.user_attrs["train_time_s"])


def used_params(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters as trained: ``lr`` is the rate used, after any batch scaling."""
    params = dict(trial.params)
    if "lr_used" in trial.user_attrs:
        params["lr"] = trial.user_attrs["lr_used"]
    return params


def trial_record(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The JSON object of ``tuner best``: study, trial, values, params, user_attrs, duration_s."""
    record: dict[str, Any] = {
        "study": study.study_name,
        "trial": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": used_params(trial),
        "user_attrs": trial.user_attrs,
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
    }
    if len(study.directions) == 1:
        record["value"] = trial.value
    return record


def listed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial but the unclaimed budget slots."""
    return [trial for trial in study.get_trials(deepcopy=False) if trial.state != TrialState.WAITING]


def value_columns(study: optuna.Study) -> list[str]:
    """The columns of the objectives' values: the metrics' names, or Optuna's value_0, ..."""
    return study.metric_names or [f"value_{i}" for i in range(len(study.directions))]


def trial_rows(study: optuna.Study, every_record: bool = False) -> list[dict[str, Any]]:
    """One flat row per listed trial: the table's few records, or for CSV every record that is
    a single value (the per-epoch ones, such as ``history``, are in the JSON). A record named
    like one of the row's own columns (an objective ``train_time_s``, Optuna's ``duration_s``)
    leaves the column its value: the table shows the column, the CSV the record as well, under
    ``user_attrs.NAME``, its path in the JSON."""
    rows = []
    for trial in listed_trials(study):
        row: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
        names = value_columns(study)
        for name, value in zip(names, trial.values or [None] * len(names)):
            row[name] = value
        row.update(used_params(trial))
        error = trial.user_attrs.get("error")
        own_columns = {
            "error": error.splitlines()[0] if error else None,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
        }
        taken = set(row) | set(own_columns)
        if every_record:
            for key, value in sorted(trial.user_attrs.items()):
                if key != "error" and not isinstance(value, (list, dict)):
                    row[f"user_attrs.{key}" if key in taken else key] = value
        else:
            row.update({key: trial.user_attrs.get(key) for key in TABLE_RECORDS if key not in taken})
        row.update(own_columns)
        rows.append(row)
    return rows


def digits(value: float, significant: int) -> str:
    """``value`` to ``significant`` digits, whole numbers past them: a trial of hours trains
    for 15000 s, not 1.5e+04 s."""
    shown = f"{value:.{significant}g}"
    # Judged once rounded: 9999.7 to 4 digits rounds up to 1e+04.
    return shown if abs(float(shown)) < 10**significant else f"{value:.0f}"


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return digits(value, 4) if math.isfinite(value) else str(value)
    return str(value)
