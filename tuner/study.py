"""Create and load studies from specs: sampler and pruner factories, and the exact trial budget.

The budget is exact under any number of workers because every trial of it exists first as a
WAITING trial (a *slot*), made a few at a time under a lock (a database, a journal file) or all
when the study is created; a worker only runs a trial it won through the atomic WAITING ->
RUNNING transition, and a worker that finds no slot, and cannot make one, is done.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.errors import BadInputError, SpecError, StudyNotFoundError, TunerError
from tuner.space import centre, is_conditional
from tuner.spec import SEED_LIMIT, StudySpec, parse_spec
from tuner.storages import RetryStaleTrial, enough_waiting, make_storage, slot_counts, slot_holders, slot_maker, storage_name

logger = logging.getLogger("tuner.study")

SPEC_ATTR = "tuner:spec"
# A study made again under its name (a deleted SQLite file, a second storage in the same folder)
# is another study: its trials must not resume the first one's checkpoints.
UID_ATTR = "tuner:uid"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
TPE_STARTUP_TRIALS = 4


def make_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler; ``seed_offset`` keeps parallel workers from proposing the same points.

    Out-of-memory trials carry an Optuna constraint (``Trial.set_constraint``), which TPE, GP and
    NSGA-II read to steer away from them.
    """
    options = spec.sampler
    # Wrapped into NumPy's range: a seed near its top plus a worker's offset would fail there.
    seed = None if options.seed is None else (options.seed + seed_offset) % SEED_LIMIT
    n_startup = options.n_startup_trials
    name = options.name
    # A parameter only some trials sample (sgd's momentum) is left out of the joint model of
    # GP and CMA-ES and drawn on its own at random: the design of such a space, not a warning
    # each trial (TPE draws it from the trials that have it, and does not warn).
    conditional = is_conditional(spec.search)
    if name == "tpe":
        # Multivariate: batch size and learning rate interact, which independent TPE cannot see.
        # Four start-up trials, the centre one and three random, not Optuna's ten: a budget of
        # 20 to 40 trials would spend a third of itself before TPE learns anything
        # (benchmarks/search_efficiency.py).
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=options.multivariate,
            n_startup_trials=TPE_STARTUP_TRIALS if n_startup is None else n_startup,
            constant_liar=True,
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=10 if n_startup is None else n_startup,
            warn_independent_sampling=not conditional,
        )
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=1 if n_startup is None else n_startup,
            consider_pruned_trials=True, warn_independent_sampling=not conditional,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.QMCSampler(seed=seed, warn_asynchronous_seeding=False)


def _optuna_warmup(epochs_never_pruned: int) -> int:
    """Optuna prunes from step ``n_warmup_steps`` on, and a trial's first step is epoch 1: N
    epochs kept from pruning are N + 1 in Optuna's count."""
    return epochs_never_pruned + 1


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; its step is the epoch, so every trial is judged after equal data."""
    options = spec.pruner
    max_epochs = spec.search.epochs.high
    if options.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=options.n_startup_trials, n_warmup_steps=_optuna_warmup(options.n_warmup_steps)
        )
    if options.name == "percentile":
        return optuna.pruners.PercentilePruner(
            options.percentile,
            n_startup_trials=options.n_startup_trials,
            n_warmup_steps=_optuna_warmup(options.n_warmup_steps),
        )
    if options.name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=options.min_resource, reduction_factor=options.reduction_factor
        )
    if options.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=options.min_resource,
            max_resource=max(max_epochs, options.min_resource),
            reduction_factor=options.reduction_factor,
        )
    if options.name == "patient":
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=_optuna_warmup(0)),
            patience=options.patience,
            min_delta=options.min_delta,
        )
    if options.name == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=options.lower, upper=options.upper, n_warmup_steps=_optuna_warmup(options.n_warmup_steps)
        )
    return optuna.pruners.NopPruner()


def _fields(spec: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each leaf of a spec with its dotted path, as spec errors name fields."""
    for key, value in spec.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _fields(value, f"{path}.")
        else:
            yield path, value


