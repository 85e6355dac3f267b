"""Batch science on the bundled workloads: schedules, and the critical batch against the noise scale.

1. For the ``constant``, ``ramp`` (Smith et al. 2017) and ``adaptive`` (noise scale) batch
   schedules, a study of the same budget and seed finds each one's best batch size and rate
   (SGD with momentum, fixed epochs, no pruning); its best trial gives the epochs and the training
   seconds to reach a target validation accuracy, and the final accuracy.
2. For a constant schedule at effective batches 16 ... 1024, each with the best of a few rates,
   the optimizer steps to reach the target. McCandlish et al. 2018 predict
   ``S = S_min (1 + B_crit / B)``: steps fall with the batch until about ``B_crit`` and then stop
   falling. The fitted ``B_crit`` is set beside the gradient noise scale that the B=128 run
   measured when it reached the target.

Prints a table, writes JSON and a PNG of both parts.

    python benchmarks/batch_science.py            # quick: digits_mlp, about a minute on 2 cores
    python benchmarks/batch_science.py --full     # also digits_cnn, more trials and rates
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

from tuner.space import Hyperparameters
from tuner.spec import Objective, parse_spec
from tuner.study import create_study
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.worker import WorkerOptions, run_worker
from tuner.workloads import load_workload

SCHEDULES = ("constant", "ramp", "adaptive")
BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
CPU = torch.device("cpu")


def _schedule_spec(name: str, workload: str, schedule: str, n_trials: int, epochs: int) -> dict:
    return {
        "name": name,
        "workload": workload,
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "budget": {"n_trials": n_trials},
        "search": {
            "batch_size": {"low": 16, "high": 512, "scale": "pow2"},
            "lr": {"low": 1e-3, "high": 0.3, "log": True, "scale_with_batch": "sqrt", "reference_batch_size": 128},
            "epochs": {"low": epochs, "high": epochs},
            "optimizer": {"choices": ["sgd"]},
            "batch_schedule": {"choices": [schedule]},
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": max(1, n_trials // 2)},
        "pruner": {"name": "none"},
    }


def _to_target(history: list[dict], target: float) -> tuple[int | None, float | None]:
    """The first epoch whose validation accuracy reaches ``target``, and the seconds it took."""
    for entry in history:
        if entry["val_accuracy"] >= target:
            return int(entry["epoch"]), entry["train_time_s"]
    return None, None


def schedules(workload: str, n_trials: int, epochs: int, target: float, folder: Path) -> list[dict]:
    """Part 1: one study per schedule; each one's best trial against the target."""
    url = f"sqlite:///{folder / f'{workload}-schedules.db'}"
    rows = []
    for schedule in SCHEDULES:
        name = f"{workload}-{schedule}"
        create_study(parse_spec(_schedule_spec(name, workload, schedule, n_trials, epochs)), url)
        started = time.perf_counter()
        run_worker(name, url, WorkerOptions(device="cpu", checkpoint_dir=folder / "checkpoints"))
        best = optuna.load_study(study_name=name, storage=url).best_trial
        history = best.user_attrs["history"]
        epochs_to_target, seconds_to_target = _to_target(history, target)
        rows.append({
            "workload": workload,
            "schedule": schedule,
            "batch_size": best.params["batch_size"],
            "base_lr": best.params["base_lr"],
            "batch_size_per_epoch": best.user_attrs["batch_size_per_epoch"],
            "epochs_to_target": epochs_to_target,
            "seconds_to_target": seconds_to_target,
            "final_accuracy": best.value,
            "train_time_s": best.user_attrs["train_time_s"],
            "curve": [(entry["train_time_s"], entry["val_accuracy"]) for entry in history],
            "study_seconds": time.perf_counter() - started,
        })
    return rows


class _StopAtTarget(Reporter):
    """Records like a trial's reporter and stops training once the target is reached."""

    def __init__(self, target: float) -> None:
        super().__init__(optuna.trial.FixedTrial({}, 0), [Objective(metric="val_accuracy")])
        self.target = target

    def decide(self, epoch: int) -> None:
        if self.history[-1]["val_accuracy"] >= self.target:
            raise optuna.TrialPruned("target reached")


def steps_to_target(workload_name: str, rates: list[float], max_epochs: int, target: float) -> list[dict]:
    """Part 2: per effective batch, the fewest steps to the target over ``rates`` (SGD with
    momentum, the rate given at batch 128 and scaled by sqrt)."""
    workload = load_workload(workload_name)
    train_size = len(workload.train_data)  # type: ignore[union-attr]
    rows = []
    for batch_size in BATCH_SIZES:
        if batch_size > train_size:
            continue
        best: dict | None = None
        for rate in rates:
            lr = rate * math.sqrt(batch_size / 128)
            hp = Hyperparameters(batch_size=batch_size, lr=lr, base_lr=rate, epochs=max_epochs, optimizer="sgd", seed=0)
            reporter = _StopAtTarget(target)
            try:
                train(workload, hp, reporter, device=CPU, measure_noise=True)
            except optuna.TrialPruned:
                pass
            epochs, _ = _to_target(reporter.history, target)
            if epochs is None:
                continue
            steps = epochs * math.ceil(train_size / batch_size)
            if best is None or steps < best["steps"]:
                noise = reporter.records["gradient_noise_scale"][-1]
                best = {"batch_size": batch_size, "base_lr": rate, "epochs": epochs, "steps": steps, "noise_scale": noise}
        rows.append(best or {"batch_size": batch_size, "steps": None})
    return rows


