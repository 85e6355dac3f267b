"""Start local worker processes and follow the study until they are done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tuner.errors import BadInputError
from tuner.report import format_value
from tuner.spec import StudySpec
from tuner.study import budget_state

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The process id of the command that started a worker, which the worker outlives only as far
# as its current epoch (``tuner.worker``).
PARENT_ENV = "TUNER_PARENT_PID"


def worker_command(
    study_name: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    worker_index: int | None = None,
    checkpoint_dir: Path | None = None,
    artifact_dir: Path | None = None,
    keep_checkpoints: bool = False,
) -> list[str]:
    """The ``tuner worker`` command line of one local worker process."""
    command = [sys.executable, "-m", "tuner", "worker", "--study", study_name, "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    if worker_index is not None:
        command += ["--worker-index", str(worker_index)]
    if checkpoint_dir is not None:
        command += ["--checkpoint-dir", str(checkpoint_dir)]
    if artifact_dir is not None:
        command += ["--artifact-dir", str(artifact_dir)]
    if keep_checkpoints:
        command.append("--keep-checkpoints")
    return command


def start_workers(
    study_name: str,
    storage_url: str,
    count: int,
    *,
    device: str = "auto",
    environments: Sequence[dict[str, str]] | None = None,
    threads: int | None = None,
    checkpoint_dir: Path | None = None,
    artifact_dir: Path | None = None,
    keep_checkpoints: bool = False,
    first_index: int | None = None,
) -> list[subprocess.Popen[str]]:
    """Start ``count`` workers; the storage URL travels in the environment, not on the command
    line, so a password does not show in the process list. Without ``threads`` each, the CPUs
    this process may use are shared out so that the workers do not oversubscribe them. A worker starts
    with SIGINT and SIGTERM held until its stop handler is in place (``run_worker``): one sent
    while it imports torch would otherwise kill it, or be lost where the signals are ignored (a
    script's ``&``).

    Worker K's index, its sampler's seed offset, is ``first_index + K``. Without
    ``first_index`` it is drawn from this host name and process id, as a lone worker's offset
    is: the workers of ``tuner worker --gpus`` on several machines, or started after an earlier
    launch, would otherwise repeat each other's seeds and propose the same trials. ``tuner run``
    passes 0 for a fresh study, so that a seeded local run repeats.

    A worker stops as on SIGTERM once this process is gone (``PARENT_ENV``): killed with
    SIGKILL or by the kernel's OOM killer, it could forward no signal, and its workers trained
    on unwatched beside those of the same command run again."""
    if first_index is None:
        from tuner.worker import seed_offset  # imports torch, which only these launches need

        first_index = seed_offset(None)
    threads = threads or max(1, _usable_cpus() // count)
    processes = []
    with _stop_signals_held():
        for index in range(count):
            env = {**os.environ, "TUNER_STORAGE": storage_url, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
            if environments:
                env.update(environments[index])
            command = worker_command(
                study_name, device=device, threads=threads, worker_index=first_index + index,
                checkpoint_dir=checkpoint_dir, artifact_dir=artifact_dir, keep_checkpoints=keep_checkpoints,
            )
            processes.append(
                # A session of its own: a Ctrl-C reaches the workers once, forwarded by ``run_workers``.
                subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True,
                )
            )
    return processes


def _usable_cpus() -> int:
    """The CPUs this process may run on: a Slurm task's or a pinned container's, where the
    machine's count would give each worker threads for CPUs it cannot use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS pins no process


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait, pending, until the block ends; a process started meanwhile
    inherits the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def gpu_environments(
    gpus: str, workers_per_gpu: int = 1, *, device_count: int, visible: str | None = None
) -> list[dict[str, str]]:
    """One environment per worker process, its ``CUDA_VISIBLE_DEVICES`` naming one GPU.

    ``gpus`` is ``all`` or indices as torch counts them here (``0,2``); ``workers_per_gpu``
    workers share each GPU, spread round-robin. Under a ``visible`` list of our own (this
    process's ``CUDA_VISIBLE_DEVICES``), index K is its K-th entry, as it is for torch.
    """
    if device_count == 0:
        raise BadInputError("--gpus needs CUDA GPUs and none is available here; use --device cpu or auto.")
    if gpus == "all":
        indices = list(range(device_count))
    else:
        try:
            indices = list(dict.fromkeys(int(part) for part in gpus.split(",")))
        except ValueError:
            raise BadInputError(f"--gpus takes 'all' or GPU indices like 0,2, not {gpus!r}.") from None
        unknown = [index for index in indices if not 0 <= index < device_count]
        if unknown:
            raise BadInputError(
                f"--gpus names GPU {unknown[0]}, but this machine has GPUs 0 to {device_count - 1}."
            )
    names = [name.strip() for name in visible.split(",")] if visible else list(map(str, range(device_count)))
    return [{"CUDA_VISIBLE_DEVICES": names[index]} for _ in range(workers_per_gpu) for index in indices]


def _relay(process: subprocess.Popen[str], console: Console, prefix: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        console.print(f"{prefix} {line.rstrip()}", highlight=False, markup=False)


def _summary(study: optuna.Study, spec: StudySpec) -> tuple[int, str]:
    state = budget_state(study, spec)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = sum(1 for t in trials if t.state == TrialState.PRUNED)
    text = f"running {state.running} · pruned {pruned}"
    if len(spec.all_objectives) == 1 and any(t.state == TrialState.COMPLETE for t in trials):
        text = f"best {spec.all_objectives[0].metric}={format_value(study.best_value)} · " + text
    return state.finished, text


@dataclass
class Finished:
    """How a run of local workers ended: their exit codes, and the first stop signal this
    process got (Ctrl-C or SIGTERM), if any."""

    codes: list[int]
    stopped_by: signal.Signals | None = None


def run_workers(
    study: optuna.Study, spec: StudySpec, storage_url: str, count: int, console: Console, **options: Any
) -> Finished:
    """Start ``count`` workers (``options`` as ``start_workers`` takes them) and follow them
    until they exit. Each SIGINT or SIGTERM to this process is forwarded to the live workers: the
    first stops them after their current epoch, a second abandons it. The signals are held from
    before the first worker starts until the handler knows them all, so none is missed.

    A hang-up (the terminal closed, the ssh link lost) stops them as SIGTERM does: in sessions of
    their own, the workers would train on with no one following them. Under ``nohup``, which
    ignores it, they run on as asked."""
    received: list[signal.Signals] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum))
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        then = "after their current epoch" if len(received) == 1 else "now, their current epoch abandoned"
        # Printed by a thread of its own: the handler may have interrupted this thread in the
        # middle of importing one of rich's modules, which its print would then find half made.
        threading.Thread(target=console.print, args=(f"{received[-1].name}: stopping workers {then}",)).start()

    with _stop_signals_held():
        processes = start_workers(study.study_name, storage_url, count, **options)
        hang_up = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
        previous = {sig: signal.signal(sig, forward) for sig in (*STOP_SIGNALS, *hang_up)}
    try:
        codes = follow(study, spec, processes, console)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return Finished(codes, received[0] if received else None)


