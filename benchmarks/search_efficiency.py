"""Search efficiency: the best validation accuracy each method finds for the same epochs trained.

Every method runs one worker, on the same machine, until it has trained ``--budget`` epochs in
all (pruned trials count the epochs they trained), once per seed:

- ``tuner``: tuner's default spec (only the search space given), through its worker loop;
- ``optuna``: ``baselines/optuna_pytorch.py``, Optuna's PyTorch example (TPE, median pruner,
  10 epochs, batch size and learning rate suggested independently);
- ``random``: random batch size, learning rate and epochs, no pruning;
- ``ray``: Ray Tune's ASHA scheduler over random search (``baselines/ray_asha.py``), trials
  trained by tuner's loop, when ``ray[tune]`` is installed (``pip install -e '.[benchmarks]'``);
- ``halving`` (``sklearn_mlp`` only): scikit-learn's ``HalvingRandomSearchCV`` over the same
  batch sizes and learning rates, with ``max_iter`` (epochs) as its resource;
- ``tuner-hyperband``, ``tuner-sha`` (with ``--methods`` only): tuner's default spec with the
  Hyperband or successive-halving pruner instead of the median rule.

A trial's value counts from the moment it finishes; only completed trials count, since a pruned
trial's model is not the one its parameters would train. For each method: the best accuracy at
25, 50 and 100% of the budget (median and range over seeds), and the epochs and wall seconds to
reach the target: the lowest of the methods' median final accuracies, so every method reaches it.

    python benchmarks/search_efficiency.py [--full] [--seeds 5] [--budget 60] [--workloads digits_cnn]
        [--methods tuner,tuner-hyperband,tuner-sha,optuna] [--epochs 2,10]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).parent))

from baselines import optuna_pytorch  # noqa: E402
from tuner.spec import parse_spec  # noqa: E402
from tuner.study import create_study  # noqa: E402
from tuner.worker import WorkerOptions, run_worker  # noqa: E402
from tuner.workloads.datasets import split  # noqa: E402

# (epochs trained so far, wall seconds so far, accuracy of a completed trial or None)
Event = tuple[int, float, float | None]
FRACTIONS = (0.25, 0.5, 1.0)
BATCH_HIGH = {"digits_cnn": 1024, "breast_cancer_mlp": 256, "sklearn_mlp": 1024}
# Searched up to the baseline's fixed 10 epochs, what one would train by hand: up to 20, the
# median rule pruned the long trials late, after most of their epochs, against short trials
# already decayed at the same epoch (benchmarks/README.md, "Choosing the epoch range").
EPOCHS = {"low": 2, "high": 10}


def _search(workload: str) -> dict:
    return {
        "batch_size": {"low": 16, "high": BATCH_HIGH[workload], "scale": "pow2"},
        "lr": {"low": 1e-4, "high": 1e-1, "log": True},
        "epochs": EPOCHS,
    }


def run_tuner(workload: str, budget: int, seed: int, folder: Path, sampler: dict | None = None, pruner: dict | None = None) -> list[Event]:
    """tuner's worker, its budget raised a few trials at a time until the epochs are spent."""
    name = f"{workload}-{seed}-{time.time_ns()}"
    url = f"sqlite:///{folder}/{name}.db"
    spec = {
        "name": name, "workload": workload, "objective": {"metric": "val_accuracy"},
        "budget": {"n_trials": 1}, "search": _search(workload),
        "sampler": {**(sampler or {}), "seed": seed},
        **({"pruner": pruner} if pruner else {}),
    }
    options = WorkerOptions(device="cpu", checkpoint_dir=folder / "ckpt", artifact_dir=folder / "artifacts")
    started = time.time()  # the clock of the trials' datetimes
    events: list[Event] = []
    n_trials = 0
    while not events or events[-1][0] < budget:
        n_trials += 4
        create_study(parse_spec({**spec, "budget": {"n_trials": n_trials}}), url)
        # A new seed offset for each round: the same one would replay the sampler's random draws.
        run_worker(name, url, replace(options, worker_index=n_trials))
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        done = sorted((t for t in trials if t.datetime_complete), key=lambda t: t.datetime_complete)
        epochs = 0
        events = []
        for trial in done:
            epochs += trial.user_attrs.get("epochs_completed", 0)
            value = trial.value if trial.state == TrialState.COMPLETE else None
            events.append((epochs, (trial.datetime_complete.timestamp() - started), value))
    return events