def _spec_diff(stored: dict, wanted: dict) -> str:
    """One line a changed field: a diff of the YAML would show ``high: 9`` without saying whose."""
    old, new = dict(_fields(stored)), dict(_fields(wanted))
    unset = "(not set)"
    return "\n".join(
        f"  {path}: {old.get(path, unset)} stored, {new.get(path, unset)} given"
        for path in sorted(old.keys() | new.keys())
        if old.get(path, unset) != new.get(path, unset)
    )


def stored_spec(storage: optuna.storages.BaseStorage, study_name: str) -> StudySpec | None:
    """The spec kept inside a study, or None for a study that tuner did not make."""
    study_id = storage.get_study_id_from_name(study_name)
    raw = storage.get_study_system_attrs(study_id).get(SPEC_ATTR)
    return None if raw is None else parse_spec(json.loads(raw), source=f"study {study_name!r}")


def create_study(
    spec: StudySpec,
    storage: str | optuna.storages.BaseStorage | None = None,
    *,
    study_name: str | None = None,
) -> optuna.Study:
    """Create the spec's study, or load it when it exists with the same spec.

    A different spec under the same name is refused with the difference, except for the budget:
    a larger ``n_trials`` adds slots, so a finished study can be extended.
    """
    if study_name:
        spec = spec.model_copy(update={"name": study_name})
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = make_storage(storage, max_retries=spec.max_retries)
    from tuner.workloads import check_workload

    check_workload(spec)
    if len(spec.directions) > 1 and "pruner" in spec.model_fields_set and spec.pruner.name != "none":
        logger.warning(
            "Study %r has %d objectives: Optuna prunes single-objective studies only, so its "
            "trials train to the end and pruner %r is not used.",
            spec.name, len(spec.directions), spec.pruner.name,
        )
    if spec.sampler.name == "gp" and spec.pruner.name != "none" and len(spec.directions) == 1:
        logger.warning(
            "Study %r samples with Optuna's GP sampler, which learns from completed trials only: "
            "a point that pruner %r stops looks unexplored, and the sampler can propose it again "
            "and again. Use pruner: {name: none} with the GP sampler, or the TPE sampler.",
            spec.name, spec.pruner.name,
        )
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=spec.directions,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    study_id = storage.get_study_id_from_name(spec.name)
    stored = stored_spec(storage, spec.name)
    wanted = spec.to_dict()
    if stored is None:
        _refuse_a_foreign_study(study, spec, storage)
        # A time budget too: workers take a waiting trial before they make one.
        if spec.sampler.first_trial == "centre" and not study.get_trials(deepcopy=False):
            # Before the spec: behind ``tuner proxy`` the budget's slots are made when it is written.
            study.enqueue_trial(centre(spec.search))
        storage.set_study_system_attr(study_id, UID_ATTR, uuid.uuid4().hex)
        storage.set_study_system_attr(study_id, SPEC_ATTR, json.dumps(wanted))
        study.set_metric_names([objective.metric for objective in spec.all_objectives])
        from tuner.notes import save_study_note

        save_study_note(study, spec)
    else:
        stored_dict = stored.to_dict()
        # The budget may change (see _check_budget_holds), and the objectives' metric names
        # while no trial has reported (see _nothing_reported); nothing else may.
        fixed_stored, fixed_wanted = {**stored_dict, "budget": None}, {**wanted, "budget": None}
        renamed = fixed_stored != fixed_wanted
        only_names = renamed and _metric_blind(stored) == _metric_blind(spec)
        if renamed and not (only_names and _nothing_reported(study)):
            raise SpecError(
                f"Study {spec.name!r} exists with a different spec; use another name or the "
                f"stored spec. Difference:\n{_spec_diff(fixed_stored, fixed_wanted)}"
                + ("\nA metric is renamed only while no trial of the study has reported or runs." if only_names else "")
            )
        if stored_dict["budget"] != wanted["budget"]:
            _check_budget_holds(study, spec)
        if stored_dict != wanted:
            storage.set_study_system_attr(study_id, SPEC_ATTR, json.dumps(wanted))
        if renamed:
            _rename_metrics(study, stored, spec)
    _add_slots(study, spec)
    return study


