"""The per-epoch report: records the epoch, catches divergence, and asks the pruner."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from tuner.spec import Objective
from tuner.storage import record_epoch, set_user_attrs

logger = logging.getLogger("tuner.progress")

# The objective (its step is the epoch count) goes to the storage every epoch, as the pruner
# and ``tuner status`` need; the whole history at most this often while the trial runs, first
# this long after the trial starts, and with the records at its end. Epochs of a few
# milliseconds would otherwise spend most of their time rewriting it, and a trial shorter than
# this would write it twice; a checkpoint keeps it for a resume.
HISTORY_WRITE_INTERVAL_S = 5.0
# Epoch lines of a trial: its first and last epoch, and between them at most one this often, so
# that epochs of milliseconds do not flood a log file (or cost more than they do).
LOG_INTERVAL_S = 1.0


class Diverged(optuna.TrialPruned):
    """A metric became NaN or infinite: the trial is pruned with ``stop_reason: diverged``."""


class OutOfMemory(optuna.TrialPruned):
    """Even a micro-batch of one sample did not fit: ``stop_reason: out_of_memory``."""


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
    ) -> None:
        self.trial = trial
        self.stop_requested = stop_requested
        self.objectives = objectives
        self.history: list[dict[str, float]] = list(trial.user_attrs.get("history", []))
        self.records: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._next_history_write = time.monotonic() + HISTORY_WRITE_INTERVAL_S
        self._epochs = trial.params.get("epochs")
        self._next_log = 0.0

    @property
    def epochs_done(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def restore(self, history: list[dict[str, float]]) -> None:
        """Take the history of a resumed trial's checkpoint as its own, so the pruner and the
        dashboard see one continuous curve."""
        self.history = list(history)
        set_user_attrs(self.trial, {"history": self.history})
        reported = self.trial.storage.get_trial(self.trial._trial_id).intermediate_values
        if len(self.objectives) == 1:
            for entry in self.history:
                if int(entry["epoch"]) not in reported:
                    self.trial.report(entry[self.objectives[0].metric], int(entry["epoch"]))
        if self.history:
            self.records["epochs_completed"] = self.epochs_done

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
        self.record(epoch, metrics)
        self.decide(epoch)

    def record(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Keep the epoch's metrics; NaN or infinity anywhere is divergence.

        ``train_time_s``, the seconds trained so far, is added when the metrics lack it (a
        training function's), so that it can be an objective whatever the workload's form.
        """
        metrics = {"train_time_s": time.perf_counter() - self.started, **metrics}
        missing = [o.metric for o in self.objectives if o.metric not in metrics]
        if missing:
            raise KeyError(
                f"objective metric {missing[0]!r} is not among the reported metrics "
                f"{sorted(metrics)}"
            )
        metrics = {name: float(value) for name, value in metrics.items()}
        for name, value in metrics.items():
            if not math.isfinite(value):
                raise Diverged(f"{name} is {value} at epoch {epoch}")
        self.history.append({"epoch": epoch, **metrics})
        self._log(epoch, metrics)
        self.records.update(history=self.history, epochs_completed=epoch)
        # Optuna prunes single-objective studies only: several objectives have no curve to report.
        value = metrics[self.objectives[0].metric] if len(self.objectives) == 1 else None
        # The intermediate value's step is the epoch count; only without one is the count written.
        attrs: dict[str, Any] = {} if value is not None else {"epochs_completed": epoch}
        if time.monotonic() >= self._next_history_write:
            attrs.update(history=self.history, epochs_completed=epoch)
            self._next_history_write = time.monotonic() + HISTORY_WRITE_INTERVAL_S
        record_epoch(self.trial, epoch, value, attrs)

    def decide(self, epoch: int) -> None:
        """Stop here if the worker is stopping or the pruner says so."""
        if self.stop_requested():
            raise WorkerStopped(f"stopped after epoch {epoch}")
        if len(self.objectives) > 1:
            return
        metric = self.objectives[0].metric
        value = self.history[-1][metric]
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {metric}={value:.4g}")
