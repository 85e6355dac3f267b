"""The study's optuna-dashboard note: the spec, the budget, the best trial and what the study has
learned about batch sizes, in Markdown, written at creation and refreshed by workers."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import StorageInternalError
from optuna.trial import FrozenTrial, TrialState

from tuner.report import best_trials, format_value, quality_objective, used_params
from tuner.spec import StudySpec
from tuner.storages import slot_holders
from tuner.study import budget_state

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger("tuner.notes")

SAVED_AT_ATTR = "tuner:note_saved_at"
SHOWS_FINISHED_ATTR = "tuner:note_shows_finished"  # how many finished trials the note counted
WRITER_ATTR = "tuner:note_writer"  # the worker that wrote it, tuner create, or None: see NoteKeeper.final
REFRESH_INTERVAL_S = 30.0
# Workers that stop together name themselves the note's writer within tens of milliseconds of
# each other (8 workers on 2 cores: 60 ms): each looks again after this long.
TAKE_OVER_SETTLE_S = 0.25
# Rows of the Pareto front the note shows, best first by the quality objective.
BEST_ROWS = 10


def _row(*cells: object) -> str:
    return "| " + " | ".join(format_value(cell) for cell in cells) + " |"


def _table(header: Iterable[str], rows: Iterable[tuple[object, ...]]) -> list[str]:
    header = list(header)
    return [_row(*header), "|" + " --- |" * len(header), *(_row(*row) for row in rows)]


def _spec_lines(spec: StudySpec) -> list[str]:
    search = spec.search
    lr = search.lr
    lr_text = f"{lr.low:g} – {lr.high:g}" + (" (log)" if lr.log else "")
    if lr.scale_with_batch != "none":
        lr_text += f", scaled {lr.scale_with_batch} from batch {lr.reference_batch_size}"
    rows: list[tuple[object, ...]] = [
        ("effective batch size", f"{search.batch_size.low} – {search.batch_size.high} ({search.batch_size.scale})"),
        ("learning rate", lr_text),
        ("epochs", f"{search.epochs.low} – {search.epochs.high}"),
    ]
    if search.optimizer is not None:
        rows.append(("optimizer", ", ".join(search.optimizer.choices)))
    sampler = spec.sampler.name + ("" if spec.sampler.seed is None else f" (seed {spec.sampler.seed})")
    # The spec's pruner, the default median included, goes unused with several objectives.
    pruner = spec.pruner.name if len(spec.all_objectives) == 1 else "none: Optuna prunes single-objective studies only"
    rows += [("sampler", sampler), ("pruner", pruner)]
    return _table(("searched", "range"), rows)


def _budget_line(study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial]) -> str:
    """The budget and the trials by state, as ``tuner status`` counts them: a failed trial that
    a retry replaced is not failed for the budget, so it is not counted as one here either."""
    state = budget_state(study, spec)
    held = slot_holders(trials)
    pruned = sum(1 for t in held if t.state == TrialState.PRUNED)
    failed = sum(1 for t in held if t.state == TrialState.FAIL)
    limits = []
    if state.n_trials is not None:
        limits.append(f"{state.finished} of {state.n_trials} trials finished")
    if state.timeout_s is not None:
        limits.append(f"{state.elapsed_s:.0f} s of {state.timeout_s:.0f} s used")
        if state.n_trials is None:
            limits.append(f"{state.finished} trials finished")
    return (
        f"**Budget**: {', '.join(limits)}; {state.running} running, {pruned} pruned, "
        f"{failed} failed."
    )


def _best_lines(study: optuna.Study, spec: StudySpec) -> list[str]:
    best = best_trials(study)
    if not best:
        return ["No completed trial yet."]
    metrics = [objective.metric for objective in spec.all_objectives]
    rows = []
    for trial in best[:BEST_ROWS]:
        values = ", ".join(f"{m} = {format_value(v)}" for m, v in zip(metrics, trial.values))
        params = ", ".join(f"{k} = {format_value(v)}" for k, v in used_params(trial).items())
        rows.append((trial.number, values, params))
    lines = _table(("trial", "value", "parameters (lr as used)"), rows)
    if len(best) > BEST_ROWS:
        lines += ["", f"{len(best) - BEST_ROWS} more on the Pareto front: `tuner best --study {study.study_name}`."]
    return lines


def _batch_range(batch: int, pow2: bool) -> tuple[int, str]:
    low = 2 ** int(math.log2(batch))
    return low, str(low) if pow2 else f"{low} – {2 * low - 1}"


def _batch_lines(trials: list[FrozenTrial], spec: StudySpec, quality: int) -> list[str]:
    """The best trial within each power-of-two range of effective batch sizes, by the objective
    that measures quality (``quality``, as ``tuner best --within`` ranks them): the fastest
    trial of each range says little about which batch size learns best."""
    objective = spec.all_objectives[quality]
    better = max if objective.direction == "maximize" else min
    groups: dict[tuple[int, str], list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        if trial.state == TrialState.COMPLETE and "effective_batch_size" in trial.user_attrs:
            groups[_batch_range(trial.user_attrs["effective_batch_size"], spec.search.batch_size.scale == "pow2")].append(trial)
    if not groups:
        return ["No completed trial yet."]
    rows = []
    for (_, label), group in sorted(groups.items()):
        top = better(group, key=lambda t: t.values[quality])
        rows.append((label, len(group), top.values[quality], top.user_attrs.get("lr_used"), top.params.get("epochs"), top.number))
    return _table(("effective batch", "trials", f"best {objective.metric}", "lr used", "epochs", "trial"), rows)


def _split_by_memory(trial: FrozenTrial) -> int | None:
    """The batch of the trial's last epoch, whose micro-batches it records, where memory split
    it: measuring the noise scale splits every batch in two whether it fits or not, and a ramp
    or adaptive trial's last batch is not the one searched."""
    steps = trial.user_attrs.get("accumulation_steps", 1)
    if steps <= (2 if "gradient_noise_scale" in trial.user_attrs else 1):
        return None
    return (trial.user_attrs.get("batch_size_per_epoch") or [trial.user_attrs.get("effective_batch_size")])[-1]


