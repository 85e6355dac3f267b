"""Workloads: the bundled ones by name, a user's by ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence, Sized
from typing import Any

from torch.utils.data import IterableDataset

from tuner.errors import BadInputError, SpecError, WorkloadError
from tuner.workloads.base import Classification, Report, TrainingFunction, Workload, final_metrics, train_size

# Imported when named, so a worker of another workload does not pay for scikit-learn.
BUNDLED: dict[str, str] = {
    "digits_mlp": "tuner.workloads.bundled:digits_mlp",
    "digits_cnn": "tuner.workloads.bundled:digits_cnn",
    "breast_cancer_mlp": "tuner.workloads.bundled:breast_cancer_mlp",
    "wine_mlp": "tuner.workloads.bundled:wine_mlp",
    "sklearn_mlp": "tuner.workloads.sklearn_mlp:sklearn_mlp",
}

__all__ = [
    "BUNDLED", "Classification", "Report", "TrainingFunction", "Workload", "check_batch_size", "check_loop_settings",
    "check_workload", "final_metrics", "load_spec_workload", "load_torch_workload", "load_workload",
]


def _import(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    # As under ``python -m``: the ``tuner`` script alone would leave the folder it runs from,
    # where a user's module usually lies, off the path.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WorkloadError(f"Workload {reference!r} does not load: {error}.") from None
    except Exception as error:  # the module's own code failed as it ran
        raise WorkloadError(f"Workload {reference!r} does not load: {type(error).__name__}: {error}.") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise WorkloadError(f"Workload {reference!r}: module {module_name!r} has no {attribute!r}.") from None


def _is_training_function(target: Any) -> bool:
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 2


def load_workload(reference: str) -> Workload | TrainingFunction:
    """A ``Workload`` or a training function ``train(hp, report)``.

    ``reference`` is a bundled name or ``package.module:attribute``, where the attribute is a
    ``Workload``, a function of no arguments returning one, or a training function.
    """
    if ":" in reference:
        target = _import(reference)
    elif reference in BUNDLED:
        target = _import(BUNDLED[reference])
    else:
        raise WorkloadError(
            f"Unknown workload {reference!r}; use one of {', '.join(BUNDLED)} "
            "or 'package.module:function'."
        )
    if isinstance(target, Workload):
        return _map_style(target, reference)
    if _is_training_function(target):
        return target
    if callable(target):
        try:
            workload = target()
        except Exception as error:  # the user's factory failed, as a module that fails on import
            raise WorkloadError(f"Workload {reference!r} does not load: {type(error).__name__}: {error}.") from None
        if isinstance(workload, Workload):
            return _map_style(workload, reference)
    raise WorkloadError(
        f"Workload {reference!r} is neither a Workload, a function returning one, "
        "nor a training function train(hp, report)."
    )


def _map_style(workload: Workload, reference: str) -> Workload:
    """Refuse data that cannot be counted and indexed (an ``IterableDataset``, a stream): the loop
    shuffles by index and counts samples, and such data failed with len()'s bare TypeError."""
    for name in ("train_data", "val_data"):
        data = getattr(workload, name)
        if isinstance(data, IterableDataset) or not isinstance(data, Sized) or not hasattr(data, "__getitem__"):
            raise WorkloadError(
                f"Workload {reference!r}: {name} is a {type(data).__name__}, with no length or no indexing; "
                "tuner needs a map-style dataset of (input, target) pairs, such as a TensorDataset."
            )
    return workload


def load_torch_workload(reference: str, purpose: str) -> Workload:
    """A torch ``Workload``; a training function is bad input for ``purpose``, which needs the loop."""
    workload = load_workload(reference)
    if not isinstance(workload, Workload):
        raise BadInputError(
            f"Workload {reference!r} is a training function with its own loop; {purpose} needs a torch Workload."
        )
    return workload


def load_spec_workload(spec: Any) -> Workload | TrainingFunction:
    """A spec's workload; one that does not load is bad input in spec field 'workload'."""
    try:
        return load_workload(spec.workload)
    except WorkloadError as error:
        raise SpecError(f"spec field 'workload': {error}") from None


def check_batch_size(workload: Workload | TrainingFunction, batch_size: int, *, field: str, name: str) -> None:
    """Refuse a batch larger than the training set of a torch workload, or of a training function
    that states it as ``train_samples`` (sklearn_mlp): no step could be that big."""
    samples = train_size(workload) or getattr(workload, "train_samples", None)
    if samples is not None and batch_size > samples:
        raise SpecError(
            f"spec field '{field}' ({batch_size}) is larger than "
            f"the {samples} training samples of workload {name!r}; use at most {samples}."
        )


def check_workload(spec: Any) -> None:
    """Refuse a spec whose workload does not load, whose batch range exceeds the data set, that
    asks a training function for what only tuner's loop does, or that searches a momentum no
    trial uses."""
    workload = load_spec_workload(spec)
    check_loop_settings(workload, spec, spec.search.batch_schedule.choices if spec.search.batch_schedule else ())
    check_batch_size(workload, spec.search.batch_size.high, field="search.batch_size.high", name=spec.workload)
    _check_momentum(workload, spec)


def _check_momentum(workload: Workload | TrainingFunction, spec: Any) -> None:
    """Refuse a momentum range that no trial uses: among searched optimizers only sgd's trials
    draw it (``tuner.space.momentum_searched``), and tuner's loop, whose optimizer is adamw where
    none is searched, gives it to SGD only. A training function without a searched optimizer may
    use ``hp.momentum`` as it likes."""
    search = spec.search
    if search.momentum is None or (search.optimizer is None and train_size(workload) is None):
        return
    # Not searched, the optimizer is adamw.
    optimizers = search.optimizer.choices if search.optimizer is not None else ["adamw"]
    if "sgd" not in optimizers:
        raise SpecError(
            f"spec field 'search.momentum': only the sgd optimizer uses a momentum, and the trials of workload "
            f"{spec.workload!r} train with {', '.join(optimizers)}; add sgd to search.optimizer.choices, "
            "or remove the field."
        )


def check_loop_settings(
    workload: Workload | TrainingFunction,
    spec: Any,
    schedules: Sequence[str] = (),
    schedule_field: str = "search.batch_schedule.choices",
) -> None:
    """Refuse, for a training function, what only tuner's loop does: given to a function, the
    noise scale would not be measured, the batch schedules (``schedules``, read from
    ``schedule_field``) would change nothing, and it would train in fp32 on its last weights,
    each without a word."""
    if train_size(workload) is not None:
        return
    settings = [
        ("measure_noise_scale", "measuring the noise scale", getattr(spec, "measure_noise_scale", False)),
        (schedule_field, "measuring the noise scale (the adaptive schedule)", "adaptive" in schedules),
        (schedule_field, "the ramp schedule", "ramp" in schedules),
        ("precision", f"precision {spec.precision!r}", spec.precision != "fp32"),
        ("ema_decay", "a moving average of the weights", bool(spec.ema_decay)),
    ]
    for field, what, asked in settings:
        if asked:
            raise SpecError(
                f"spec field '{field}': {what} needs tuner's training loop, and workload {spec.workload!r} "
                "is a training function with its own loop; remove the field, or do it in the function."
            )
