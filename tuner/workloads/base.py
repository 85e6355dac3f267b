"""The two forms a workload takes: a torch ``Workload`` or a training function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from tuner.errors import WorkloadError
from tuner.space import Hyperparameters


@runtime_checkable
class Workload(Protocol):
    """A model and its data; tuner owns the training loop.

    - ``model(hp)`` builds a fresh ``torch.nn.Module`` (seeded by tuner before the call);
    - ``train_data`` and ``val_data`` are map-style datasets of ``(input, target)`` pairs; small
      ``TensorDataset``s stay on the device, anything else goes through a ``DataLoader``;
    - ``loss(outputs, targets)`` is the mean loss of a batch;
    - ``metrics(outputs, targets)`` gives the validation metrics by name (``val_accuracy``).

    An optional ``collate`` attribute is passed to the ``DataLoader``.
    """

    train_data: Dataset
    val_data: Dataset

    def model(self, hp: Hyperparameters) -> torch.nn.Module: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> Mapping[str, float]: ...


Report = Callable[[int, Mapping[str, float]], None]
TrainingFunction = Callable[[Hyperparameters, Report], Mapping[str, float]]
"""``train(hp, report) -> metrics`` for people with their own loop: call ``report(epoch, metrics)``
after every epoch (it raises ``optuna.TrialPruned`` when the pruner says stop) and return the
final metrics."""


def final_metrics(returned: Any, history: list[dict[str, float]]) -> Mapping[str, float]:
    """What a training function's run ends with: the metrics it returned, else its last report.

    Anything else is the function's mistake, named as such: left to the lookup of the objective,
    it read as ``KeyError: 'val_accuracy'`` or ``'float' object is not a mapping``."""
    if returned is not None and not isinstance(returned, Mapping):
        raise WorkloadError(
            f"The training function returned a {type(returned).__name__}; return its final metrics "
            "as a dict of floats by name, such as {'val_accuracy': 0.9}, or None after report()."
        )
    if returned:
        return returned
    if not history:
        raise WorkloadError(
            "The training function returned no metrics and reported none; call report(epoch, metrics) "
            "after every epoch, or return the final metrics as a dict."
        )
    return history[-1]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return {"val_accuracy": float((outputs.argmax(dim=1) == targets).float().mean())}


@dataclass
class Classification:
    """A ready ``Workload`` for classification: cross-entropy loss and ``val_accuracy``."""

    build_model: Callable[[Hyperparameters], torch.nn.Module]
    train_data: Dataset
    val_data: Dataset

    def model(self, hp: Hyperparameters) -> torch.nn.Module:
        return self.build_model(hp)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return accuracy(outputs, targets)


def train_size(workload: Any) -> int | None:
    """Training samples of a torch workload; None for a training function."""
    data = getattr(workload, "train_data", None)
    return None if data is None else len(data)
