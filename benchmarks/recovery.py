"""Recovery under fire: kill a random worker every few seconds while a study runs.

Runs the same study twice with the same number of workers, once undisturbed and once while a
random worker is SIGKILLed (and replaced) every ``--kill-every`` seconds, and prints:
trials finished, trials lost (must be 0), epochs that a killed trial had reported and its retry
trained again, as far as the storage shows them (see ``epochs_trained_twice``), and the slowdown
against the undisturbed run.

    python benchmarks/recovery.py [--storage URL] [--workers 3] [--n-trials 16] [--kill-every 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.launch import worker_command
from tuner.spec import parse_spec
from tuner.storages import make_storage
from tuner.study import create_study

os.environ.setdefault("TUNER_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("TUNER_HEARTBEAT_GRACE", "3")


class Redone(NamedTuple):
    """Epochs seen trained twice, and retries that cannot be measured, since they died unwritten."""

    epochs: int
    unmeasured: int


def _last_stored_epoch(trial: FrozenTrial) -> int:
    """The last epoch the storage holds of a trial: its values' steps are the epoch count."""
    return max(int(trial.user_attrs.get("epochs_completed", 0)), max(trial.intermediate_values, default=0))


def epochs_trained_twice(trials: Sequence[FrozenTrial]) -> Redone:
    """Epochs a killed trial had reported that its retry trained again, summed over retries, each
    at least 0.

    A lower bound, not a count: a running trial's epochs reach the storage at most once a second
    (``tuner.train.reporter``), so an epoch reported in a killed worker's last second is not
    there to compare. What is exact is where a retry resumed (``resumed_from_epoch``, its
    checkpoint's epoch) and how far it trained, both written as it ends. A retry killed itself
    never wrote them: it is counted as unmeasured, and a retry of it compares against what it
    inherited.
    """
    by_number = {t.number: t for t in trials}
    epochs = unmeasured = 0
    for retry in trials:
        history = retry.system_attrs.get("retry_history")
        if not history:
            continue
        killed = by_number[history[-1]]
        # A retry inherits the user attributes of the trial it retries: only its own records name that trial.
        if retry.user_attrs.get("retried_from") != killed.number:
            unmeasured += 1
            continue
        resumed = int(retry.user_attrs.get("resumed_from_epoch", 0))
        trained_to = int(retry.user_attrs.get("epochs_completed", resumed))
        epochs += max(0, min(_last_stored_epoch(killed), trained_to) - resumed)
    return Redone(epochs, unmeasured)


def _spec(name: str, n_trials: int) -> dict:
    return {
        "name": name,
        "workload": "digits_cnn",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "budget": {"n_trials": n_trials},
        "search": {
            "batch_size": {"low": 16, "high": 64, "scale": "pow2"},
            "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "epochs": {"low": 4, "high": 8},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "max_retries": 10,
    }


def _start(name: str, url: str, index: int, checkpoints: Path) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "TUNER_STORAGE": url}
    command = worker_command(name, device="cpu", threads=1, worker_index=index, checkpoint_dir=checkpoints)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, time.perf_counter()


def _run(url: str, name: str, workers: int, n_trials: int, checkpoints: Path, kill_every: float | None, seed: int) -> dict:
    create_study(parse_spec(_spec(name, n_trials)), url)
    rng = random.Random(seed)
    started = time.perf_counter()
    processes = [_start(name, url, index, checkpoints) for index in range(workers)]
    kills = 0
    next_kill = started + kill_every if kill_every else float("inf")
    while any(process.poll() is None for process, _ in processes):
        now = time.perf_counter()
        # Only a worker that has had time to start is worth killing: it holds a trial.
        ripe = [entry for entry in processes if entry[0].poll() is None and now - entry[1] > 5.0]
        if now >= next_kill and ripe:
            victim = rng.choice(ripe)
            victim[0].send_signal(signal.SIGKILL)
            victim[0].wait()
            kills += 1
            processes.remove(victim)
            processes.append(_start(name, url, workers + kills, checkpoints))
            next_kill = now + kill_every
        time.sleep(0.2)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=make_storage(url, create=False))
    trials = study.get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if t.number not in retried]
    finished = [t for t in counted if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    redone = epochs_trained_twice(trials)
    return {
        "wall_s": round(wall, 1),
        "kills": kills,
        "trials_finished": len(finished),
        "trials_lost": n_trials - len(finished),
        "retries": len(retried),
        "epochs_redone": redone.epochs,
        "retries_unmeasured": redone.unmeasured,
        "epochs_trained": sum(t.user_attrs.get("epochs_completed", 0) for t in counted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="default: a fresh SQLite file")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.storage or f"sqlite:///{folder}/recovery.db"
        tag = str(int(time.time()))
        calm = _run(url, f"recovery-calm-{tag}", args.workers, args.n_trials, Path(folder) / "ckpt", None, args.seed)
        fire = _run(url, f"recovery-fire-{tag}", args.workers, args.n_trials, Path(folder) / "ckpt", args.kill_every, args.seed)
    fire["slowdown"] = round(fire["wall_s"] / calm["wall_s"], 2)
    print(f"{'run':<12}{'wall_s':>8}{'kills':>7}{'finished':>10}{'lost':>6}{'retries':>9}{'epochs_redone':>15}{'slowdown':>10}")
    for label, row in (("undisturbed", calm), ("killed", fire)):
        print(
            f"{label:<12}{row['wall_s']:>8}{row['kills']:>7}{row['trials_finished']:>10}{row['trials_lost']:>6}"
            f"{row['retries']:>9}{row['epochs_redone']:>15}{row.get('slowdown', 1.0):>10}"
        )
    print(
        "epochs_redone: epochs a killed trial had reported that its retry trained again, as the storage\n"
        "shows them. A lower bound: a running trial's epochs are written at most once a second, so one\n"
        "reported in a worker's last second before its kill is not seen. The epoch in progress at each\n"
        f"kill is lost too. Retries killed in turn before they wrote where they resumed: {fire['retries_unmeasured']}."
    )
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "undisturbed": calm, "killed": fire}, indent=2))


if __name__ == "__main__":
    main()
