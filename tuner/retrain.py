"""The winner, retrained: ``tuner best --export`` writes a trial's hyperparameters as a spec
fragment, and ``tuner train`` trains the workload once with them and saves the model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field

from tuner.errors import BadInputError, TunerError
from tuner.files import check_folder, write_atomically
from tuner.report import best_trials, quality_objective
from tuner.space import Hyperparameters, suggest
from tuner.spec import Objective, StudySpec, load_model
from tuner.train import memory
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import evaluated_weights, train
from tuner.train.reporter import Reporter
from tuner.workloads import Workload, check_batch_size, check_loop_settings, final_metrics, load_spec_workload


class FixedSpec(BaseModel):
    """The fields of a spec that one training run needs, with the hyperparameters fixed."""

    # As in a study's spec: an infinite rate would train to NaN instead of being refused.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workload: str
    objective: Objective
    precision: Literal["fp32", "bf16"] = "fp32"
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    hyperparameters: Hyperparameters


def _best_trial(study: optuna.Study, spec: StudySpec) -> FrozenTrial:
    """The study's best trial, which only a single objective defines (``objectives:`` may list
    just one)."""
    if len(spec.all_objectives) > 1:
        raise BadInputError(
            f"Study {study.study_name!r} has several objectives, so no single best trial to export; "
            "choose one with --within, e.g. tuner best --within 1% --export FILE."
        )
    best = best_trials(study)
    if not best:
        raise TunerError(f"Study {study.study_name!r} has no completed trial yet.")
    return best[0]


def fixed_spec(study: optuna.Study, spec: StudySpec, trial: FrozenTrial | None = None) -> FixedSpec:
    """A complete trial's hyperparameters (the best where none is given) exactly as it
    trained: the same space rules, the rate as used, and the trial's seed, so a CPU retrain
    repeats its curve."""
    trial = trial or _best_trial(study, spec)
    origin = trial.system_attrs.get("retry_history", [trial.number])[0]
    hp = suggest(optuna.trial.FixedTrial(trial.params, trial.number), spec.search, seed=origin)
    return FixedSpec(
        workload=spec.workload, objective=spec.all_objectives[quality_objective(study)], precision=spec.precision,
        ema_decay=spec.ema_decay, hyperparameters=hp,
    )


def export_trial(study: optuna.Study, spec: StudySpec, path: Path, trial: FrozenTrial | None = None) -> FixedSpec:
    """Write a trial (the best where none is given) as a spec fragment that ``tuner train`` reads."""
    chosen = trial or _best_trial(study, spec)
    fixed = fixed_spec(study, spec, chosen)
    header = (
        f"# {'Best trial' if trial is None else 'Trial'} {chosen.number} of study {study.study_name!r}: "
        f"{fixed.objective.metric} = {chosen.values[quality_objective(study)]:.6g}.\n"
        f"# Retrain it with: tuner train {path}\n"
    )
    # Its folder is made, as for ``tuner train --out`` and ``tuner report --out``.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(fixed.model_dump(mode="json"), sort_keys=False))
    except OSError as error:
        raise BadInputError(f"--export {str(path)!r} cannot be written: {error.strerror or error}.") from None
    return fixed


def retrain(fixed: FixedSpec, *, device: str = "auto", out: Path = Path("model.pt")) -> tuple[dict[str, float], Path | None]:
    """Train once with fixed hyperparameters; return the last epoch's metrics and where a torch
    workload's weights were saved (a training function saves its own model: None).

    ``optuna.trial.FixedTrial`` stands in for a trial: it records and never prunes, so the
    same reporter and loop as in a study run unchanged.
    """
    workload = load_spec_workload(fixed)
    hp = fixed.hyperparameters
    check_batch_size(workload, hp.batch_size, field="hyperparameters.batch_size", name=fixed.workload)
    check_loop_settings(workload, fixed, (hp.schedule.name,), "hyperparameters.schedule")
    reporter = Reporter(optuna.trial.FixedTrial({}, hp.seed), [fixed.objective], epochs=hp.epochs)
    if not isinstance(workload, Workload):
        return dict(final_metrics(workload(hp, reporter), reporter.history)), None
    check_writable(out)
    checkpoint = Checkpoint()
    metrics = train(
        workload, hp, reporter, device=memory.resolve_device(device), checkpoint=checkpoint,
        precision=fixed.precision, ema_decay=fixed.ema_decay,
    )
    save_model(evaluated_weights(checkpoint.load()), out)  # type: ignore[arg-type]
    return metrics, out


def save_model(weights: dict, out: Path) -> None:
    """Write the weights whole or not at all: a save cut short (a full disk, a quota, a file-size
    limit) leaves the model that was there, not a truncated file."""
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    try:
        write_atomically(out, buffer.getvalue())
    except OSError as error:
        raise TunerError(f"--out {str(out)!r}: the trained model cannot be written ({error.strerror or error}).") from None


def check_writable(out: Path) -> None:
    """Refuse a model path that cannot be written before training, not after it."""
    check_folder(out.parent, "model", "--out")
    if out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a folder; give a file such as {str(out / 'model.pt')!r}.")


def load_fixed_spec(path: Path) -> FixedSpec:
    return load_model(FixedSpec, path)
