"""The per-epoch report: records the epoch, catches divergence, and asks the pruner."""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from tuner.errors import SpecError, WorkloadError
from tuner.spec import Objective
from tuner.storages import forget_values, record_epochs, show_value

logger = logging.getLogger("tuner.progress")

# A trial's epochs go to the storage at most this often while it runs, and all at its end: the
# objective's values (their step is the epoch count), which the dashboard and ``tuner status``
# show, and the epoch count. Every pruner decides from the trial's own values, which it sees
# unwritten, and from other trials' written ones: epochs of milliseconds would otherwise pay a
# write each, several times what they cost. A checkpoint keeps the epochs for a resume.
VALUE_WRITE_INTERVAL_S = 1.0
# The whole history (every metric of every epoch) grows with the trial: at most this often, and
# with the records at its end.
HISTORY_WRITE_INTERVAL_S = 5.0
# Epoch lines of a trial: its first and last epoch, and between them at most one this often, so
# that epochs of milliseconds do not flood a log file (or cost more than they do).
LOG_INTERVAL_S = 1.0


def metric_value(name: str, value: Any) -> float:
    """A reported metric as a float. One that is not a number (a tensor of one value per sample,
    a list, a string) is the workload's mistake, named with the metric: ``float`` alone said
    ``only one element tensors can be converted to Python scalars`` and not which metric."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        shape = getattr(value, "shape", None)
        kind = f"a {type(value).__name__} of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
        raise WorkloadError(
            f"Metric {name!r} is {kind}, not a number; report one float per metric, "
            "such as float(correct.float().mean())."
        ) from None


class Diverged(optuna.TrialPruned):
    """A metric became NaN or infinite: the trial is pruned with ``stop_reason: diverged``."""


class OutOfMemory(optuna.TrialPruned):
    """Even a micro-batch of one sample did not fit: ``stop_reason: out_of_memory``."""


class MissingMetric(SpecError):
    """The spec's objective names a metric the workload does not report: no trial can finish,
    so the worker stops rather than fail the whole budget one trial at a time."""


def check_objective_metrics(objectives: list[Objective], metrics: Mapping[str, Any]) -> None:
    """Raise ``MissingMetric`` where ``metrics`` lacks an objective's metric."""
    missing = [o.metric for o in objectives if o.metric not in metrics]
    if missing:
        field = "objective.metric" if len(objectives) == 1 else "objectives"
        raise MissingMetric(
            f"spec field '{field}': {missing[0]!r} is not among the metrics the workload "
            f"reports: {', '.join(sorted(metrics))}. Correct the spec and run it again: its trial "
            "waits for it, and a study none of whose trials has reported takes the corrected metric."
        )


class WorkerStopped(Exception):
    """The worker was asked to stop; its trial goes back to the queue to be resumed."""


