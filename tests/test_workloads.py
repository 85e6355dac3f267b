"""Both workload forms end to end, and how a trial's end is recorded."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import tuner
import user_workloads
from conftest import small_spec
from tuner.errors import SpecError, WorkloadError
from tuner.retrain import FixedSpec, retrain
from tuner.status import study_status
from tuner.study import load_study
from tuner.train.reporter import MissingMetric


def _run(spec: dict, url: str) -> optuna.Study:
    study = tuner.create_study(tuner.parse_spec(spec), url)
    tuner.run_worker(study.study_name, url, tuner.WorkerOptions(threads=1, worker_index=0))
    return optuna.load_study(study_name=study.study_name, storage=url)


def test_user_torch_workload(sqlite_url):
    spec = small_spec("user-torch", workload="user_workloads:blobs", budget={"n_trials": 2})
    spec["search"]["batch_size"] = {"low": 16, "high": 64, "scale": "pow2"}
    spec["search"]["lr"] = {"low": 1e-2, "high": 3e-2, "log": True}
    spec["search"]["epochs"] = {"low": 3, "high": 4}
    study = _run(spec, sqlite_url)
    assert all(t.state.is_finished() for t in study.trials)
    assert study.best_value > 0.8


def test_training_function(sqlite_url):
    study = _run(small_spec("own-loop", workload="user_workloads:own_loop", budget={"n_trials": 3}), sqlite_url)
    trial = study.best_trial
    assert trial.intermediate_values and max(trial.intermediate_values) == trial.params["epochs"]
    assert trial.user_attrs["effective_batch_size"] == trial.params["batch_size"]


def test_sklearn_mlp_prunes_like_torch(sqlite_url):
    spec = small_spec("sk", workload="sklearn_mlp", budget={"n_trials": 3})
    study = _run(spec, sqlite_url)
    assert all(t.state.is_finished() for t in study.trials)
    assert study.best_value > 0.8


def test_diverged_trials_are_pruned_and_the_worker_goes_on(sqlite_url, caplog):
    spec = small_spec("nan", workload="user_workloads:diverges_on_large_lr", budget={"n_trials": 8})
    spec["sampler"] = {"name": "random", "seed": 2}
    with caplog.at_level(logging.INFO, logger="tuner"):
        study = _run(spec, sqlite_url)
    diverged = [t for t in study.trials if t.user_attrs.get("stop_reason") == "diverged"]
    assert diverged and all(t.state == TrialState.PRUNED for t in diverged)
    assert all(t.params["lr"] > 0.01 for t in diverged)
    # The worker's line for such a trial says why, as its record does.
    for trial in diverged:
        assert trial.user_attrs["stop_detail"] == "val_accuracy is nan at epoch 1"
        assert f"trial {trial.number} diverged: val_accuracy is nan at epoch 1 |" in caplog.text
    assert len([t for t in study.trials if t.state.is_finished()]) == 8


def test_a_training_function_returning_nan_is_diverged_and_the_worker_goes_on(sqlite_url):
    study = _run(small_spec("nan-end", workload="user_workloads:returns_nan", budget={"n_trials": 2}), sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(t.user_attrs["stop_detail"] == "val_accuracy is nan at the end" for t in study.trials)


def test_a_diverged_epoch_counts_as_trained_in_every_cost_record(sqlite_url):
    """The epoch whose metric turned NaN ran to its end: the trial's epochs agree with its
    training time, samples/s and batch per epoch, and ``tuner status`` counts it as trained."""
    spec = small_spec("late-nan", workload="user_workloads:nan_from_second_epoch", budget={"n_trials": 1})
    spec["search"]["epochs"] = {"low": 3, "high": 3}
    study = _run(spec, sqlite_url)
    (trial,) = study.trials
    records = trial.user_attrs
    assert records["stop_detail"] == "val_accuracy is nan at epoch 2"
    assert records["epochs_completed"] == 2 == len(records["batch_size_per_epoch"])
    samples = len(user_workloads.NanFromSecondEpoch().train_data)
    assert records["samples_per_s"] == pytest.approx(2 * samples / records["train_time_s"])
    assert [entry["epoch"] for entry in records["history"]] == [1]
    assert study_status(*load_study("late-nan", sqlite_url)).epochs_trained == 2


def test_a_training_function_that_catches_the_pruning_signal_is_pruned_all_the_same(sqlite_url, caplog):
    """Told COMPLETE, a trial the pruner stopped would count its early value as a finished
    result; the worker's line says what to change."""
    spec = small_spec("caught", workload="user_workloads:catches_pruned", budget={"n_trials": 2})
    spec["search"]["epochs"] = {"low": 3, "high": 4}
    spec["pruner"] = {"name": "threshold", "lower": 0.5}
    with caplog.at_level(logging.INFO, logger="tuner"):
        study = _run(spec, sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(t.user_attrs["stop_detail"] == "at epoch 1 with val_accuracy=0.1" for t in study.trials)
    assert "caught the optuna.TrialPruned that report() raised and went on; let it through" in caplog.text


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("returns_a_float", "The training function returned a float; return its final metrics as a dict"),
        ("reports_nothing", "The training function returned no metrics and reported none; call report"),
    ],
)
def test_a_training_function_that_ends_without_metrics_fails_its_trial_saying_what_to_return(
    sqlite_url, function, error
):
    spec = small_spec("no-metrics", workload=f"user_workloads:{function}", budget={"n_trials": 2})
    study = _run(spec, sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert all(t.user_attrs["error"].startswith(f"WorkloadError: {error}") for t in study.trials)
    fixed = FixedSpec(
        workload=spec["workload"], objective=spec["objective"],
        hyperparameters=tuner.Hyperparameters(batch_size=32, lr=0.01, epochs=2, base_lr=0.01),
    )
    with pytest.raises(WorkloadError, match=error):
        retrain(fixed)


@pytest.mark.parametrize(
    ("workload", "error"),
    [
        ("per_sample_blobs", "Metric 'val_accuracy' is a Tensor of shape (64,), not a number; report one float"),
        ("reports_a_list", "Metric 'val_accuracy' is a list, not a number; report one float"),
        ("reports_from_epoch_zero", "report() got epoch 0 after epoch 0; report each epoch once, counted from 1"),
        ("reports_an_epoch_twice", "report() got epoch 1 after epoch 1; report each epoch once, counted from 1"),
    ],
)
def test_a_metric_that_is_not_a_number_fails_its_trial_naming_the_metric(sqlite_url, workload, error):
    spec = small_spec("not-a-number", workload=f"user_workloads:{workload}", budget={"n_trials": 1})
    spec["search"]["batch_size"] = {"low": 32, "high": 64, "scale": "pow2"}
    study = _run(spec, sqlite_url)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["error"].startswith(f"WorkloadError: {error}")


def test_a_training_function_that_never_reports_completes_with_a_warning(sqlite_url, caplog):
    spec = small_spec("unreported", workload="user_workloads:never_reports", budget={"n_trials": 1})
    with caplog.at_level(logging.INFO, logger="tuner"):
        study = _run(spec, sqlite_url)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == 0.5
    assert "trial 0: the training function never called report(epoch, metrics)" in caplog.text


def test_final_metrics_without_the_objective_stop_the_worker_and_keep_the_trials_slot(sqlite_url):
    spec = small_spec(
        "unreturned", workload="user_workloads:returns_accuracy_only", budget={"n_trials": 1},
        objective={"metric": "val_loss", "direction": "minimize"},
    )
    with pytest.raises(MissingMetric, match="'val_loss' is not among the metrics the workload reports: val_accuracy"):
        _run(spec, sqlite_url)
    study = optuna.load_study(study_name="unreturned", storage=sqlite_url)
    failed, waiting = study.trials
    assert failed.state == TrialState.FAIL and "'val_loss' is not among" in failed.user_attrs["error"]
    assert waiting.state == TrialState.WAITING and waiting.system_attrs["retry_history"] == [failed.number]


def test_the_tuner_script_finds_a_module_in_the_folder_it_runs_from(tmp_path, sqlite_url):
    """``python -m tuner`` puts that folder on the path; the installed script must too."""
    (tmp_path / "my_training.py").write_text(
        "def train(hp, report):\n"
        "    report(1, {'val_accuracy': 0.5})\n"
        "    return {'val_accuracy': 0.5}\n"
    )
    spec = small_spec("own-module", workload="my_training:train", budget={"n_trials": 1})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    script = Path(sys.executable).parent / "tuner"
    result = subprocess.run(
        [str(script), "create", "spec.yaml", "--storage", sqlite_url],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_an_objective_the_workload_does_not_report_stops_the_worker_at_its_first_trial(sqlite_url):
    spec = small_spec("no-such-metric", workload="user_workloads:own_loop", objective={"metric": "val_acc"})
    with pytest.raises(SpecError, match=r"spec field 'objective.metric': 'val_acc' is not among .*val_accuracy"):
        _run(spec, sqlite_url)
    study = optuna.load_study(study_name="no-such-metric", storage=sqlite_url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "'val_acc' is not among" in failed[0].user_attrs["error"]
    # The rest of the budget is left for a corrected spec, not burned on the same failure.
    assert all(t.state == TrialState.WAITING for t in study.trials if t.number != failed[0].number)


@pytest.mark.parametrize(("field", "value"), [("precision", "bf16"), ("ema_decay", 0.99)])
def test_a_training_function_is_refused_what_only_the_loop_applies(sqlite_url, field, value):
    spec = tuner.parse_spec(small_spec("own-settings", workload="user_workloads:own_loop", **{field: value}))
    with pytest.raises(SpecError, match=f"spec field '{field}': .* needs tuner's training loop"):
        tuner.create_study(spec, sqlite_url)
    assert optuna.get_all_study_names(sqlite_url) == []


@pytest.mark.parametrize("data", ["train_data", "val_data"])
def test_a_dataset_without_length_and_indexing_is_refused_naming_it(sqlite_url, data):
    spec = small_spec("streamed", workload=f"user_workloads:streamed_{data}")
    with pytest.raises(SpecError, match=rf"spec field 'workload': .*{data} is a _Stream, .*map-style dataset"):
        tuner.create_study(tuner.parse_spec(spec), sqlite_url)
