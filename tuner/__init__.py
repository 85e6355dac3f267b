"""tuner: tune batch size, learning rate and epochs jointly in an Optuna study.

The public API is imported on first use, so that commands which only read a study (``tuner
best``, ``status``, ``dashboard``) start without loading PyTorch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from optuna.exceptions import ExperimentalWarning

# Optuna marks what tuner builds on experimental (heartbeats, the retry callback, metric names,
# artifacts, the gRPC client): warned at tuner's own calls, which a user cannot change. A user's
# own calls to experimental Optuna APIs still warn.
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=r"tuner(\.|$)")

_EXPORTS = {
    "BadInputError": "tuner.errors",
    "SpecError": "tuner.errors",
    "StorageError": "tuner.errors",
    "StudyNotFoundError": "tuner.errors",
    "TunerError": "tuner.errors",
    "WorkloadError": "tuner.errors",
    "best_trial": "tuner.report",
    "Hyperparameters": "tuner.space",
    "StudySpec": "tuner.spec",
    "load_spec": "tuner.spec",
    "parse_spec": "tuner.spec",
    "create_study": "tuner.study",
    "load_study": "tuner.study",
    "Reporter": "tuner.train.reporter",
    "WorkerOptions": "tuner.worker",
    "run_worker": "tuner.worker",
    "Classification": "tuner.workloads",
    "Workload": "tuner.workloads",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tuner.errors import BadInputError, SpecError, StorageError, StudyNotFoundError, TunerError, WorkloadError
    from tuner.report import best_trial
    from tuner.space import Hyperparameters
    from tuner.spec import StudySpec, load_spec, parse_spec
    from tuner.study import create_study, load_study
    from tuner.train.reporter import Reporter
    from tuner.worker import WorkerOptions, run_worker
    from tuner.workloads import Classification, Workload


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