def _metric_blind(spec: StudySpec) -> dict:
    """The spec's fields but its budget and the names of its objectives' metrics."""
    unnamed = spec.model_copy(
        update={
            "objective": spec.objective and spec.objective.model_copy(update={"metric": ""}),
            "objectives": spec.objectives and [o.model_copy(update={"metric": ""}) for o in spec.objectives],
        }
    )
    return {**unnamed.to_dict(), "budget": None}


def _nothing_reported(study: optuna.Study) -> bool:
    """Whether no trial has reported under the stored metric names, which may then be corrected:
    a misspelt metric stops a worker at its trial's first epoch and leaves nothing that the
    corrected name would mix with, and the study's name should not be lost to a typo. A running
    trial may still report under the old name."""
    reported = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return not any(t.state in reported or t.intermediate_values for t in study.get_trials(deepcopy=False))


def _rename_metrics(study: optuna.Study, stored: StudySpec, spec: StudySpec) -> None:
    from tuner.notes import save_study_note

    study.set_metric_names([objective.metric for objective in spec.all_objectives])
    save_study_note(study, spec)
    old, new = (", ".join(o.metric for o in s.all_objectives) for s in (stored, spec))
    logger.warning("Study %r now optimizes %s in place of %s: none of its trials had reported a value.", spec.name, new, old)


def _refuse_a_foreign_study(study: optuna.Study, spec: StudySpec, storage: optuna.storages.BaseStorage) -> None:
    """Refuse a study of the name that tuner did not make (plain Optuna's, another tool's) once
    it has run trials or optimizes other directions: given the spec, its trials would count
    against the budget and compete for the best. An empty one of the same directions (or one
    whose creation by tuner stopped before its spec was written) is taken as it is."""
    directions = [direction.name.lower() for direction in study.directions]
    ran = any(trial.state != TrialState.WAITING for trial in study.get_trials(deepcopy=False))
    if ran or directions != spec.directions:
        raise BadInputError(
            f"Study {spec.name!r} in {storage_name(storage)} was not made by tuner (it has no stored "
            "spec) and holds trials or other directions; use another name (--study)."
        )


WAITING_AHEAD = 16


def _check_budget_holds(study: optuna.Study, spec: StudySpec) -> None:
    """A budget may grow, never shrink below the trials the study already holds."""
    if spec.budget.n_trials is None:
        return
    state = budget_state(study, spec)
    holders = state.finished + state.running + state.waiting
    if holders > spec.budget.n_trials:
        raise BadInputError(
            f"Study {spec.name!r} already holds {holders} trials; "
            f"budget.n_trials cannot shrink to {spec.budget.n_trials}."
        )


def _add_slots(study: optuna.Study, spec: StudySpec) -> None:
    if spec.budget.n_trials is None:
        return
    if slot_maker(study._storage) is not None:
        add_waiting_trials(study)
        return
    state = budget_state(study, spec)
    if not isinstance(study._storage, optuna.storages.GrpcStorageProxy):
        study.add_trials([optuna.trial.create_trial(state=TrialState.WAITING)] * state.unheld)
        return
    # ``tuner proxy`` tops up only where fewer than half of ``WAITING_AHEAD`` wait (as a database
    # does): more waiting, as in a study stopped part way, is no sign of Optuna's own proxy.
    if state.unheld and not enough_waiting(state.waiting, WAITING_AHEAD):
        # Writing the spec again asks ``tuner proxy`` for the slots (a study made before it ran).
        study._storage.set_study_system_attr(study._study_id, SPEC_ATTR, json.dumps(spec.to_dict()))
        state = budget_state(study, spec)
        if state.unheld and not enough_waiting(state.waiting, WAITING_AHEAD):
            raise BadInputError(no_slots_message(spec.name, state.unheld))


def no_slots_message(study_name: str, missing: int) -> str:
    return (
        f"No budget slot waits in study {study_name!r} though {missing} trial(s) of its budget "
        "remain. Behind a gRPC proxy the proxy makes the slots: serve the database with "
        "`tuner proxy` (Optuna's own proxy does not make them)."
    )


