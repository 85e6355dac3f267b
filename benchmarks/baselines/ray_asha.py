"""Ray Tune with ASHA, as its documentation sets it up: random search over the space, the ASHA
scheduler stopping trials at rungs of 1, 3, 9 epochs, one trial at a time.

A trial trains with tuner's loop on tuner's bundled workload (the same model, data and
learning-rate schedule as tuner's trials), so that only the search differs. Needs
``pip install -e '.[benchmarks]'``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV, JSON or TensorBoard files per trial
os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")  # draw the next trial when one can start, not hundreds ahead

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from tuner.space import Hyperparameters  # noqa: E402
from tuner.spec import Objective  # noqa: E402
from tuner.train.loop import train  # noqa: E402
from tuner.train.reporter import Reporter  # noqa: E402
from tuner.workloads import load_torch_workload  # noqa: E402

METRIC = "val_accuracy"


class _TuneReporter(Reporter):
    """Each epoch goes to Ray Tune, whose scheduler decides whether the trial goes on."""

    def decide(self, epoch: int) -> None:
        tune.report({METRIC: self.history[-1][METRIC]})


def _trial(config: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    workload = load_torch_workload(config["workload"], "Ray Tune")
    hp = Hyperparameters(
        batch_size=config["batch_size"], lr=config["lr"], base_lr=config["lr"], epochs=config["epochs"], seed=config["seed"]
    )
    train(workload, hp, _TuneReporter(optuna.trial.FixedTrial({}, 0), [Objective(metric=METRIC)]), device=torch.device("cpu"))


class _EpochBudget(tune.Stopper):
    """Stops the whole run once the epochs trained reach the budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.epochs = 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.epochs += 1
        return False

    def stop_all(self) -> bool:
        return self.epochs >= self.budget


class _Accounting(tune.Callback):
    """(epochs so far, wall seconds, accuracy of a trial that trained all its epochs or None),
    one JSON line each in ``path``: Tune runs a copy of its callbacks, not the object given."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.epochs = 0

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.epochs += 1

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        finished = result.get("training_iteration") == trial.config["epochs"]
        event = (self.epochs, time.perf_counter() - self.started, result.get(METRIC) if finished else None)
        with self.path.open("a") as lines:
            lines.write(json.dumps(event) + "\n")


def run(workload: str, budget: int, seed: int, folder: Path, batch_sizes: list[int], epochs: tuple[int, int]) -> list[tuple[int, float, float | None]]:
    """One Ray Tune run until ``budget`` epochs are trained."""
    logging.getLogger("ray").setLevel(logging.ERROR)  # the trials drawn but never started
    if not ray.is_initialized():
        # Ray's workers import this module by name, as the driver did, from the benchmarks folder.
        path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
        ray.init(
            num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    low, high = epochs
    space = {
        "workload": workload,
        "batch_size": tune.choice(batch_sizes),
        "lr": tune.loguniform(1e-4, 1e-1),
        "epochs": tune.lograndint(low, high + 1),
        "seed": tune.randint(0, 2**31 - 1),
    }
    events = folder / f"ray-{workload}-{seed}.jsonl"
    events.unlink(missing_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=ASHAScheduler(max_t=high, grace_period=1, reduction_factor=3),
            search_alg=BasicVariantGenerator(random_state=seed),
            num_samples=-1,
            max_concurrent_trials=1,
            reuse_actors=True,  # one process for every trial: Ray's start-up is not the search's cost
        ),
        run_config=tune.RunConfig(
            name=f"{workload}-{seed}", storage_path=str(folder / "ray"), stop=_EpochBudget(budget),
            callbacks=[_Accounting(events)], verbose=0, failure_config=tune.FailureConfig(fail_fast=True),
        ),
    )
    tuner.fit()
    return [tuple(json.loads(line)) for line in events.read_text().splitlines()]