class Reporter:
    """``report(epoch, metrics)``: what a training function calls after every epoch.

    Epochs count from 1 and are the pruner's step. A pruned trial raises ``optuna.TrialPruned``
    out of this call, which a training function must let through. ``records`` collects the
    trial's user attributes; the worker writes them whatever way the trial ends.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        objectives: list[Objective],
        stop_requested: Callable[[], bool] = lambda: False,
        *,
        epochs: int | None = None,
    ) -> None:
        """``epochs``: how many the trial trains, where its parameters do not say (a retrain's
        fixed trial): the log shows each epoch out of them and always the last."""
        self.trial = trial
        self.stop_requested = stop_requested
        self.objectives = objectives
        # Not the history a retry inherits from its original: a torch trial takes its
        # checkpoint's (``restore``), and one without a checkpoint starts again at epoch 1.
        self.history: list[dict[str, float]] = []
        self.records: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._unwritten: dict[int, float] = {}
        self._next_value_write = time.monotonic() + VALUE_WRITE_INTERVAL_S
        self._next_history_write = time.monotonic() + HISTORY_WRITE_INTERVAL_S
        self._epochs = trial.params.get("epochs", epochs)
        self._next_log = 0.0
        self._resumed = False
        # The stop a training function was told through ``report`` (``__call__``): one that it
        # caught and went past is raised again as it returns (``raise_caught_stop``).
        self._stop_told: optuna.TrialPruned | None = None

    @property
    def epochs_done(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def restore(self, history: list[dict[str, float]]) -> None:
        """Take the history of a resumed trial's checkpoint as its own, so the pruner and the
        dashboard see one continuous curve."""
        self._resumed = True
        self.history = list(history)
        if len(self.objectives) == 1:
            # The values of a dead worker's last second are in its checkpoint, not in the storage.
            for entry in self.history:
                self._show(int(entry["epoch"]), entry[self.objectives[0].metric])
        if self.history:
            self.records["epochs_completed"] = self.epochs_done
        record_epochs(self.trial, self._take_unwritten(), {"history": self.history})

    def _log(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """A line for the epoch, unless the last one was less than ``LOG_INTERVAL_S`` ago; its
        ``progress`` field feeds a terminal's progress bar."""
        epochs = self._epochs
        now = time.monotonic()
        if now < self._next_log and epoch != epochs:
            return
        self._next_log = now + LOG_INTERVAL_S
        shown = " ".join(f"{o.metric}={metrics[o.metric]:.4g}" for o in self.objectives)
        logger.info(
            "trial %d epoch %s: %s", self.trial.number, f"{epoch}/{epochs}" if epochs else epoch, shown,
            extra={"progress": (self.trial.number, epoch, epochs, shown)},
        )

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        try:
            self.record(epoch, metrics)
            self.decide(epoch)
        except optuna.TrialPruned as stop:
            self._stop_told = self._stop_told or stop
            raise

    def raise_caught_stop(self) -> None:
        """Raise the pruning (or divergence) that ``report`` raised and the training function
        caught: returning as if it had trained to the end, its trial would be told COMPLETE with
        the value of an epoch the pruner stopped, and the sampler would learn from it."""
        if self._stop_told is None:
            return
        logger.warning(
            "trial %d: the training function caught the optuna.TrialPruned that report() raised "
            "and went on; let it through (re-raise it) so that the trial stops there",
            self.trial.number,
        )
        raise self._stop_told

    def record(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Keep the epoch's metrics; NaN or infinity anywhere is divergence.

        ``train_time_s``, the seconds trained so far, is added when the metrics lack it (a
        training function's), so that it can be an objective whatever the workload's form.
        """
        last = self.history[-1]["epoch"] if self.history else 0
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch <= last:
            # Epoch 0, or one reported twice, would stand at the pruner's step before or on
            # another's: the warm-up and the comparison at an epoch count epochs from 1.
            raise WorkloadError(
                f"report() got epoch {epoch!r} after epoch {last}; report each epoch once, counted from 1."
            )
        metrics = {"train_time_s": time.perf_counter() - self.started, **metrics}
        check_objective_metrics(self.objectives, metrics)
        metrics = {name: metric_value(name, value) for name, value in metrics.items()}
        for name, value in metrics.items():
            if not math.isfinite(value):
                # The epoch was trained, as the trial's time, samples/s and batch per epoch
                # count it: only its metrics are left out of the history and the curve.
                self.records["epochs_completed"] = epoch
                raise Diverged(f"{name} is {value} at epoch {epoch}")
        if not self.history and not self._resumed:
            # Trained from the first epoch: any values held are a retry's original's.
            forget_values(self.trial)
        self.history.append({"epoch": epoch, **metrics})
        self._log(epoch, metrics)
        self.records.update(history=self.history, epochs_completed=epoch)
        # Optuna prunes single-objective studies only: several objectives have no curve to report.
        if len(self.objectives) == 1:
            self._show(epoch, metrics[self.objectives[0].metric])
        now = time.monotonic()
        if now < self._next_value_write:
            return
        self._next_value_write = now + VALUE_WRITE_INTERVAL_S
        # The intermediate values' steps are the epoch count; only without them is the count written.
        attrs: dict[str, Any] = {} if len(self.objectives) == 1 else {"epochs_completed": epoch}
        if now >= self._next_history_write:
            attrs.update(history=self.history, epochs_completed=epoch)
            self._next_history_write = now + HISTORY_WRITE_INTERVAL_S
        record_epochs(self.trial, self._take_unwritten(), attrs)

    def write_records(self) -> None:
        """Write the records and the values not written yet: one write as the trial ends."""
        record_epochs(self.trial, self._take_unwritten(), self.records)

    def _show(self, epoch: int, value: float) -> None:
        if show_value(self.trial, epoch, value):
            self._unwritten[epoch] = value

    def _take_unwritten(self) -> dict[int, float]:
        unwritten, self._unwritten = self._unwritten, {}
        return unwritten

    def decide(self, epoch: int) -> None:
        """Stop here if the worker is stopping or the pruner says so; never after the last
        epoch, whose compute is spent: pruning there saves nothing and loses a finished model."""
        if self._epochs is not None and epoch >= self._epochs:
            return
        if self.stop_requested():
            raise WorkerStopped(f"stopped after epoch {epoch}")
        if len(self.objectives) > 1:
            return
        metric = self.objectives[0].metric
        value = self.history[-1][metric]
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"at epoch {epoch} with {metric}={value:.4g}")