def fit_critical_batch(rows: list[dict]) -> dict:
    """Least squares of ``S = S_min + E_min / B`` over the batches that reached the target:
    ``B_crit = E_min / S_min`` (McCandlish et al. 2018, eq. 2.11)."""
    reached = [row for row in rows if row["steps"] is not None]
    inverse = np.array([1 / row["batch_size"] for row in reached])
    steps = np.array([row["steps"] for row in reached], dtype=float)
    design = np.stack([np.ones_like(inverse), inverse], axis=1)
    (s_min, e_min), *_ = np.linalg.lstsq(design, steps, rcond=None)
    noise = next((row["noise_scale"] for row in reached if row["batch_size"] == 128), None)
    return {"s_min": float(s_min), "e_min": float(e_min), "critical_batch": float(e_min / s_min) if s_min > 0 else None, "noise_scale_at_128": noise}


def _plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    curves, steps_axes = figure.subplots(1, 2)
    for row in results["schedules"]:
        seconds, accuracy = zip(*row["curve"])
        curves.plot(seconds, accuracy, marker="o", label=f"{row['workload']} {row['schedule']} (B={row['batch_size']})")
    for workload, target in results["targets"].items():
        curves.axhline(target, color="grey", linestyle=":")
    curves.set(title="best trial per batch schedule", xlabel="training seconds", ylabel="validation accuracy", ylim=(0.5, 1.0), xscale="log")
    curves.legend(fontsize=8)
    for workload, part in results["critical_batch"].items():
        reached = [row for row in part["steps"] if row["steps"] is not None]
        batches = np.array([row["batch_size"] for row in reached])
        line = steps_axes.loglog(batches, [row["steps"] for row in reached], marker="o", label=f"{workload}: measured")[0]
        fit = part["fit"]
        grid = np.geomspace(batches.min(), batches.max(), 50)
        steps_axes.loglog(grid, fit["s_min"] + fit["e_min"] / grid, color=line.get_color(), linestyle="--", label=f"{workload}: fit, B_crit={fit['critical_batch']:.0f}")
        if fit["noise_scale_at_128"]:
            steps_axes.axvline(fit["noise_scale_at_128"], color=line.get_color(), linestyle=":", label=f"{workload}: noise scale {fit['noise_scale_at_128']:.0f}")
    steps_axes.set(title="optimizer steps to the target accuracy", xlabel="effective batch size", ylabel="steps")
    steps_axes.set_xticks(BATCH_SIZES, labels=[str(size) for size in BATCH_SIZES])
    steps_axes.minorticks_off()
    steps_axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _print(results: dict) -> None:
    print(f"\n{'workload':<12} {'schedule':<9} {'batch':>5} {'base_lr':>8} {'epochs to target':>17} {'s to target':>12} {'final acc':>9}  batches per epoch")
    for row in results["schedules"]:
        epochs = row["epochs_to_target"] or "not reached"
        seconds = f"{row['seconds_to_target']:.2f}" if row["seconds_to_target"] else "-"
        print(f"{row['workload']:<12} {row['schedule']:<9} {row['batch_size']:>5} {row['base_lr']:>8.3g} {epochs!s:>17} {seconds:>12} {row['final_accuracy']:>9.4f}  {row['batch_size_per_epoch']}")
    for workload, part in results["critical_batch"].items():
        print(f"\n{workload}: steps to {results['targets'][workload]:.0%} validation accuracy (constant schedule, best rate)")
        print(f"{'batch':>6} {'steps':>6} {'epochs':>6} {'base_lr':>8} {'noise scale':>12}")
        for row in part["steps"]:
            if row["steps"] is None:
                print(f"{row['batch_size']:>6} {'not reached':>6}")
            else:
                print(f"{row['batch_size']:>6} {row['steps']:>6} {row['epochs']:>6} {row['base_lr']:>8.3g} {row['noise_scale'] or 0:>12.1f}")
        fit = part["fit"]
        print(f"fit S = S_min (1 + B_crit / B): S_min={fit['s_min']:.1f}, B_crit={fit['critical_batch']:.0f}; "
              f"noise scale measured at B=128 when it reached the target: {fit['noise_scale_at_128']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Both digits workloads, more trials and rates.")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent.parent / "docs" / "batch-science.png")
    args = parser.parse_args()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(2)
    targets = {"digits_mlp": 0.95, "digits_cnn": 0.95} if args.full else {"digits_mlp": 0.95}
    n_trials, epochs = (24, 12) if args.full else (8, 8)
    rates = [0.003, 0.01, 0.03, 0.1, 0.3] if args.full else [0.01, 0.03, 0.1]
    max_epochs = 30 if args.full else 16
    results: dict = {"args": {"full": args.full}, "targets": targets, "schedules": [], "critical_batch": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for workload, target in targets.items():
            results["schedules"] += schedules(workload, n_trials, epochs, target, Path(folder))
            rows = steps_to_target(workload, rates, max_epochs, target)
            results["critical_batch"][workload] = {"steps": rows, "fit": fit_critical_batch(rows)}
    results["seconds"] = time.perf_counter() - started
    _print(results)
    print(f"\n{results['seconds']:.0f} s; wrote {args.out} and {args.plot}")
    args.out.write_text(json.dumps(results, indent=1))
    _plot(results, args.plot)


if __name__ == "__main__":
    main()
