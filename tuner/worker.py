"""The worker loop: claim a trial of the study, train it, tell the result, until the budget is met.

A worker never calls ``Study.ask`` blind (it would create a trial past the budget): it claims a
WAITING trial through the atomic WAITING -> RUNNING transition, and only a study with a time
budget and no trial count gets fresh trials.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import random
import signal
import socket
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState

from tuner.artifacts import default_artifact_dir, upload_learning_curve
from tuner.errors import StorageError, TunerError
from tuner.files import check_folder
from tuner.launch import PARENT_ENV
from tuner.notes import REFRESH_INTERVAL_S, NoteKeeper
from tuner.space import Hyperparameters, lr_param_name, suggest
from tuner.spec import StudySpec
from tuner.storages import (
    HAND_BACKS,
    RETRY_HISTORY,
    beside_storage,
    cache_claimed_trial,
    claim_next_waiting_trial,
    one_write,
    queue_retry,
    set_user_attrs,
    storage_url,
    write_claim_lease,
)
from tuner.study import (
    UID_ATTR,
    BudgetState,
    add_waiting_trials,
    budget_state,
    deletion_named,
    load_study,
    no_slots_message,
)
from tuner.train import memory
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import train
from tuner.train.reporter import (
    Diverged,
    MissingMetric,
    OutOfMemory,
    Reporter,
    WorkerStopped,
    check_objective_metrics,
)
from tuner.workloads import Workload, final_metrics, load_workload

logger = logging.getLogger("tuner.worker")

MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class WorkerOptions:
    device: str = "auto"
    checkpoint_dir: Path | None = None
    artifact_dir: Path | None = None
    keep_checkpoints: bool = False
    worker_index: int | None = None
    threads: int | None = None
    poll_s: float = 1.0


@dataclass
class WorkerSummary:
    trials: dict[str, int] = field(default_factory=dict)
    # The first SIGTERM/SIGINT that stopped the worker before the budget was met, if any.
    stopped_by: signal.Signals | None = None

    def count(self, outcome: str) -> None:
        self.trials[outcome] = self.trials.get(outcome, 0) + 1


def default_checkpoint_dir(url: str) -> Path:
    """Beside a SQLite or journal file; else ``./checkpoints``."""
    return beside_storage(url, "checkpoints")


def study_checkpoint_dir(study: optuna.Study, checkpoint_dir: Path) -> Path:
    """The study's folder of checkpoints: its name, then its id where it has one (studies made
    before the id keep the name alone), so that a study made again under the same name never
    resumes a trial from the other's checkpoint."""
    uid = study._storage.get_study_system_attrs(study._study_id).get(UID_ATTR)
    return checkpoint_dir / study.study_name / uid if uid else checkpoint_dir / study.study_name


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def seed_offset(worker_index: int | None) -> int:
    """The worker's offset to the spec's sampler seed: its index, else drawn from host:pid, since
    the workers of a container platform may all run as PID 1 and would propose the same points."""
    if worker_index is not None:
        return worker_index
    return zlib.crc32(worker_id().encode()) % 1_000_000


def _claim(study: optuna.Study, budgeted: bool, attrs: dict[str, Any]) -> tuple[optuna.Trial, FrozenTrial] | None:
    """Win a WAITING trial (retries first), or make one when the budget counts no trials; the
    winner carries ``attrs`` (who runs it and where, for ``tuner status``)."""
    storage = study._storage
    while True:
        claimed = _claim_waiting(study, attrs)
        if claimed is not None:
            return claimed
        # None waited: look again where this worker made new slots.
        if not (budgeted and add_waiting_trials(study)):
            break
    if budgeted:
        return None
    trial = optuna.Trial(study, storage.create_new_trial(study._study_id))
    with one_write(storage):
        set_user_attrs(trial, attrs)
        # A trial made here is claimed as it is made: its lease goes with who runs it, as a
        # claim's does.
        write_claim_lease(storage, trial._trial_id)
    return trial, storage.get_trial(trial._trial_id)


