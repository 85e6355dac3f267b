"""A study's trials read from the database as rows, not ORM objects."""

from __future__ import annotations

import json
from collections.abc import Container, Iterator
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState

_IDS_PER_QUERY = 500  # as SQLAlchemy's selectinload, which Optuna's read uses


def read_trials(
    session: sqlalchemy.orm.Session,
    study_id: int,
    states: Container[TrialState] | None,
    chosen: sqlalchemy.ColumnElement[bool] | None,
) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in ``states`` that ``chosen`` selects, built as Optuna's
    ``_build_frozen_trial_from_trial_model`` builds them. The trials' rows are read first: a
    trial read finished has its values, params and records in the rows read after it."""
    trial = models.TrialModel.__table__
    where = [trial.c.study_id == study_id]
    if states is not None:
        where.append(trial.c.state.in_(list(states)))  # type: ignore[call-overload]
    if chosen is not None:
        where.append(chosen)
    rows = session.execute(
        sqlalchemy.select(trial.c.trial_id, trial.c.number, trial.c.state, trial.c.datetime_start, trial.c.datetime_complete)
        .where(*where)
        .order_by(trial.c.trial_id)
    ).all()
    fields: dict[int, dict[str, Any]] = {
        row.trial_id: {
            "number": row.number, "state": row.state, "value": None, "values": None,
            "datetime_start": _local_time(row.datetime_start), "datetime_complete": _local_time(row.datetime_complete),
            "params": {}, "distributions": {}, "user_attrs": {}, "system_attrs": {}, "intermediate_values": {},
            "trial_id": row.trial_id,
        }
        for row in rows
    }
    ids = list(fields)

    def children(model: type, *columns: str, order: str | None = None) -> Iterator[Any]:
        """The rows of the trials read, by their ids, a chunk at a time as the ORM's
        ``selectinload`` asks: a subquery instead made PostgreSQL scan the whole table."""
        table = model.__table__  # type: ignore[attr-defined]
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start:start + _IDS_PER_QUERY]
            query = sqlalchemy.select(table.c.trial_id, *(table.c[column] for column in columns)).where(table.c.trial_id.in_(chunk))
            for row in session.execute(query.order_by(table.c[order]) if order else query):
                yield fields[row.trial_id], row

    for found, row in children(models.TrialParamModel, "param_name", "param_value", "distribution_json", order="param_id"):
        distribution = optuna.distributions.json_to_distribution(row.distribution_json)
        found["params"][row.param_name] = distribution.to_external_repr(row.param_value)
        found["distributions"][row.param_name] = distribution
    objectives: dict[int, dict[int, float]] = {}
    for found, row in children(models.TrialValueModel, "objective", "value", "value_type"):
        value = models.TrialValueModel.stored_repr_to_value(row.value, row.value_type)
        objectives.setdefault(found["trial_id"], {})[row.objective] = value
    for trial_id, values in objectives.items():
        fields[trial_id]["values"] = [values.get(objective, 0) for objective in range(len(values))]
    for found, row in children(models.TrialUserAttributeModel, "key", "value_json"):
        found["user_attrs"][row.key] = json.loads(row.value_json)
    for found, row in children(models.TrialSystemAttributeModel, "key", "value_json"):
        found["system_attrs"][row.key] = json.loads(row.value_json)
    for found, row in children(models.TrialIntermediateValueModel, "step", "intermediate_value", "intermediate_value_type"):
        found["intermediate_values"][row.step] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
            row.intermediate_value, row.intermediate_value_type
        )
    return [optuna.trial.FrozenTrial(**found) for found in fields.values()]


def _local_time(stored: datetime | None) -> datetime | None:
    """A stored (naive UTC) time as Optuna's trial model gives it back: naive local time."""
    return None if stored is None else stored.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