def run_optuna(workload: str, budget: int, seed: int, folder: Path) -> list[Event]:
    study = optuna_pytorch.create_study(seed)
    started = time.perf_counter()
    events: list[Event] = []

    def account(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        epochs = (events[-1][0] if events else 0) + len(trial.intermediate_values)
        # Optuna gives a pruned trial its last reported value; like every method's, it does not count.
        value = trial.value if trial.state == TrialState.COMPLETE else None
        events.append((epochs, time.perf_counter() - started, value))
        if epochs >= budget:
            study.stop()

    study.optimize(optuna_pytorch.make_objective(workload, seed), callbacks=[account])
    return events


def run_halving(workload: str, budget: int, seed: int, folder: Path) -> list[Event]:
    """HalvingRandomSearchCV on the validation split, with as many candidates as fit the budget."""
    from scipy.stats import loguniform
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401
    from sklearn.model_selection import HalvingRandomSearchCV, PredefinedSplit
    from sklearn.neural_network import MLPClassifier

    x_train, x_val, y_train, y_val = split("digits")
    features, targets = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    fold = PredefinedSplit([-1] * len(x_train) + [0] * len(x_val))
    low, high, factor = EPOCHS["low"], EPOCHS["high"], 3
    rounds = 1 + int(np.log(high / low) / np.log(factor))
    space = {
        "batch_size": [2**k for k in range(4, 11)],
        "learning_rate_init": loguniform(1e-4, 1e-1),
    }
    search = HalvingRandomSearchCV(
        MLPClassifier(hidden_layer_sizes=(128,), random_state=seed), space,
        n_candidates=max(factor ** (rounds - 1), budget // (low * rounds)), resource="max_iter",
        min_resources=low, max_resources=high, factor=factor, cv=fold, refit=False, random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(features, targets)
    results = search.cv_results_
    events: list[Event] = []
    epochs, wall = 0, 0.0
    for k in np.argsort(results["iter"], kind="stable"):
        epochs += int(results["n_resources"][k])
        wall += float(results["mean_fit_time"][k] + results["mean_score_time"][k])
        events.append((epochs, wall, float(results["mean_test_score"][k])))
    return events


def run_ray(workload: str, budget: int, seed: int, folder: Path) -> list[Event]:
    from baselines import ray_asha

    batch_sizes = [2**k for k in range(4, BATCH_HIGH[workload].bit_length())]
    return ray_asha.run(workload, budget, seed, folder, batch_sizes, (EPOCHS["low"], EPOCHS["high"]))


METHODS: dict[str, Callable[..., list[Event]]] = {
    "tuner": run_tuner,
    "optuna": run_optuna,
    "random": lambda workload, budget, seed, folder: run_tuner(
        workload, budget, seed, folder, sampler={"name": "random", "first_trial": "sampler"}, pruner={"name": "none"}
    ),
    "halving": run_halving,
    "ray": run_ray,
    # tuner's default spec with another pruner: what the default was chosen against.
    "tuner-hyperband": lambda workload, budget, seed, folder: run_tuner(workload, budget, seed, folder, pruner={"name": "hyperband"}),
    "tuner-sha": lambda workload, budget, seed, folder: run_tuner(workload, budget, seed, folder, pruner={"name": "sha"}),
}
WORKLOAD_METHODS = {
    "digits_cnn": ("tuner", "optuna", "random", "ray"),
    "breast_cancer_mlp": ("tuner", "optuna", "random", "ray"),
    "sklearn_mlp": ("tuner", "random", "halving"),
}


def best_by(events: list[Event], epochs: float) -> float | None:
    values = [value for spent, _, value in events if spent <= epochs and value is not None]
    return max(values, default=None)


# tuner's metrics pass through float32 and Optuna's example computes float64: the same accuracy
# (a multiple of 1 / validation samples) differs in the eighth digit, more than enough to fail
# ">=" against a target that is the other's value.
SAME_ACCURACY = 1e-6


def reach(events: list[Event], target: float, budget: int) -> tuple[int | None, float | None]:
    for spent, wall, value in events:
        if spent > budget:
            break
        if value is not None and value >= target - SAME_ACCURACY:
            return spent, round(wall, 1)
    return None, None


def summarize(runs: dict[str, list[list[Event]]], budget: int) -> list[dict]:
    finals = {m: [best_by(e, budget) or 0.0 for e in seeds] for m, seeds in runs.items()}
    target = min(statistics.median(values) for values in finals.values())
    rows = []
    for method, seeds in runs.items():
        row: dict = {"method": method, "target": round(target, 4)}
        for fraction in FRACTIONS:
            values = [best_by(events, fraction * budget) or 0.0 for events in seeds]
            row[f"best_at_{int(fraction * 100)}"] = {
                "median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            }
        reached = [reach(events, target, budget) for events in seeds]
        epochs = [e if e is not None else float("inf") for e, _ in reached]
        walls = [w if w is not None else float("inf") for _, w in reached]
        row["epochs_to_target"] = statistics.median(epochs)
        row["wall_s_to_target"] = round(statistics.median(walls), 1)
        row["seeds_reaching_target"] = sum(e is not None for e, _ in reached)
        rows.append(row)
    return rows


def curve(events: list[Event], budget: int) -> list[float | None]:
    return [best_by(events, spent) for spent in range(1, budget + 1)]


def plot(results: dict, budget: int, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(results), 4), layout="constrained")
    for axes, (workload, runs) in zip(figure.subplots(1, len(results), squeeze=False)[0], results.items()):
        lowest = []
        for method, seeds in runs.items():
            curves = np.array([[np.nan if v is None else v for v in curve(e, budget)] for e in seeds], dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # epochs before any run has finished a trial
                median = np.nanmedian(curves, axis=0)
            axes.plot(range(1, budget + 1), median, label=method)
            # A method may finish no trial before a twentieth of the budget (Optuna's example
            # trains 10 epochs a trial): its lowest point from there on, inf if it has none.
            lowest.append(np.nanmin(median[budget // 20:], initial=np.inf))
        # From a twentieth of the budget on: the first trials' low accuracies would flatten the race.
        if np.isfinite(min(lowest)):
            axes.set_ylim(bottom=min(lowest) - 0.005)
        axes.set(title=workload, xlabel="epochs trained", ylabel="best val_accuracy (median over seeds)")
        axes.legend()
    figure.savefig(path, dpi=100)


def _format(row: dict) -> str:
    cells = [f"{row['method']:<16}"]
    for fraction in FRACTIONS:
        best = row[f"best_at_{int(fraction * 100)}"]
        cells.append(f"{best['median']:.3f} [{best['min']:.3f}-{best['max']:.3f}]".rjust(22))
    cells.append(f"{row['epochs_to_target']:>10} {row['wall_s_to_target']:>9} {row['seeds_reaching_target']:>7}")
    return "".join(cells)


def _print_table(workload: str, rows: list[dict], settings: dict) -> None:
    print(f"\n{workload}: best val_accuracy, median [min-max] over {settings['seeds']} seeds, at a share of {settings['budget_epochs']} epochs")
    print(f"{'method':<16}{'25%':>22}{'50%':>22}{'100%':>22}{'epochs':>10}{'wall s':>10}{'seeds':>8}   (to reach {rows[0]['target']})")
    for row in rows:
        print(_format(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="a budget of 400 epochs and 10 seeds")
    parser.add_argument("--budget", type=int, help="epochs per run (default 60, 400 with --full)")
    parser.add_argument("--seeds", type=int, help="default 5, 10 with --full")
    parser.add_argument("--workloads", default=",".join(WORKLOAD_METHODS))
    parser.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)} (default: each workload's own)")
    parser.add_argument(
        "--out", type=Path,
        help="where the JSON and PNG go (default results/search_efficiency; with --summarize, the runs together, only if given)",
    )
    parser.add_argument(
        "--summarize", type=Path, nargs="+",
        help="print the tables of JSONs this script wrote (the methods of runs of equal budget and seeds together), running nothing",
    )
    parser.add_argument(
        "--epochs", help=f"LOW,HIGH: the epochs searched by tuner and random search (default {EPOCHS['low']},{EPOCHS['high']})"
    )
    args = parser.parse_args()
    if args.summarize:
        stored = [json.loads(path.read_text()) for path in args.summarize]
        settings = stored[0]["settings"]
        if any(other["settings"] != settings for other in stored[1:]):
            parser.error("--summarize: the runs differ in settings: " + "; ".join(str(other["settings"]) for other in stored))
        events: dict[str, dict[str, list[list[Event]]]] = {}
        for run in stored:
            for workload, runs in run["events"].items():
                events.setdefault(workload, {}).update(runs)
        summaries = {}
        for workload, runs in events.items():
            summaries[workload] = summarize(runs, settings["budget_epochs"])
            _print_table(workload, summaries[workload], settings)
        if args.out:
            _write(args.out, settings, summaries, events)
        return
    budget = args.budget or (400 if args.full else 60)
    seeds = args.seeds or (10 if args.full else 5)
    if args.epochs:
        low, high = (int(value) for value in args.epochs.split(","))
        EPOCHS.update(low=low, high=high)
    settings = {"budget_epochs": budget, "seeds": seeds, "workers": 1, "epochs_space": EPOCHS}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("tuner").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, list[list[Event]]]] = {}
    summaries = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as scratch:
        for workload in args.workloads.split(","):
            runs = results[workload] = {}
            methods = args.methods.split(",") if args.methods else WORKLOAD_METHODS[workload]
            if "ray" in methods and importlib.util.find_spec("ray") is None:
                print("ray: Ray Tune is not installed (pip install -e '.[benchmarks]'); left out")
                methods = [method for method in methods if method != "ray"]
            for method in methods:
                runs[method] = [METHODS[method](workload, budget, seed, Path(scratch)) for seed in range(seeds)]
            summaries[workload] = summarize(runs, budget)
            _print_table(workload, summaries[workload], settings)
    _write(args.out or Path(__file__).parent / "results" / "search_efficiency", settings, summaries, results)


def _write(out: Path, settings: dict, summaries: dict, events: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "summary": summaries, "events": events}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    plot(events, settings["budget_epochs"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