def _memory_lines(trials: list[FrozenTrial]) -> list[str]:
    """Per device: the largest micro-batch that fitted, where accumulation began, and
    out-of-memory trials."""
    fitted: dict[str, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        if "device_name" in trial.user_attrs:
            fitted[trial.user_attrs["device_name"]].append(trial)
    rows = []
    for device, group in sorted(fitted.items()):
        micro = [t.user_attrs["micro_batch_size"] for t in group if "micro_batch_size" in t.user_attrs]
        split = [batch for t in group if (batch := _split_by_memory(t)) is not None]
        oom = sum(1 for t in group if t.user_attrs.get("stop_reason") == "out_of_memory")
        rows.append((device, max(micro, default=None), min(split, default="none"), oom))
    if not rows:
        return ["No trial has run yet."]
    return _table(("device", "largest micro-batch", "smallest batch split into micro-batches", "out of memory"), rows)


def study_note(study: optuna.Study, spec: StudySpec) -> str:
    """The note's Markdown, from the stored spec and the trials as they are now."""
    trials = study.get_trials(deepcopy=False)
    goal = ", ".join(f"{o.metric} ({o.direction})" for o in spec.all_objectives)
    return "\n".join([
        f"## {study.study_name}",
        "",
        f"Joint search of batch size, learning rate and epochs for workload `{spec.workload}`, "
        f"objective {goal}.",
        "",
        *_spec_lines(spec),
        "",
        _budget_line(study, spec, trials),
        "",
        "### Best so far",
        "",
        *_best_lines(study, spec),
        "",
        "### Batch-size findings",
        "",
        *_batch_lines(trials, spec, quality_objective(study)),
        "",
        "### Memory limits learned",
        "",
        *_memory_lines(trials),
        "",
        f"_Refreshed {time.strftime('%Y-%m-%d %H:%M:%S')} by tuner._",
    ])


def save_study_note(study: optuna.Study, spec: StudySpec, writer: str = "tuner create") -> None:
    """Write the note, and who wrote it when.

    Who, when and how many finished trials it counts are stored first: building the note reads
    the whole study, seconds in a large one, and workers that look meanwhile find it fresh
    instead of building it too.
    """
    storage = study._storage
    storage.set_study_system_attr(study._study_id, SHOWS_FINISHED_ATTR, budget_state(study, spec).finished)
    storage.set_study_system_attr(study._study_id, WRITER_ATTR, writer)
    storage.set_study_system_attr(study._study_id, SAVED_AT_ATTR, time.time())
    _dashboard_notes().save_note(study, study_note(study, spec))


@functools.cache
def _dashboard_notes() -> ModuleType:
    """optuna-dashboard's note module, loaded alone.

    The package's ``__init__`` imports its web app, whose parameter importance imports
    scikit-learn and SciPy: 3 s of CPU in every process that writes a note, where the note module
    itself needs only Optuna.
    """
    name = "optuna_dashboard._note"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("optuna_dashboard")
    if package is None or not package.submodule_search_locations:
        raise ImportError("optuna-dashboard is not installed")
    location = f"{package.submodule_search_locations[0]}/_note.py"
    module_spec = importlib.util.spec_from_file_location(name, location)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class NoteKeeper:
    """Keeps a study's note fresh from one worker.

    A note reads every trial of the study, and Optuna's cache lets a process's later reads read
    only the trials new since its last: so the worker that wrote the note last goes on writing
    it each interval, and another takes over only once it is two intervals old (its writer has
    stopped). Workers taking turns would each read the whole study once, which with 8 workers
    and thousands of short trials cost more CPU than the trials' own coordination. A note no
    worker keeps yet, as ``tuner create`` leaves it, is taken over at a worker's first look:
    the whole read that comes with it is cheapest while the study is small (10,000 trials on
    PostgreSQL: about 2 s of CPU, 10 through Optuna's own read).
    """

    def __init__(self, study: optuna.Study, spec: StudySpec, writer: str, interval_s: float = REFRESH_INTERVAL_S) -> None:
        self.study = study
        self.spec = spec
        self.writer = writer
        self.interval_s = interval_s

    def refresh(self) -> None:
        """Rewrite the note when it is due for this worker."""
        stored = self._stored()
        if self._mine(stored):
            if self._age(stored) >= self.interval_s:
                self._save()
        elif self._unkept(stored) or self._age(stored) >= 2 * self.interval_s:
            self._take_over()

    def final(self) -> None:
        """The last word as the worker stops, when the note does not show every finished trial:
        its writer's, so that workers stopping together write it once; anyone's where no worker
        has written it (a short study) or its writer has stopped.

        A writer that stops while other trials still run (its time budget spent, or on a storage
        without heartbeats, where workers do not wait for each other's trials) then names no
        writer: the next worker to stop would otherwise find its note fresh and leave it
        without the trials that ended since, the best one perhaps."""
        stored = self._stored()
        state = budget_state(self.study, self.spec)
        if stored.get(SHOWS_FINISHED_ATTR, -1) < state.finished:
            if self._mine(stored):
                self._save()
            elif self._unkept(stored) or self._age(stored) >= 2 * self.interval_s:
                self._take_over()
        if state.running and self._mine(self._stored()):
            self.study._storage.set_study_system_attr(self.study._study_id, WRITER_ATTR, None)

    def _take_over(self) -> None:
        """Name this worker the writer, and write the note if it still is a moment later.

        Workers that run out of trials together all find an unkept note at once; each building
        it would read the whole study. Each names itself instead, fresh, so that a worker looking
        later leaves it alone, and only the last named, the one that still finds its name after
        the others have written theirs, builds the note.
        """
        storage = self.study._storage
        storage.set_study_system_attr(self.study._study_id, WRITER_ATTR, self.writer)
        storage.set_study_system_attr(self.study._study_id, SAVED_AT_ATTR, time.time())
        time.sleep(TAKE_OVER_SETTLE_S)
        if self._mine(self._stored()):
            self._save()

    def _stored(self) -> dict:
        return self.study._storage.get_study_system_attrs(self.study._study_id)

    def _mine(self, stored: dict) -> bool:
        return stored.get(WRITER_ATTR) == self.writer

    @staticmethod
    def _unkept(stored: dict) -> bool:
        """No worker has written the note yet, or its writer stopped while trials ran."""
        return stored.get(WRITER_ATTR, "tuner create") in (None, "tuner create")

    @staticmethod
    def _age(stored: dict) -> float:
        return time.time() - stored.get(SAVED_AT_ATTR, 0.0)

    def _save(self) -> None:
        try:
            save_study_note(self.study, self.spec, self.writer)
        except StorageInternalError as error:  # two workers wrote the same attribute at once
            logger.warning("study note not refreshed: %s", error)
