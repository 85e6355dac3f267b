"""Workloads as a user writes them, loaded by ``package.module:function`` in the tests' specs."""

from __future__ import annotations

import math
import os
import signal
import time

import optuna
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tuner


def _blobs(samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (samples,), generator=generator)
    inputs = torch.randn(samples, 4, generator=generator) + targets[:, None] * 2.0
    return TensorDataset(inputs, targets)


class Blobs:
    """A torch workload of the Workload protocol, written from scratch."""

    def __init__(self) -> None:
        self.train_data = _blobs(256, 0)
        self.val_data = _blobs(64, 1)

    def model(self, hp: tuner.Hyperparameters) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"val_accuracy": float((outputs.argmax(1) == targets).float().mean())}


def blobs() -> Blobs:
    return Blobs()


class SlowBlobs(Blobs):
    """Blobs whose validation takes ``SLOW_EVAL_S`` seconds, so a test can stop a worker mid-trial."""

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        time.sleep(float(os.environ.get("SLOW_EVAL_S", "0.5")))
        return super().metrics(outputs, targets)


def slow_blobs() -> SlowBlobs:
    return SlowBlobs()


class NanFromSecondEpoch(Blobs):
    """Blobs whose validation accuracy is NaN from the second evaluation on: a torch trial
    that diverges after training two epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluations = 0

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        self.evaluations += 1
        return {"val_accuracy": math.nan} if self.evaluations > 1 else super().metrics(outputs, targets)


def nan_from_second_epoch() -> NanFromSecondEpoch:
    return NanFromSecondEpoch()


class _LongSampleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training and len(inputs) > 16 and bool((inputs[:, 3] > 50).any()):
            raise torch.OutOfMemoryError("a long sample in a micro-batch of more than 16")
        return self.net(inputs)


class LongSampleBlobs(Blobs):
    """Blobs with one sample that, as a long sequence padded into a batch would, takes more
    memory than the others: a training micro-batch of more than 16 that holds it runs out of
    memory."""

    def __init__(self, long: int) -> None:
        super().__init__()
        self.train_data.tensors[0][long, 3] = 100.0

    def model(self, hp: tuner.Hyperparameters) -> nn.Module:
        return _LongSampleModel()


def _stop_once() -> None:
    """SIGTERM to this process the first time it is called under a ``STOP_ONCE_FILE`` that
    does not exist yet: a worker stopped mid-trial, once."""
    marker = os.environ.get("STOP_ONCE_FILE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGTERM)


class StoppedOnceBlobs(Blobs):
    """Blobs whose worker is stopped at its first validation (see ``_stop_once``)."""

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        _stop_once()
        return super().metrics(outputs, targets)


def stopped_once_blobs() -> StoppedOnceBlobs:
    return StoppedOnceBlobs()


def stopped_once_loop(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """``own_loop`` whose worker is stopped after its second epoch (see ``_stop_once``)."""
    loss = 1.0
    for epoch in range(1, hp.epochs + 1):
        loss *= 1.0 - min(hp.lr, 0.5)
        if epoch == 2:
            _stop_once()
        report(epoch, {"val_loss": loss, "val_accuracy": 1.0 - loss})
    return {"val_loss": loss, "val_accuracy": 1.0 - loss}


def stopped_once_unrepeatable_loop(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """``stopped_once_loop`` whose second run does not repeat the first's numbers, as a run on
    a GPU may not: each value is 0.01 higher once the worker has been stopped."""
    marker = os.environ.get("STOP_ONCE_FILE")
    shift = 0.01 if marker and os.path.exists(marker) else 0.0
    loss = 1.0
    for epoch in range(1, hp.epochs + 1):
        loss *= 1.0 - min(hp.lr, 0.5)
        if epoch == 2:
            _stop_once()
        report(epoch, {"val_loss": loss, "val_accuracy": 1.0 - loss + shift})
    return {"val_loss": loss, "val_accuracy": 1.0 - loss + shift}


def slow_loop(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """A training function that takes a few tenths of a second per epoch."""
    metrics = {}
    for epoch in range(1, hp.epochs + 1):
        time.sleep(0.3)
        metrics = {"val_accuracy": 1.0 - hp.lr / epoch}
        report(epoch, metrics)
    return metrics


def raises_on_large_batch(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    if hp.batch_size > 64:
        raise ValueError(f"batch {hp.batch_size} is too large for this workload")
    return own_loop(hp, report)


def own_loop(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """A training function: its own loop, tuner's search, pruning and records."""
    loss = 1.0
    for epoch in range(1, hp.epochs + 1):
        loss *= 1.0 - min(hp.lr, 0.5)
        report(epoch, {"val_loss": loss, "val_accuracy": 1.0 - loss})
    return {"val_loss": loss, "val_accuracy": 1.0 - loss}


