"""The worker loop: claim a trial of the study, train it, tell the result, until the budget is met.

A worker never calls ``Study.ask`` blind (it would create a trial past the budget): it claims a
WAITING trial through the atomic WAITING -> RUNNING transition, and only a study with a time
budget and no trial count gets fresh trials.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import TunerError
from tuner.space import lr_param_name, suggest
from tuner.spec import StudySpec
from tuner.storage import make_storage, storage_url
from tuner.study import budget_state, load_study
from tuner.train import memory
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import train
from tuner.train.reporter import Diverged, OutOfMemory, Reporter, WorkerStopped
from tuner.workloads import Workload, load_workload

logger = logging.getLogger("tuner.worker")

MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class WorkerOptions:
    device: str = "auto"
    checkpoint_dir: Path | None = None
    keep_checkpoints: bool = False
    worker_index: int | None = None
    threads: int | None = None
    poll_s: float = 1.0


@dataclass
class WorkerSummary:
    trials: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.trials[outcome] = self.trials.get(outcome, 0) + 1


def default_checkpoint_dir(url: str) -> Path:
    """Beside a SQLite or journal file; else ``./checkpoints``."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///")).resolve().parent / "checkpoints"
    if url.endswith(".log"):
        return Path(url.removeprefix("journal://")).resolve().parent / "checkpoints"
    return Path("checkpoints").resolve()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def seed_offset(worker_index: int | None) -> int:
    """The worker's offset to the spec's sampler seed: its index, else drawn from host:pid, since
    the workers of a container platform may all run as PID 1 and would propose the same points."""
    if worker_index is not None:
        return worker_index
    return zlib.crc32(worker_id().encode()) % 1_000_000


def _claim(study: optuna.Study, budgeted: bool) -> tuple[optuna.Trial, FrozenTrial] | None:
    """Win a WAITING trial (retries first), or make one when the budget counts no trials."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    waiting.sort(key=lambda t: ("retry_history" not in t.system_attrs, t.number))
    storage = study._storage
    for frozen in waiting:
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id), frozen
        except UpdateFinishedTrialError:
            continue
    if budgeted:
        return None
    trial_id = storage.create_new_trial(study._study_id)
    return optuna.Trial(study, trial_id), storage.get_trial(trial_id)


class _StopRequest:
    """SIGTERM/SIGINT: finish the current epoch, hand the trial back, exit; a second signal
    abandons the epoch at once."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        logger.warning("worker %s: stop requested (%s)", worker_id(), signal.Signals(signum).name)
        if self.count > 1:
            raise WorkerStopped("second stop signal")

    def __bool__(self) -> bool:
        return self.count > 0