def _claim_waiting(study: optuna.Study, attrs: dict[str, Any]) -> tuple[optuna.Trial, FrozenTrial] | None:
    """The trial won, if any waited."""
    trial_id = claim_next_waiting_trial(study._storage, study._study_id, attrs)
    if trial_id is None:
        return None
    trial = optuna.Trial(study, trial_id)
    cache_claimed_trial(study._storage, study._study_id, trial._cached_frozen_trial)
    return trial, trial._cached_frozen_trial


def _unmade_slots(study: optuna.Study, state: BudgetState) -> int:
    """Trials of the budget that no slot holds while nothing runs or waits: behind a gRPC proxy
    that does not make slots (Optuna's own), they would never run."""
    grpc = isinstance(study._storage, optuna.storages.GrpcStorageProxy)
    if not grpc or state.exhausted or state.running or state.waiting:
        return 0
    return state.unheld


def _fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's ``fail_stale_trials``, writing on each stale trial why it fails, so that a trial
    out of retries keeps the reason. The stale trials are read once: read again, as Optuna's
    reads them, one turned stale in between was failed without its reason."""
    storage = study._storage
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(
                trial_id, "error", "its worker stopped sending heartbeats (killed, preempted or cut off)"
            )
            failed = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        callback = storage.get_heartbeat_stale_trial_callback()
        if failed and callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


class _StopRequest:
    """SIGTERM/SIGINT: finish the current epoch, hand the trial back, exit; a second signal
    abandons the epoch at once. Only the epoch: raised in the trial's last writes it broke them
    off and could leave a handed-back trial with no copy queued, lost to the budget; raised in
    a claim or as the worker exits, it failed the worker."""

    def __init__(self) -> None:
        self.count = 0
        self.training = False
        self.signal: signal.Signals | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signal = self.signal or signal.Signals(signum)
        logger.warning("worker %s: stop requested (%s)", worker_id(), signal.Signals(signum).name)
        if self.count > 1 and self.training:
            raise WorkerStopped("second stop signal")

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """Where a second signal breaks off: the trial's training, which its checkpoint resumes."""
        self.training = True
        try:
            yield
        finally:
            self.training = False

    def __bool__(self) -> bool:
        return self.count > 0


