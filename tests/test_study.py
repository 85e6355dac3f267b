"""Every sampler and pruner of the spec really runs; the study keeps its spec and its budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import tuner
from conftest import small_spec
from tuner.storages import make_storage
from tuner.study import budget_state, load_study, make_pruner


def _run(spec: dict, url: str) -> optuna.Study:
    study = tuner.create_study(tuner.parse_spec(spec), url)
    tuner.run_worker(study.study_name, url, tuner.WorkerOptions(threads=1, worker_index=0))
    return study


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp", "cmaes", "nsga2", "qmc"])
def test_every_sampler_runs(sampler, sqlite_url):
    spec = small_spec(f"s-{sampler}", workload="user_workloads:own_loop", budget={"n_trials": 4})
    spec["sampler"] = {"name": sampler, "seed": 1, "n_startup_trials": 2} if sampler in ("tpe", "gp", "cmaes") else {"name": sampler, "seed": 1}
    study = _run(spec, sqlite_url)
    loaded, _ = load_study(study.study_name, sqlite_url)
    assert type(loaded.sampler).__name__.lower().startswith({"nsga2": "nsgaii", "cmaes": "cmaes"}.get(sampler, sampler))
    assert [t.state for t in study.get_trials()].count(TrialState.COMPLETE) + [t.state for t in study.get_trials()].count(TrialState.PRUNED) == 4


def test_a_worker_offsets_the_largest_seed_without_leaving_numpys_range(sqlite_url):
    spec = small_spec("top-seed", workload="user_workloads:own_loop", budget={"n_trials": 1})
    spec["sampler"] = {"name": "tpe", "seed": 2**32 - 1}
    study = tuner.create_study(tuner.parse_spec(spec), sqlite_url)
    tuner.run_worker(study.study_name, sqlite_url, tuner.WorkerOptions(threads=1, worker_index=1))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


@pytest.mark.parametrize(
    "pruner",
    [
        {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        {"name": "percentile", "percentile": 50, "n_startup_trials": 1, "n_warmup_steps": 0},
        {"name": "sha"},
        {"name": "hyperband"},
        {"name": "patient", "patience": 0},
        {"name": "threshold", "lower": 0.99},
        {"name": "none"},
    ],
)
def test_every_pruner_runs(pruner, sqlite_url):
    spec = small_spec(f"p-{pruner['name']}", workload="user_workloads:own_loop", budget={"n_trials": 5})
    spec["search"]["epochs"] = {"low": 3, "high": 6}
    spec["pruner"] = pruner
    study = _run(spec, sqlite_url)
    states = [t.state for t in study.get_trials()]
    assert all(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states) and len(states) == 5
    if pruner["name"] == "threshold":
        assert states.count(TrialState.PRUNED) == 5  # the rule's 0.99 is above every value
    if pruner["name"] == "none":
        assert states.count(TrialState.PRUNED) == 0


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trials_fast_epochs_are_written_as_it_ends_and_pruned_as_they_come(kind, sqlite_url, tmp_path):
    """Epochs of milliseconds go to the storage with the trial's records instead of one write
    each; the pruner still sees every epoch as it comes, and a pruned trial keeps its last
    epoch's value, which Optuna reads back as the trial is told: on a journal, within the
    trial's one last append."""
    url = sqlite_url if kind == "sqlite" else str(tmp_path / "journal.log")
    spec = small_spec("falling", workload="user_workloads:falling", budget={"n_trials": 2})
    spec["search"]["epochs"] = {"low": 6, "high": 6}
    spec["pruner"] = {"name": "threshold", "lower": 0.65}
    _run(spec, url)
    for trial in optuna.load_study(study_name="falling", storage=make_storage(url)).trials:
        assert trial.state == TrialState.PRUNED
        assert trial.intermediate_values == pytest.approx({1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})
        assert trial.value == pytest.approx(0.6)
        assert trial.user_attrs["epochs_completed"] == 4


