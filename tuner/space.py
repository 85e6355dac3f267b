"""The joint search space: one Optuna trial becomes one set of ``Hyperparameters``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Annotated

import optuna
from pydantic import AfterValidator, Field

from tuner.spec import SEED_LIMIT, LearningRateSpace, ScheduleName, SearchSpace, known_optimizer


@dataclass(frozen=True)
class BatchSchedule:
    """How the effective batch changes from epoch to epoch (``tuner.train.schedule`` applies it).

    ``ramp`` multiplies it by ``ramp_factor`` at each fraction ``ramp_at`` of the epochs, up to
    ``high``, and keeps the rate until the batch stops growing; ``adaptive`` takes the measured
    noise scale, clipped to ``[low, high]``, and moves the rate by
    ``(batch / starting batch) ** lr_exponent``, the spec's scaling rule.
    """

    name: ScheduleName = "constant"
    ramp_factor: Annotated[int, Field(ge=2)] = 2
    ramp_at: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = (0.5, 0.75)
    low: Annotated[int, Field(ge=1)] = 1
    high: Annotated[int | None, Field(ge=1)] = None
    lr_exponent: Annotated[float, Field(ge=0)] = 0.0

    def __post_init__(self) -> None:
        # A hand-written fragment's range, as the spec's batch range is checked.
        if self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) must not be above high ({self.high})")


@dataclass(frozen=True)
class Hyperparameters:
    """What a trial trains with.

    ``batch_size`` is the effective batch size (samples per optimizer step); how many samples go
    through the device at once is a hardware fact decided by the training loop, not searched.

    The bounds are checked where pydantic reads the fields, as ``tuner train`` reads an exported
    fragment; a trial's values come from a validated search space.
    """

    batch_size: Annotated[int, Field(ge=1)]
    lr: Annotated[float, Field(gt=0)]
    epochs: Annotated[int, Field(ge=1)]
    base_lr: Annotated[float, Field(gt=0)]
    optimizer: Annotated[str, AfterValidator(known_optimizer)] = "adamw"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    # Below 2**32, as sampler.seed: NumPy, and so scikit-learn's workloads, take no larger seed.
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] = 0
    schedule: BatchSchedule = field(default_factory=BatchSchedule)

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


LR_EXPONENTS = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}


def scaled_learning_rate(base_lr: float, batch_size: int, space: LearningRateSpace) -> float:
    """The rate used at ``batch_size``: ``base * (batch / reference) ** k``, k = 1 or 1/2."""
    return base_lr * (batch_size / space.reference_batch_size) ** LR_EXPONENTS[space.scale_with_batch]


def lr_param_name(space: LearningRateSpace) -> str:
    """``base_lr`` when the searched value is a rate at the reference batch, else ``lr``."""
    return "lr" if space.scale_with_batch == "none" else "base_lr"


def momentum_searched(optimizer: str | None) -> bool:
    """Whether a trial that trains with the searched ``optimizer`` (None: not searched) samples
    the momentum. Among searched optimizers only sgd takes one; a value drawn for the others
    would change nothing and show in the study as if it had. Without a searched optimizer every
    trial draws it, for a training function's own optimizer."""
    return optimizer in (None, "sgd")


def is_conditional(space: SearchSpace) -> bool:
    """Whether some trials sample a parameter that others do not: the momentum, where the
    searched optimizers draw it for some (``momentum_searched``) and not for others."""
    if space.momentum is None or space.optimizer is None:
        return False
    return len({momentum_searched(optimizer) for optimizer in space.optimizer.choices}) > 1


def suggest(trial: optuna.Trial, space: SearchSpace, *, seed: int) -> Hyperparameters:
    """Ask the trial for every searched value and derive the rate actually used."""
    batch = space.batch_size
    if batch.scale == "pow2":
        batch_size = int(trial.suggest_categorical("batch_size", batch.choices()))
    else:
        batch_size = trial.suggest_int(
            "batch_size", batch.low, batch.high, log=batch.scale == "log"
        )
    base_lr = trial.suggest_float(
        lr_param_name(space.lr), space.lr.low, space.lr.high, log=space.lr.log
    )
    epochs = trial.suggest_int("epochs", space.epochs.low, space.epochs.high, log=space.epochs.log)
    extras: dict[str, float | str] = {}
    optimizer = None
    if space.optimizer is not None:
        optimizer = extras["optimizer"] = trial.suggest_categorical("optimizer", space.optimizer.choices)
    if space.weight_decay is not None:
        bounds = space.weight_decay
        extras["weight_decay"] = trial.suggest_float("weight_decay", bounds.low, bounds.high, log=bounds.log)
    if space.momentum is not None and momentum_searched(optimizer):
        bounds = space.momentum
        extras["momentum"] = trial.suggest_float("momentum", bounds.low, bounds.high, log=bounds.log)
    return Hyperparameters(
        batch_size=batch_size,
        lr=scaled_learning_rate(base_lr, batch_size, space.lr),
        epochs=epochs,
        base_lr=base_lr,
        seed=seed,
        schedule=_schedule(trial, space),
        **extras,  # type: ignore[arg-type]
    )


def centre(space: SearchSpace) -> dict[str, float | int | str]:
    """The middle of every searched range, geometric where it is searched on a log scale: the
    study's first trial, a sound guess in any space before the sampler knows anything."""
    def middle(low: float, high: float, log: bool) -> float:
        return math.sqrt(low * high) if log else (low + high) / 2

    batch = space.batch_size
    if batch.scale == "pow2":
        choices = batch.choices()
        batch_size = choices[(len(choices) - 1) // 2]
    else:
        batch_size = round(middle(batch.low, batch.high, batch.scale == "log"))
    params: dict[str, float | int | str] = {
        "batch_size": batch_size,
        lr_param_name(space.lr): middle(space.lr.low, space.lr.high, space.lr.log),
        "epochs": round(middle(space.epochs.low, space.epochs.high, space.epochs.log)),
    }
    optimizer = None
    if space.optimizer is not None:
        optimizer = params["optimizer"] = space.optimizer.choices[0]
    if space.weight_decay is not None:
        params["weight_decay"] = middle(space.weight_decay.low, space.weight_decay.high, space.weight_decay.log)
    if space.momentum is not None and momentum_searched(optimizer):
        params["momentum"] = middle(space.momentum.low, space.momentum.high, space.momentum.log)
    if space.batch_schedule is not None:
        choices = space.batch_schedule.choices
        params["batch_schedule"] = "constant" if "constant" in choices else choices[0]
    return params


def _schedule(trial: optuna.Trial, space: SearchSpace) -> BatchSchedule:
    if space.batch_schedule is None:
        return BatchSchedule()
    options = space.batch_schedule
    return BatchSchedule(
        name=trial.suggest_categorical("batch_schedule", options.choices),
        ramp_factor=options.ramp_factor,
        ramp_at=tuple(options.ramp_at),
        low=space.batch_size.low,
        high=space.batch_size.high,
        lr_exponent=LR_EXPONENTS[space.lr.scale_with_batch],
    )