def follow(
    study: optuna.Study,
    spec: StudySpec,
    processes: list[subprocess.Popen[str]],
    console: Console,
    poll_s: float = 1.0,
) -> list[int]:
    """Relay the workers' lines and show trials done / budget, best value, pruned count, until
    every worker has exited; return their exit codes."""
    relays = [
        threading.Thread(target=_relay, args=(p, console, f"[w{i}]"), daemon=True)
        for i, p in enumerate(processes)
    ]
    for relay in relays:
        relay.start()
    _show_progress(study, spec, processes, console, poll_s)
    for relay in relays:
        relay.join(timeout=5)
    return [p.wait() for p in processes]


def _show_progress(
    study: optuna.Study,
    spec: StudySpec,
    processes: list[subprocess.Popen[str]],
    console: Console,
    poll_s: float,
) -> None:
    total = spec.budget.n_trials
    last = None
    with Progress(
        TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(), console=console, disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("trials", total=total, info="")
        while True:
            done = all(p.poll() is not None for p in processes)
            finished, info = _summary(study, spec)
            progress.update(task, completed=finished, info=info)
            if not console.is_terminal and (finished, info) != last:
                console.print(f"trials {finished}/{total or '-'} · {info}", highlight=False, markup=False)
                last = (finished, info)
            if done:
                break
            time.sleep(poll_s)
