"""Accuracy against training time: two objectives, the Pareto front, and the fastest trial
within a tolerance of the best."""

from __future__ import annotations

import json
import logging

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from typer.testing import CliRunner

from conftest import small_spec, tuner
from tuner.cli import app
from tuner.errors import BadInputError, SpecError
from tuner.report import fastest_within
from tuner.retrain import load_fixed_spec
from tuner.space import suggest
from tuner.spec import parse_spec
from tuner.study import create_study
from tuner.worker import WorkerOptions, run_worker

TRADEOFF = [
    {"metric": "val_accuracy", "direction": "maximize"},
    {"metric": "train_time_s", "direction": "minimize"},
]


def _spec(name: str, **overrides: object) -> dict:
    spec = small_spec(name, budget={"n_trials": 3}, **overrides)
    del spec["objective"], spec["pruner"]
    return {**spec, **overrides}


def test_two_objectives_train_to_the_end_and_tell_the_time(sqlite_url: str, tmp_path) -> None:
    create_study(parse_spec(_spec("tradeoff", objectives=TRADEOFF)), sqlite_url)
    run_worker("tradeoff", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    study = optuna.load_study(study_name="tradeoff", storage=sqlite_url)
    assert study.metric_names == ["val_accuracy", "train_time_s"]
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.user_attrs["epochs_completed"] == trial.params["epochs"]
        assert trial.values[1] == trial.user_attrs["train_time_s"] > 0
        assert not trial.intermediate_values  # Optuna cannot prune several objectives

    result = CliRunner().invoke(app, ["best", "--study", "tradeoff", "--storage", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "Pareto front of 'tradeoff'" in result.stdout and "train_time_s" in result.stdout
    front = {trial.number for trial in study.best_trials}
    assert all(f"#{number}" in result.stdout for number in front)

    # No single best trial to export; --within chooses one, and that is the one written.
    fragment = tmp_path / "fast.yaml"
    arguments = ["best", "--study", "tradeoff", "--storage", sqlite_url, "--format", "json", "--export", str(fragment)]
    refused = CliRunner().invoke(app, arguments)
    assert isinstance(refused.exception, BadInputError) and "choose one with --within" in str(refused.exception)
    assert not fragment.exists() and refused.stdout == ""
    arguments = ["best", "--study", "tradeoff", "--storage", sqlite_url, "--within", "50%", "--export", str(fragment)]
    assert CliRunner().invoke(app, arguments).exit_code == 0
    fastest = fastest_within(study, 0.5)[1]
    fixed = load_fixed_spec(fragment)
    assert fragment.read_text().startswith(f"# Trial {fastest.number} of study 'tradeoff': val_accuracy = ")
    assert fixed.objective.metric == "val_accuracy"
    assert fixed.hyperparameters.batch_size == fastest.params["batch_size"]
    assert fixed.hyperparameters.epochs == fastest.params["epochs"]


def test_a_list_of_one_objective_exports_its_best_trial(sqlite_url: str, tmp_path) -> None:
    objectives = [{"metric": "val_loss", "direction": "minimize"}]
    create_study(parse_spec(_spec("listed", objectives=objectives)), sqlite_url)
    run_worker("listed", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    fragment = tmp_path / "best.yaml"
    result = CliRunner().invoke(app, ["best", "--study", "listed", "--storage", sqlite_url, "--export", str(fragment)])
    assert result.exit_code == 0, result.output
    best = optuna.load_study(study_name="listed", storage=sqlite_url).best_trial
    assert fragment.read_text().startswith(f"# Best trial {best.number} of study 'listed': val_loss = ")
    assert load_fixed_spec(fragment).objective.direction == "minimize"

def test_a_pruner_with_two_objectives_is_named_as_unused(sqlite_url: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tuner.study"):
        create_study(parse_spec(_spec("pruned", objectives=TRADEOFF, pruner={"name": "median"})), sqlite_url)
    assert "Optuna prunes single-objective studies only" in caplog.text and "'median'" in caplog.text


def test_a_misspelt_metric_among_several_is_renamed_but_not_its_direction(sqlite_url: str) -> None:
    misspelt = [{**TRADEOFF[0], "metric": "val_acc"}, TRADEOFF[1]]
    create_study(parse_spec(_spec("renamed", objectives=misspelt)), sqlite_url)
    turned = [TRADEOFF[0], {**TRADEOFF[1], "direction": "maximize"}]
    with pytest.raises(SpecError, match="objectives: .* stored, .* given"):
        create_study(parse_spec(_spec("renamed", objectives=turned)), sqlite_url)
    study = create_study(parse_spec(_spec("renamed", objectives=TRADEOFF)), sqlite_url)
    assert study.metric_names == ["val_accuracy", "train_time_s"]
    assert optuna.load_study(study_name="renamed", storage=sqlite_url).metric_names == ["val_accuracy", "train_time_s"]


def test_cmaes_with_two_objectives_is_refused() -> None:
    with pytest.raises(SpecError, match="sampler 'cmaes' takes one objective; with several use tpe"):
        parse_spec(_spec("cma", objectives=TRADEOFF, sampler={"name": "cmaes"}))


def _timed_study(directions: list[str], trials: list[tuple[list[float], float]]) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    study.set_metric_names(["val_accuracy", "train_time_s"][: len(directions)])
    for number, (values, seconds) in enumerate(trials):
        study.add_trial(optuna.trial.create_trial(
            values=values, params={"batch_size": 2**number},
            distributions={"batch_size": CategoricalDistribution([1, 2, 4, 8])},
            user_attrs={"train_time_s": seconds},
        ))
    return study


def test_fastest_within_a_tolerance_of_the_best() -> None:
    study = _timed_study(["maximize"], [([0.970], 10.0), ([0.962], 3.0), ([0.950], 1.0), ([0.968], 5.0)])
    best, fastest = fastest_within(study, 0.01)
    assert (best.number, fastest.number) == (0, 1)  # 0.962 >= 0.970 * 0.99; 0.950 is not
    assert fastest_within(study, 0.0)[1].number == 0
    two = _timed_study(["maximize", "minimize"], [([0.970, 10.0], 10.0), ([0.962, 3.0], 3.0)])
    assert fastest_within(two, 0.01)[1].number == 1


def test_best_within_on_the_command_line(sqlite_url: str, tmp_path) -> None:
    create_study(parse_spec(small_spec("within", budget={"n_trials": 3}, pruner={"name": "none"})), sqlite_url)
    run_worker("within", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    result = CliRunner().invoke(app, ["best", "--study", "within", "--storage", sqlite_url, "--within", "a bit"])
    assert isinstance(result.exception, BadInputError) and "--within takes a percentage" in str(result.exception)
    result = CliRunner().invoke(app, ["best", "--study", "within", "--storage", sqlite_url, "--within", "50%", "--format", "json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    study = optuna.load_study(study_name="within", storage=sqlite_url)
    assert answer["best_trial"] == study.best_trial.number and answer["within"] == pytest.approx(0.5)
    expected = fastest_within(study, 0.5)[1]
    assert answer["trial"] == expected.number
    table = CliRunner().invoke(app, ["best", "--study", "within", "--storage", sqlite_url, "--within", "50%"])
    assert f"fastest trial within 50% of the best val_accuracy: #{expected.number}" in table.stdout


def _stored_timed_study(sqlite_url: str, name: str, trials: list[tuple[float, float]]) -> None:
    """A tuner study in ``sqlite_url`` of two trials told their accuracy, each with its training seconds."""
    study = create_study(parse_spec(small_spec(name, budget={"n_trials": 2})), sqlite_url)
    for accuracy, seconds in trials:
        trial = study.ask()
        trial.set_user_attr("train_time_s", seconds)
        study.tell(trial, accuracy)


def test_best_within_tells_long_times_and_their_ratio_in_plain_digits(sqlite_url: str) -> None:
    _stored_timed_study(sqlite_url, "ratio", [(0.970, 15000.0), (0.965, 2.0)])
    result = CliRunner().invoke(app, ["best", "--study", "ratio", "--storage", sqlite_url, "--within", "1%"])
    assert result.exit_code == 0, result.output
    assert "the best, #0, has 0.97 in 15000 s (7500x the time)" in result.stdout
    listed = CliRunner().invoke(app, ["trials", "--study", "ratio", "--storage", sqlite_url], env={"COLUMNS": "200"})
    assert " 15000 " in listed.stdout and "e+04" not in listed.stdout


def test_times_just_below_the_whole_number_threshold_show_in_plain_digits(sqlite_url: str) -> None:
    """999.7 s to three digits and 9999.7 s to four round up to a digit more: 1e+03, 1e+04."""
    _stored_timed_study(sqlite_url, "rounded", [(0.970, 999.7), (0.965, 9999.7)])
    result = CliRunner().invoke(app, ["best", "--study", "rounded", "--storage", sqlite_url, "--within", "1%"])
    assert result.exit_code == 0, result.output
    assert "(val_accuracy 0.97 in 1000 s); the best, #0, has 0.97 in 1000 s (1x the time)" in result.stdout
    listed = CliRunner().invoke(app, ["trials", "--study", "rounded", "--storage", sqlite_url], env={"COLUMNS": "200"})
    assert " 10000 " in listed.stdout and "e+0" not in listed.stdout


@pytest.mark.parametrize("output", ["table", "json"])
def test_best_within_prints_nothing_when_its_export_cannot_be_written(sqlite_url: str, tmp_path, output: str) -> None:
    spec = parse_spec(small_spec("unwritten", budget={"n_trials": 1}))
    study = create_study(spec, sqlite_url)
    trial = study.ask()
    suggest(trial, spec.search, seed=0)
    trial.set_user_attr("train_time_s", 2.0)
    study.tell(trial, 0.9)
    (tmp_path / "a-file").touch()
    export = tmp_path / "a-file" / "fast.yaml"
    result = tuner("best", "--study", "unwritten", "--storage", sqlite_url, "--within", "1%", "--format", output, "--export", str(export))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: --export {str(export)!r} cannot be written") and result.stdout == ""


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.parametrize(
    "command", [["best"], ["best", "--within", "1%"], ["trials"]], ids=["best", "best --within", "trials"]
)
def test_json_of_a_trial_with_a_nan_record_is_valid_json(sqlite_url: str, command: list[str]) -> None:
    # A diverged epoch's noise scale is NaN, recorded before the divergence is caught.
    study = create_study(parse_spec(small_spec("nan", budget={"n_trials": 1})), sqlite_url)
    trial = study.ask()
    trial.suggest_int("epochs", 2, 2)
    for name, value in {"train_time_s": 1.0, "gradient_noise_scale": [12.5, float("nan")], "samples_per_s": float("inf")}.items():
        trial.set_user_attr(name, value)
    study.tell(trial, 0.9)
    result = CliRunner().invoke(app, [*command, "--study", "nan", "--storage", sqlite_url, "--format", "json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout, parse_constant=_refuse)
    record = answer[0] if isinstance(answer, list) else answer
    assert record["user_attrs"]["gradient_noise_scale"] == [12.5, None]
    assert record["user_attrs"]["samples_per_s"] is None and record["value"] == pytest.approx(0.9)


@pytest.mark.parametrize("objectives", [None, TRADEOFF], ids=["one objective", "two objectives"])
@pytest.mark.parametrize("output", ["table", "json"])
def test_best_of_a_study_without_a_complete_trial_is_an_error_in_either_format(sqlite_url, objectives, output):
    spec = _spec("empty", objectives=objectives) if objectives else small_spec("empty", budget={"n_trials": 2})
    study = create_study(parse_spec(spec), sqlite_url)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    result = tuner("best", "--study", "empty", "--storage", sqlite_url, "--format", output)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip() == "error: Study 'empty' has no completed trial yet."
    assert result.stdout == ""