def _stop_when_orphaned(parent_pid: int, poll_s: float = 1.0) -> None:
    """Send this worker SIGTERM once ``parent_pid``, the command that started it, is gone
    (it is then another process's child): the trial under way is handed back after its epoch,
    as when the command forwards a stop."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        logger.warning("worker %s: the command that started it (pid %d) is gone; stopping", worker_id(), parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tuner-parent-watch", daemon=True).start()


def run_worker(
    study_name: str,
    storage: str | None = None,
    options: WorkerOptions | None = None,
) -> WorkerSummary:
    """Pull trials of ``study_name`` until its budget is met; return what this worker ran.

    SIGTERM and SIGINT stop it (``_StopRequest``); after such a stop they are ignored, so that
    one more signal while the process exits changes nothing."""
    options = options or WorkerOptions()
    url = storage_url(storage)
    study, spec = load_study(study_name, url, seed_offset=seed_offset(options.worker_index))
    workload = load_workload(spec.workload)
    device = memory.resolve_device(options.device)
    logger.info(
        "worker %s on %s (%s), CUDA_VISIBLE_DEVICES=%s", worker_id(), device,
        memory.device_name(device), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
    )
    if options.threads:
        torch.set_num_threads(options.threads)
    # What torch, Optuna and the workload made at start-up lives as long as the worker: left to
    # the collector, every full collection walks it again, and the one at exit took each of 8
    # workers about a second of CPU.
    gc.freeze()
    checkpoint_dir = study_checkpoint_dir(study, options.checkpoint_dir or default_checkpoint_dir(url))
    # Checked before a trial is claimed: a save or an upload failing after training stopped the
    # worker with the bare OSError and left its trial running, its training lost.
    if isinstance(workload, Workload):  # a training function saves no checkpoint
        check_folder(checkpoint_dir, "checkpoint", "--checkpoint-dir")
    artifact_dir = options.artifact_dir or default_artifact_dir(url)
    check_folder(artifact_dir, "artifact", "--artifact-dir")
    options = replace(options, artifact_dir=artifact_dir)
    stop = _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # ``tuner run`` starts its workers with these held: one that came while this worker started
    # is delivered now, to the handler, and it stops before claiming a trial.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, previous)
    if PARENT_ENV in os.environ:
        _stop_when_orphaned(int(os.environ[PARENT_ENV]))
    summary = WorkerSummary()
    consecutive_failures = 0
    heartbeat = is_heartbeat_enabled(study._storage)
    # A trial turns stale one heartbeat interval at a time: looking more often finds nothing new.
    stale_check_s = study._storage.get_heartbeat_interval() if heartbeat else 0.0
    stale_checked_at = -math.inf
    note = NoteKeeper(study, spec, writer=worker_id())
    # Workers started together would all find the note old at once and all rewrite it, each
    # reading the whole study: each looks first at a random moment of the interval.
    note_due = time.monotonic() + random.uniform(0, REFRESH_INTERVAL_S)
    try:
        with deletion_named(study):
            while not stop:
                if spec.budget.timeout_s is not None and budget_state(study, spec).exhausted:
                    break
                if heartbeat and time.monotonic() - stale_checked_at >= stale_check_s:
                    _fail_stale_trials(study)
                    stale_checked_at = time.monotonic()
                claimed = _claim(study, spec.budget.n_trials is not None, {"worker": worker_id(), "device": str(device)})
                if claimed is None:
                    # Only a trial whose worker dies can add work now, and only heartbeats tell.
                    state = budget_state(study, spec)
                    if not state.exhausted and state.running and heartbeat:
                        time.sleep(options.poll_s)
                        continue
                    missing = _unmade_slots(study, state)
                    if missing:
                        raise TunerError(no_slots_message(study_name, missing))
                    break
                trial, frozen = claimed
                outcome = _run_trial(study, spec, workload, trial, frozen, device, checkpoint_dir, options, stop)
                summary.count(outcome)
                if outcome != "worker_stopped" and time.monotonic() >= note_due:
                    note.refresh()
                    note_due = time.monotonic() + REFRESH_INTERVAL_S
                fresh = RETRY_HISTORY not in frozen.system_attrs
                consecutive_failures = consecutive_failures + 1 if outcome == "failed" and fresh else 0
                if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                    raise TunerError(
                        f"Worker stopped after {consecutive_failures} consecutive failed trials; "
                        f"the workload {spec.workload!r} looks broken (see the 'error' of the trials "
                        f"with: tuner trials --study {study_name})."
                    )
            if not stop:
                note.final()
    finally:
        # Once stopped, a second signal as the worker exits has no epoch to abandon, and is
        # ignored: the default handlers turned the exit into a failure (exit 1, "Aborted!"), and
        # the stop handler, which the interpreter resets to the default as it finishes, let one
        # that came in its last moments kill the worker (exit -2), which `tuner run` took for
        # an error.
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if stop else handler)
    summary.stopped_by = stop.signal
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
    origin = frozen.system_attrs.get(RETRY_HISTORY, [frozen.number])[0]
    try:
        # The heartbeat runs from the claim until the trial is told: neither the sampling (a large
        # study's, a paused worker's) nor a slow final write may look like death. A trial failed
        # as stale in its sampling is the retry's too.
        with get_heartbeat_thread(trial._trial_id, study._storage):
            with one_write(study._storage):
                if origin != frozen.number:
                    # A retry inherits its original's records; how the original ended is not its own.
                    set_user_attrs(trial, {"error": None, "stop_reason": None})
                hp = suggest(trial, spec.search, seed=origin)
            reporter = Reporter(trial, spec.all_objectives, stop_requested=lambda: bool(stop))
            reporter.records.update(
                effective_batch_size=hp.batch_size,
                lr_used=hp.lr,
                device=str(device),
                device_name=memory.device_name(device),
                worker=worker_id(),
            )
            if origin != frozen.number:
                reporter.records["retried_from"] = frozen.system_attrs[RETRY_HISTORY][-1]
            checkpoint = Checkpoint(checkpoint_dir / f"trial-{origin}.pt")
            started = time.perf_counter()
            try:
                state, values, outcome = _train(study, spec, workload, hp, reporter, device, checkpoint, stop)
            except MissingMetric as error:
                # The spec's fault, not the trial's: its slot waits again for the corrected spec,
                # which the study takes while no trial has reported (``create_study``).
                reporter.records["error"] = str(error)
                reporter.write_records()
                _hand_back(study, trial)
                raise
            reporter.records["duration_s"] = time.perf_counter() - started
            if outcome == "worker_stopped":
                reporter.write_records()
                _hand_back(study, trial)
            else:
                _finish(study, spec, trial, state, values, outcome, reporter, options)
    except UpdateFinishedTrialError:
        # This worker sent no heartbeat for longer than the grace period (a paused process, a
        # cut link) and another worker failed the trial and queued its retry, which resumes from
        # the same checkpoint: the trial and its checkpoint are the retry's now.
        logger.warning(
            "trial %d was failed as stale and retried while this worker ran it; left to its retry", trial.number
        )
        return "taken_over"
    if outcome != "worker_stopped" and not options.keep_checkpoints:
        checkpoint.remove()
    _log_trial(trial, spec, hp, outcome, values, reporter)
    return outcome


def _finish(
    study: optuna.Study,
    spec: StudySpec,
    trial: optuna.Trial,
    state: TrialState,
    values: list[float] | None,
    outcome: str,
    reporter: Reporter,
    options: WorkerOptions,
) -> None:
    """Write the trial's records and learning curve, and tell how it ended: one append on a
    journal; on a database one transaction, which Optuna's tell commits as it sets the state."""
    with one_write(study._storage):
        reporter.write_records()
        if outcome == "out_of_memory":
            # Optuna 5 keeps constraints on the trial; TPE ranks a violated one below the rest.
            trial.set_constraint("out_of_memory", 1.0)
        # Artifacts write an attribute on the trial, which a finished trial refuses.
        upload_learning_curve(
            trial, reporter.history, [o.metric for o in spec.all_objectives], options.artifact_dir,
            png=spec.learning_curve_png,
        )
        # What ``study.optimize`` calls: ``study.tell`` would read the finished trial back.
        _tell_with_warning(study, trial, values, state)