def falling(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Accuracy 0.9 at the first epoch, 0.1 less at each next, all within milliseconds."""
    value = 1.0
    for epoch in range(1, hp.epochs + 1):
        value = 1.0 - epoch / 10
        report(epoch, {"val_accuracy": value})
    return {"val_accuracy": value}


def diverges_on_large_lr(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """NaN once the learning rate is above 0.01: such trials must end as ``diverged``."""
    value = math.nan if hp.lr > 0.01 else 0.5 + hp.lr
    for epoch in range(1, hp.epochs + 1):
        report(epoch, {"val_accuracy": value})
    return {"val_accuracy": value}


def returns_nan(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Finite at every reported epoch, NaN in the final metrics it returns."""
    for epoch in range(1, hp.epochs + 1):
        report(epoch, {"val_accuracy": 0.5})
    return {"val_accuracy": math.nan}


def returns_accuracy_only(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Reports no epoch and returns its accuracy alone."""
    return {"val_accuracy": 0.5}


def raises(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    raise ValueError("broken workload")


def pruned_always(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    raise optuna.TrialPruned("user pruned")


def catches_pruned(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """A loop that catches the pruner's signal and ends its training early, as if finished."""
    metrics = {"val_accuracy": 0.1}
    for epoch in range(1, hp.epochs + 1):
        try:
            report(epoch, metrics)
        except optuna.TrialPruned:
            break
    return metrics


def returns_a_float(hp: tuner.Hyperparameters, report) -> float:
    """Reports its epochs, then returns the objective's value alone instead of the metrics."""
    for epoch in range(1, hp.epochs + 1):
        report(epoch, {"val_accuracy": 0.5})
    return 0.5


def reports_nothing(hp: tuner.Hyperparameters, report) -> None:
    """Trains, forgets to report, and returns nothing."""


class PerSampleBlobs(Blobs):
    """Blobs whose metric is left a tensor of one value per validation sample."""

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"val_accuracy": (outputs.argmax(1) == targets).float()}


def per_sample_blobs() -> PerSampleBlobs:
    return PerSampleBlobs()


def reports_a_list(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Reports every batch's accuracy instead of the epoch's."""
    report(1, {"val_accuracy": [0.5, 0.6]})
    return {"val_accuracy": 0.6}


def reports_from_epoch_zero(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Counts its epochs from 0, as ``range(epochs)`` does."""
    for epoch in range(hp.epochs):
        report(epoch, {"val_accuracy": 0.5})
    return {"val_accuracy": 0.5}


def reports_an_epoch_twice(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    report(1, {"val_accuracy": 0.5})
    report(1, {"val_accuracy": 0.6})
    return {"val_accuracy": 0.6}


def never_reports(hp: tuner.Hyperparameters, report) -> dict[str, float]:
    """Trains and returns its metrics, but forgets to report its epochs."""
    return {"val_accuracy": 0.5}


class _Stream(torch.utils.data.IterableDataset):
    """Samples one after another, with no length and no indexing: not a map-style dataset."""

    def __iter__(self):
        return iter(_blobs(64, 2))


class StreamedBlobs(Blobs):
    def __init__(self, streamed: str) -> None:
        super().__init__()
        setattr(self, streamed, _Stream())


def streamed_train_data() -> StreamedBlobs:
    return StreamedBlobs("train_data")


def streamed_val_data() -> StreamedBlobs:
    return StreamedBlobs("val_data")
