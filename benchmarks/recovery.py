"""Recovery under fire: kill a random worker every few seconds while a study runs.

Runs the same study twice with the same number of workers, once undisturbed and once while a
random worker is SIGKILLed (and replaced) every ``--kill-every`` seconds, and prints:
trials finished, trials lost (must be 0), epochs re-done after kills (checkpoints bound this to
the epoch in progress at each kill) and the slowdown against the undisturbed run.

    python benchmarks/recovery.py [--storage URL] [--workers 3] [--n-trials 16] [--kill-every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tuner.launch import start_workers
from tuner.spec import parse_spec
from tuner.storage import sqlalchemy_url
from tuner.study import create_study

os.environ.setdefault("TUNER_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("TUNER_HEARTBEAT_GRACE", "3")


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


def _run(url: str, name: str, workers: int, n_trials: int, checkpoints: Path, kill_every: float | None, seed: int) -> dict:
    create_study(parse_spec(_spec(name, n_trials)), url)
    rng = random.Random(seed)
    started = time.perf_counter()
    processes = start_workers(name, url, workers, device="cpu", checkpoint_dir=checkpoints)
    kills = 0
    next_kill = started + kill_every if kill_every else float("inf")
    while any(p.poll() is None for p in processes):
        for process in processes:
            if process.stdout and process.poll() is not None:
                process.stdout.read()
        if time.perf_counter() >= next_kill:
            alive = [p for p in processes if p.poll() is None]
            victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            processes.remove(victim)
            processes += start_workers(name, url, 1, device="cpu", checkpoint_dir=checkpoints)
            next_kill = time.perf_counter() + kill_every
        time.sleep(0.2)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=sqlalchemy_url(url))
    trials = study.get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if t.number not in retried]
    finished = [t for t in counted if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    by_number = {t.number: t for t in trials}
    redone = 0
    for trial in trials:
        if "retried_from" in trial.user_attrs:
            original = by_number[trial.user_attrs["retried_from"]]
            redone += original.user_attrs.get("epochs_completed", 0) - trial.user_attrs.get("resumed_from_epoch", 0)
    return {
        "wall_s": round(wall, 1),
        "kills": kills,
        "trials_finished": len(finished),
        "trials_lost": n_trials - len(finished),
        "retries": len(retried),
        "full_epochs_redone": redone,
        "epochs_trained": sum(t.user_attrs.get("epochs_completed", 0) for t in counted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="default: a fresh SQLite file")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=4.0)
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
            f"{row['retries']:>9}{row['full_epochs_redone']:>15}{row.get('slowdown', 1.0):>10}"
        )
    print("epochs re-done counts whole epochs trained again; the epoch in progress at each kill is lost too (at most one per kill).")
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "undisturbed": calm, "killed": fire}, indent=2))


if __name__ == "__main__":
    main()