def _train(
    study: optuna.Study,
    spec: StudySpec,
    workload: Any,
    hp: Hyperparameters,
    reporter: Reporter,
    device: torch.device,
    checkpoint: Checkpoint,
    stop: _StopRequest,
) -> tuple[TrialState, list[float] | None, str]:
    """Run the workload; turn how it ended into a trial state, values and an outcome word."""
    try:
        # Inside the try: a second signal that lands as the training ends still hands it back.
        with stop.abandonable():
            if isinstance(workload, Workload):
                metrics = _train_workload(study, spec, workload, hp, reporter, device, checkpoint)
            else:
                started = time.perf_counter()
                returned = workload(hp, reporter)
                reporter.records["train_time_s"] = time.perf_counter() - started
                reporter.raise_caught_stop()
                metrics = final_metrics(returned, reporter.history)
                if not reporter.history:
                    # Its metrics stand, but it has no curve, and no pruner could have stopped it.
                    logger.warning(
                        "trial %d: the training function never called report(epoch, metrics), so no epoch is "
                        "recorded and the pruner could not stop it; call report after every epoch",
                        reporter.trial.number,
                    )
        # A training function's own metrics lack what the reporter adds, such as train_time_s.
        final = {**(reporter.history[-1] if reporter.history else {}), **metrics}
        check_objective_metrics(spec.all_objectives, final)
        values = [float(final[o.metric]) for o in spec.all_objectives]
        for objective, value in zip(spec.all_objectives, values):
            if not math.isfinite(value):
                # As at a reported epoch: Optuna refuses the value, and the trial would stay RUNNING.
                raise Diverged(f"{objective.metric} is {value} at the end")
        return TrialState.COMPLETE, values, "complete"
    except (Diverged, OutOfMemory, optuna.TrialPruned) as stopped:
        reason = {Diverged: "diverged", OutOfMemory: "out_of_memory"}.get(type(stopped), "pruned")
        reporter.records.update(stop_reason=reason, stop_detail=str(stopped))
        return TrialState.PRUNED, None, reason
    except (MissingMetric, UpdateFinishedTrialError):
        raise
    except Exception as error:  # a workload's own error fails its trial, never the worker
        if _stopped_within(error):
            reporter.records["stop_reason"] = "worker_stopped"
            return TrialState.FAIL, None, "worker_stopped"
        if isinstance(error, StorageError):
            # A storage lost for good (past TUNER_DB_RETRY_S) is no fault of the trial:
            # the worker stops with it, and the trial, left running, is retried after the grace.
            raise
        reporter.records["error"] = _describe_error(error)
        logger.warning("trial %d failed: %s", reporter.trial.number, reporter.records["error"].splitlines()[0])
        return TrialState.FAIL, None, "failed"