def add_waiting_trials(study: optuna.Study) -> int:
    """Make up to ``WAITING_AHEAD`` budget slots wait; return how many wait.

    A database or a journal file holds only a few slots ahead, made as workers need them: every
    read of a study's trials reads its unfinished ones again, and a budget of 10,000 made at once
    would be 10,000 of them. Other storages get every slot at creation, so this adds none there.
    The budget is the stored spec's, which ``tuner create`` may have raised since the worker
    started.
    """
    maker = slot_maker(study._storage)
    spec = stored_spec(study._storage, study.study_name)
    if maker is None or spec is None or spec.budget.n_trials is None:
        return 0
    return maker.add_waiting_trials(study._study_id, spec.budget.n_trials, WAITING_AHEAD)


def load_study(
    study_name: str,
    storage: str | optuna.storages.BaseStorage | None = None,
    *,
    seed_offset: int = 0,
) -> tuple[optuna.Study, StudySpec]:
    """Load a study made by ``create_study`` with the sampler and pruner of its stored spec; a
    storage opened here from a URL is not created, since the study would not be in it."""
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage = make_storage(storage, create=False)
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise StudyNotFoundError(f"No study named {study_name!r} in {storage_name(storage)}; studies there: {known}.")
    spec = stored_spec(storage, study_name)
    if spec is None:
        raise BadInputError(f"Study {study_name!r} was not made by tuner (it has no stored spec).")
    heartbeat = getattr(storage, "heartbeat_stale_trial_callback", None)
    if heartbeat is not None:
        storage.heartbeat_stale_trial_callback = RetryStaleTrial(spec.max_retries)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, seed_offset=seed_offset),
        pruner=make_pruner(spec),
    )
    return study, spec


@contextmanager
def deletion_named(study: optuna.Study) -> Iterator[None]:
    """A study deleted while in use (``optuna delete-study``, a study started over under its
    name) named as such: Optuna's storages raise a bare ``KeyError('Record does not exist.')``
    at its next read or write, and a lookup by name finds no such study."""
    try:
        yield
    except (KeyError, StudyNotFoundError):
        # Looked up by name: a cache of the storage's may still know the study by its id.
        try:
            deleted = study._storage.get_study_id_from_name(study.study_name) != study._study_id
        except KeyError:
            deleted = True
        if deleted:
            raise TunerError(
                f"Study {study.study_name!r} was deleted from {storage_name(study._storage)} while in use."
            ) from None
        raise


@dataclass(frozen=True)
class BudgetState:
    """Where a study stands against its budget."""

    finished: int
    running: int
    waiting: int
    n_trials: int | None
    elapsed_s: float
    timeout_s: float | None

    @property
    def unheld(self) -> int:
        """Trials of the budget that no slot holds yet."""
        if self.n_trials is None:
            return 0
        return max(0, self.n_trials - self.finished - self.running - self.waiting)

    @property
    def exhausted(self) -> bool:
        out_of_time = self.timeout_s is not None and self.elapsed_s >= self.timeout_s
        out_of_trials = self.n_trials is not None and self.finished >= self.n_trials
        return out_of_time or out_of_trials


def budget_state(study: optuna.Study, spec: StudySpec) -> BudgetState:
    counted = slot_counts(study._storage, study._study_id)
    if counted is not None:
        counts, first_start = counted
    else:
        trials = study.get_trials(deepcopy=False)
        counts = {state: 0 for state in TrialState}
        for trial in slot_holders(trials):
            counts[trial.state] += 1
        first_start = min((t.datetime_start for t in trials if t.datetime_start is not None), default=None)
    # Optuna stamps trials with naive local times. Past the time budget the study is done, and
    # the clock stops there: status and the note show a budget spent, not overrun.
    elapsed = (datetime.now() - first_start).total_seconds() if first_start else 0.0
    if spec.budget.timeout_s is not None:
        elapsed = min(elapsed, spec.budget.timeout_s)
    return BudgetState(
        finished=sum(counts[state] for state in FINISHED),
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
        n_trials=spec.budget.n_trials,
        elapsed_s=elapsed,
        timeout_s=spec.budget.timeout_s,
    )
