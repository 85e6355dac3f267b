"""tuner: tune batch size, learning rate and epochs jointly in an Optuna study."""

from tuner.errors import BadInputError, SpecError, StorageError, StudyNotFoundError, TunerError, WorkloadError
from tuner.report import best_trial
from tuner.space import Hyperparameters
from tuner.spec import StudySpec, load_spec, parse_spec
from tuner.study import create_study, load_study
from tuner.train.reporter import Reporter
from tuner.worker import WorkerOptions, run_worker
from tuner.workloads import Classification, Workload

__all__ = [
    "BadInputError",
    "Classification",
    "Hyperparameters",
    "Reporter",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "StudySpec",
    "TunerError",
    "WorkerOptions",
    "Workload",
    "WorkloadError",
    "best_trial",
    "create_study",
    "load_spec",
    "load_study",
    "parse_spec",
    "run_worker",
]