def _train_workload(
    study: optuna.Study,
    spec: StudySpec,
    workload: Workload,
    hp: Hyperparameters,
    reporter: Reporter,
    device: torch.device,
    checkpoint: Checkpoint,
) -> dict[str, float]:
    """Train at the micro-batch the study knows to fit on this device model, and share what the
    trial learns about it, even when it ends in out-of-memory."""
    precision = memory.effective_precision(device, spec.precision)
    key = memory.limits_key(spec.workload, memory.device_name(device), precision)
    limits = memory.load_limits(study, key)
    try:
        return train(
            workload, hp, reporter, device=device, checkpoint=checkpoint, precision=precision,
            limits=limits, measure_noise=spec.measure_noise_scale, ema_decay=spec.ema_decay,
        )
    finally:
        memory.save_limits(study, key, limits)


def _hand_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """End a stopped worker's trial and queue a copy that resumes from its checkpoint; the copy
    counts the hand-back, which does not use up its retries after a dead worker (``RetryStaleTrial``)."""
    handed = copy.copy(study.tell(trial, state=TrialState.FAIL))
    handed.system_attrs = {**handed.system_attrs, HAND_BACKS: handed.system_attrs.get(HAND_BACKS, 0) + 1}
    queue_retry(study, handed, None)


def _stopped_within(error: BaseException) -> bool:
    """Whether the worker's stop ended the training: the stop itself, or a storage error that
    wraps it where a second signal broke a write off (an epoch's value, say), which is rolled
    back; either way the trial is handed back, not failed for good with the storage's error."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, WorkerStopped):
            return True
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "orig", None)
    return False


def _describe_error(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines[-4:]).strip()
    return f"{type(error).__name__}: {error}\n{tail}"


def _log_trial(
    trial: optuna.Trial, spec: StudySpec, hp: Any, outcome: str, values: list[float] | None, reporter: Reporter
) -> None:
    shown = ", ".join(
        f"{o.metric}={v:.4g}" for o, v in zip(spec.all_objectives, values or [])
    ) or reporter.records.get("stop_detail") or f"after {reporter.epochs_done} epoch(s)"
    logger.info(
        "trial %d %s: %s | batch_size=%d %s=%.3g epochs=%d",
        trial.number, outcome, shown, hp.batch_size, lr_param_name(spec.search.lr), hp.base_lr, hp.epochs,
    )