def test_a_trial_below_the_pruners_bar_at_its_last_epoch_completes(sqlite_url):
    """Its epochs are all trained: pruning it would save nothing and lose the finished model."""
    spec = small_spec("last", workload="user_workloads:falling", budget={"n_trials": 1})
    spec["search"]["epochs"] = {"low": 4, "high": 4}
    spec["pruner"] = {"name": "threshold", "lower": 0.65}
    _run(spec, sqlite_url)
    (trial,) = optuna.load_study(study_name="last", storage=make_storage(sqlite_url)).trials
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.6)
    assert trial.intermediate_values == pytest.approx({1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_the_gp_sampler_with_a_pruner_is_warned_about(pruner, sqlite_url, caplog):
    spec = small_spec(f"gp-{pruner}", sampler={"name": "gp"}, pruner={"name": pruner})
    with caplog.at_level("WARNING", logger="tuner.study"):
        tuner.create_study(tuner.parse_spec(spec), sqlite_url)
    warned = [record.getMessage() for record in caplog.records if "GP sampler" in record.getMessage()]
    assert len(warned) == (pruner != "none")


def test_hyperband_max_resource_is_the_largest_epochs(sqlite_url):
    spec = tuner.parse_spec(small_spec("hb", pruner={"name": "hyperband"}))
    study = tuner.create_study(spec, sqlite_url)
    loaded, _ = load_study("hb", sqlite_url)
    assert loaded.pruner._max_resource == spec.search.epochs.high
    assert study.study_name == "hb"


def test_create_is_idempotent_and_a_larger_budget_extends(sqlite_url):
    spec = tuner.parse_spec(small_spec("extend", budget={"n_trials": 3}))
    tuner.create_study(spec, sqlite_url)
    study = tuner.create_study(spec, sqlite_url)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 3
    bigger = spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": 5})})
    study = tuner.create_study(bigger, sqlite_url)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 5
    _, stored = load_study("extend", sqlite_url)
    assert stored.budget.n_trials == 5
    with pytest.raises(tuner.BadInputError, match="cannot shrink"):
        tuner.create_study(spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": 2})}), sqlite_url)
    assert budget_state(study, stored).waiting == 5


@pytest.mark.parametrize("pruner", ["median", "percentile", "threshold"])
@pytest.mark.parametrize("never_pruned", [0, 1, 2])
def test_warmup_counts_the_epochs_never_pruned(pruner, never_pruned):
    """Epochs count from 1: ``n_warmup_steps: N`` keeps a trial's first N epochs from pruning."""
    options = {
        "median": {"n_startup_trials": 1},
        "percentile": {"percentile": 50, "n_startup_trials": 1},
        "threshold": {"lower": 0.5},
    }[pruner]
    spec = small_spec("warmup", pruner={"name": pruner, "n_warmup_steps": never_pruned, **options})
    spec["search"]["epochs"] = {"low": 1, "high": 4}  # the epochs reported below
    spec = tuner.parse_spec(spec)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    good = study.ask()
    for epoch in range(1, 5):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    bad = study.ask()
    first_pruned = None
    for epoch in range(1, 5):
        bad.report(0.1, epoch)
        if bad.should_prune():
            first_pruned = epoch
            break
    assert first_pruned == never_pruned + 1


def test_the_python_api_warns_of_the_experimental_optuna_apis_the_user_calls_not_of_tuners_own(tmp_path):
    """Optuna's ExperimentalWarnings are errors here: tuner's own calls (metric names, heartbeats)
    pass, and the user's own call to an experimental API still raises."""
    script = (
        "import warnings, optuna\n"
        "warnings.simplefilter('error', optuna.exceptions.ExperimentalWarning)\n"
        "import tuner\n"
        "from conftest import small_spec\n"
        f"study = tuner.create_study(tuner.parse_spec(small_spec('api')), {str(tmp_path / 'journal.log')!r})\n"
        "print('created', study.metric_names)\n"
        "optuna.storages.fail_stale_trials(study)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120,
    )
    assert "created ['val_accuracy']" in result.stdout, result.stderr
    assert result.returncode == 1 and "ExperimentalWarning: optuna.storages._heartbeat.fail_stale_trials is experimental" in result.stderr
