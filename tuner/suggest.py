"""A search range from the workload itself: the gradient noise scale of a short training run,
and the effective batch and learning-rate ranges it suggests.

McCandlish et al. 2018 predict that steps to a given loss stop falling once the batch passes the
critical batch size, which the noise scale estimates: far below it a larger batch saves steps
almost linearly, far above it only costs compute. The suggested batch range spans the noise
scale by a factor of four each way, and the rate range follows the batch by the scaling rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import yaml

from tuner.errors import BadInputError, TunerError
from tuner.report import quality_index
from tuner.space import LR_EXPONENTS, Hyperparameters, scaled_learning_rate
from tuner.spec import StudySpec, parse_spec
from tuner.train import memory
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.workloads import load_torch_workload

NOISE_EPOCHS = 4
SPAN = 4


@dataclass(frozen=True)
class NoisePoint:
    """The noise scale after ``epoch`` epochs of the short run."""

    epoch: int
    samples: int
    noise_scale: float | None
    metric: float


@dataclass(frozen=True)
class Suggestion:
    noise_scale: float
    batch_low: int
    batch_high: int
    reference_batch_size: int
    lr_low: float
    lr_high: float
    scale_with_batch: str


@dataclass(frozen=True)
class NoiseProbe:
    """The short run's noise scale per epoch, the training set it ran on, and the metric of
    its points: the objective that measures quality, as ``tuner best --within`` ranks by."""

    train_size: int
    metric: str
    points: list[NoisePoint]

    @property
    def latest(self) -> float:
        """The last measured noise scale: it grows as training goes on, and trials train longer."""
        measured = [point.noise_scale for point in self.points if point.noise_scale is not None]
        if not measured:
            raise TunerError(
                "The gradient noise scale could not be measured in the short run (its |G|^2 "
                "estimate stayed at or below zero); no range can be suggested."
            )
        return measured[-1]


def _power_of_two(value: float, rounding: str) -> int:
    exponent = {"down": math.floor, "up": math.ceil, "nearest": round}[rounding](math.log2(max(1.0, value)))
    return 2 ** int(exponent)


def probe_noise(
    spec: StudySpec, device: torch.device, limits: memory.MicroBatchLimits | None = None, epochs: int = NOISE_EPOCHS
) -> NoiseProbe:
    """Train the spec's workload for a few epochs at its reference batch (within the search range)
    and its middle rate, measuring the noise scale; one point per epoch."""
    workload = load_torch_workload(spec.workload, "measuring the noise scale")
    search = spec.search
    train_size = len(workload.train_data)  # type: ignore[arg-type]
    batch_size = max(search.batch_size.low, min(search.lr.reference_batch_size, search.batch_size.high, train_size))
    base_lr = math.sqrt(search.lr.low * search.lr.high)
    lr = scaled_learning_rate(base_lr, batch_size, search.lr)
    optimizer = search.optimizer.choices[0] if search.optimizer else "adamw"
    hp = Hyperparameters(batch_size=batch_size, lr=lr, epochs=epochs, base_lr=base_lr, optimizer=optimizer)
    reporter = Reporter(optuna.trial.FixedTrial({}, 0), spec.all_objectives)
    train(workload, hp, reporter, device=device, precision=spec.precision, limits=limits, measure_noise=True)
    metrics = [objective.metric for objective in spec.all_objectives]
    metric = metrics[quality_index(metrics)]
    return NoiseProbe(train_size, metric, [
        NoisePoint(epoch + 1, (epoch + 1) * train_size, value, reporter.history[epoch][metric])
        for epoch, value in enumerate(reporter.records["gradient_noise_scale"])
    ])


def suggest_ranges(spec: StudySpec, noise_scale: float, train_size: int) -> Suggestion:
    """Effective batches from a quarter to four times the noise scale in powers of two, at most
    the training set; the reference batch at the noise scale and the rate range moved there by
    the spec's scaling rule (``sqrt`` when the spec has none)."""
    largest = _power_of_two(train_size, "down")
    high = min(_power_of_two(noise_scale * SPAN, "up"), largest)
    low = min(_power_of_two(noise_scale / SPAN, "down"), high)
    reference = max(low, min(_power_of_two(noise_scale, "nearest"), high))
    lr = spec.search.lr
    rule = lr.scale_with_batch if lr.scale_with_batch != "none" else "sqrt"
    shift = (reference / lr.reference_batch_size) ** LR_EXPONENTS[rule]
    return Suggestion(noise_scale, low, high, reference, lr.low * shift, lr.high * shift, rule)


def write_suggested_spec(spec: StudySpec, suggestion: Suggestion, path: Path) -> StudySpec:
    """The spec with the suggested ranges, named after the file, written to ``path``."""
    data = spec.to_dict()
    data["name"] = path.stem
    data["search"]["batch_size"] = {"low": suggestion.batch_low, "high": suggestion.batch_high, "scale": "pow2"}
    data["search"]["lr"].update(
        low=suggestion.lr_low,
        high=suggestion.lr_high,
        scale_with_batch=suggestion.scale_with_batch,
        reference_batch_size=suggestion.reference_batch_size,
    )
    suggested = parse_spec(data, source=str(path))
    header = (
        f"# {spec.name} with the ranges that 'tuner probe --suggest' drew from a gradient noise "
        f"scale of {suggestion.noise_scale:.0f}.\n"
    )
    # Its folder is made, as for ``tuner best --export``; the ranges are printed before this.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(suggested.to_dict(), sort_keys=False))
    except OSError as error:
        raise BadInputError(f"--write {str(path)!r} cannot be written: {error.strerror or error}.") from None
    return suggested