def run_worker(
    study_name: str,
    storage: str | None = None,
    options: WorkerOptions | None = None,
) -> WorkerSummary:
    """Pull trials of ``study_name`` until its budget is met; return what this worker ran."""
    options = options or WorkerOptions()
    url = storage_url(storage)
    study, spec = load_study(study_name, make_storage(url), seed_offset=seed_offset(options.worker_index))
    workload = load_workload(spec.workload)
    device = memory.resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    checkpoint_dir = options.checkpoint_dir or default_checkpoint_dir(url)
    stop = _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    summary = WorkerSummary()
    consecutive_failures = 0
    try:
        while not stop:
            state = budget_state(study, spec)
            if state.exhausted:
                break
            if is_heartbeat_enabled(study._storage):
                fail_stale_trials(study)
            claimed = _claim(study, budgeted=spec.budget.n_trials is not None)
            if claimed is None:
                # Only a trial whose worker dies can add work now, and only heartbeats tell.
                if state.running and is_heartbeat_enabled(study._storage):
                    time.sleep(options.poll_s)
                    continue
                break
            trial, frozen = claimed
            outcome = _run_trial(study, spec, workload, trial, frozen, device, checkpoint_dir, options, stop)
            summary.count(outcome)
            fresh = "retry_history" not in frozen.system_attrs
            consecutive_failures = consecutive_failures + 1 if outcome == "failed" and fresh else 0
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise TunerError(
                    f"Worker stopped after {consecutive_failures} consecutive failed trials; "
                    f"the workload {spec.workload!r} looks broken (see the 'error' of the trials "
                    f"with: tuner trials --study {study_name})."
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("worker %s done: %s", worker_id(), summary.trials)
    return summary


def _run_trial(
    study: optuna.Study,
    spec: StudySpec,
    workload: Any,
    trial: optuna.Trial,
    frozen: FrozenTrial,
    device: torch.device,
    checkpoint_dir: Path,
    options: WorkerOptions,
    stop: _StopRequest,
) -> str:
    """Train one trial and tell its end; return the outcome as a word."""
    origin = frozen.system_attrs.get("retry_history", [frozen.number])[0]
    hp = suggest(trial, spec.search, seed=origin)
    reporter = Reporter(trial, spec.all_objectives, stop_requested=lambda: bool(stop))
    reporter.records.update(
        effective_batch_size=hp.batch_size,
        lr_used=hp.lr,
        device=str(device),
        device_name=memory.device_name(device),
        worker=worker_id(),
    )
    if "failed_trial" in frozen.system_attrs:
        reporter.records["retried_from"] = frozen.system_attrs["failed_trial"]
    checkpoint = Checkpoint(checkpoint_dir / study.study_name / f"trial-{origin}.pt")
    started = time.perf_counter()
    values: list[float] | None = None
    state = TrialState.FAIL
    outcome = "failed"
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            if isinstance(workload, Workload):
                metrics = train(
                    workload, hp, reporter, device=device, checkpoint=checkpoint,
                    precision=spec.precision,
                )
            else:
                metrics = workload(hp, reporter) or (reporter.history[-1] if reporter.history else {})
        values = [float(metrics[o.metric]) for o in spec.all_objectives]
        state, outcome = TrialState.COMPLETE, "complete"
    except (Diverged, OutOfMemory, optuna.TrialPruned) as stopped:
        reason = {Diverged: "diverged", OutOfMemory: "out_of_memory"}.get(type(stopped), "pruned")
        reporter.records.update(stop_reason=reason, stop_detail=str(stopped))
        if reason == "out_of_memory":
            trial.set_constraint([1.0])
        state, outcome = TrialState.PRUNED, reason
    except WorkerStopped:
        reporter.records["stop_reason"] = "worker_stopped"
        outcome = "worker_stopped"
    except Exception as error:  # a workload's own error fails its trial, never the worker
        reporter.records["error"] = _describe_error(error)
        logger.warning("trial %d failed: %s", trial.number, reporter.records["error"].splitlines()[0])
    reporter.records["duration_s"] = time.perf_counter() - started
    for key, value in reporter.records.items():
        trial.set_user_attr(key, value)
    if outcome == "worker_stopped":
        _hand_back(study, trial)
    else:
        study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        if not options.keep_checkpoints:
            checkpoint.remove()
    _log_trial(trial, spec, hp, outcome, values, reporter)
    return outcome


def _hand_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """End a stopped worker's trial and queue a copy that resumes from its checkpoint."""
    study.tell(trial, state=TrialState.FAIL)
    frozen = study._storage.get_trial(trial._trial_id)
    optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, frozen)


def _describe_error(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines[-4:]).strip()
    return f"{type(error).__name__}: {error}\n{tail}"


def _log_trial(
    trial: optuna.Trial, spec: StudySpec, hp: Any, outcome: str, values: list[float] | None, reporter: Reporter
) -> None:
    shown = ", ".join(
        f"{o.metric}={v:.4g}" for o, v in zip(spec.all_objectives, values or [])
    ) or f"after {reporter.epochs_done} epoch(s)"
    logger.info(
        "trial %d %s: %s | batch_size=%d %s=%.3g epochs=%d",
        trial.number, outcome, shown, hp.batch_size, lr_param_name(spec.search.lr), hp.base_lr, hp.epochs,
    )
