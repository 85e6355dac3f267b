"""What a finished study leaves for people watching it: the note, learning-curve artifacts, the
report, the exported best trial and progress output."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.trial import TrialState
from optuna_dashboard import get_note
from rich.console import Console

from conftest import _python_path, small_spec, tuner
from tuner.progress import ProgressHandler, log_output
from tuner.spec import Objective
from tuner.train import reporter as reporter_module

PNG = b"\x89PNG\r\n\x1a\n"


def _load(finished_study: dict) -> optuna.Study:
    return optuna.load_study(study_name=finished_study["name"], storage=finished_study["url"])


def test_note_summarises_the_study(finished_study: dict):
    study = _load(finished_study)
    note = get_note(study)
    assert note.startswith("## watched")
    assert "5 of 5 trials finished" in note
    assert f"| {study.best_trial.number} | val_accuracy = " in note
    assert "### Batch-size findings" in note and "### Memory limits learned" in note


def test_finished_trials_carry_their_learning_curve(finished_study: dict, tmp_path: Path):
    study = _load(finished_study)
    store = FileSystemArtifactStore(str(finished_study["folder"] / "artifacts"))
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        metas = {meta.filename: meta for meta in get_all_artifact_meta(trial, storage=study._storage)}
        assert set(metas) == {f"trial-{trial.number}-curve.json", f"trial-{trial.number}-curve.png"}
        meta = metas[f"trial-{trial.number}-curve.json"]
        target = tmp_path / meta.filename
        download_artifact(artifact_store=store, file_path=str(target), artifact_id=meta.artifact_id)
        history = json.loads(target.read_text())
        assert history == trial.user_attrs["history"]
        assert {"epoch", "train_loss", "val_accuracy", "lr"} <= set(history[0])


@pytest.mark.parametrize(("metrics", "shown"), [
    (["val_accuracy", "train_time_s"], ["val_accuracy"]),
    (["train_time_s"], ["train_time_s"]),
])
def test_the_curve_of_accuracy_against_time_shows_the_accuracy_on_its_own_scale(metrics: list[str], shown: list[str]):
    """Seconds beside an accuracy of 0 to 1 flattened the accuracy's curve to a line."""
    from tuner.artifacts import curve_figure

    history = [
        {"epoch": epoch, "train_loss": 1 / epoch, "val_loss": 1 / epoch, "val_accuracy": 0.8 + epoch / 100, "train_time_s": 2.0 * epoch, "lr": 0.01}
        for epoch in (1, 2, 3)
    ]
    validation = curve_figure(history, metrics).axes[1]
    assert [line.get_label() for line in validation.lines] == shown


def test_learning_curve_png_can_be_left_out(tmp_path: Path, write_spec, sqlite_url):
    spec = small_spec("json-only", budget={"n_trials": 1}, workload="user_workloads:own_loop")
    spec["learning_curve_png"] = False
    assert tuner("run", str(write_spec(spec)), "--storage", sqlite_url, cwd=tmp_path).returncode == 0
    study = optuna.load_study(study_name="json-only", storage=sqlite_url)
    metas = get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert [meta.filename for meta in metas] == ["trial-0-curve.json"]


def test_run_writes_learning_curves_to_the_given_artifact_dir(tmp_path: Path, write_spec, sqlite_url):
    """The folder that ``tuner dashboard --artifact-dir`` is given, not the default beside the storage."""
    shared = tmp_path / "shared" / "artifacts"
    spec = write_spec(small_spec("elsewhere", budget={"n_trials": 1}))
    result = tuner("run", str(spec), "--storage", sqlite_url, "--artifact-dir", str(shared), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="elsewhere", storage=sqlite_url)
    [meta] = get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert json.loads((shared / meta.artifact_id).read_text()) == study.trials[0].user_attrs["history"]
    assert not (tmp_path / "artifacts").exists()


def test_an_artifact_folder_that_cannot_be_made_stops_the_worker_before_its_first_trial(tmp_path: Path, sqlite_url):
    """Found only at the upload, it cost a trial's training, left running, and the worker."""
    from tuner.errors import BadInputError
    from tuner.spec import parse_spec
    from tuner.study import create_study
    from tuner.worker import WorkerOptions, run_worker

    create_study(parse_spec(small_spec("no-curves", budget={"n_trials": 1}, pruner={"name": "none"})), sqlite_url)
    (tmp_path / "a-file").write_text("")
    options = WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "checkpoints", artifact_dir=tmp_path / "a-file" / "artifacts")
    with pytest.raises(BadInputError, match="artifact folder .*a-file.* cannot be created or written .*--artifact-dir"):
        run_worker("no-curves", sqlite_url, options)
    trials = optuna.load_study(study_name="no-curves", storage=sqlite_url).trials
    assert all(trial.state == TrialState.WAITING for trial in trials)


@pytest.mark.parametrize("url", ["study.log", "journal:///{}/study.journal", "sqlite+pysqlite:///{}/study.db"])
def test_checkpoints_and_curves_go_beside_a_storage_file(tmp_path: Path, write_spec, url: str):
    """Beside the file whatever its name or driver, not in the folder the command runs from."""
    (tmp_path / "db").mkdir()
    (tmp_path / "elsewhere").mkdir()
    url = str(tmp_path / "db" / url) if "{}" not in url else url.format(tmp_path / "db")
    spec = write_spec(small_spec("journal", budget={"n_trials": 1}))
    result = tuner("run", str(spec), "--storage", url, "--keep-checkpoints", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert any((tmp_path / "db" / "artifacts").iterdir()) and any((tmp_path / "db" / "checkpoints").iterdir())
    assert not any((tmp_path / "elsewhere").iterdir())


def test_run_logs_each_trials_first_and_last_epoch(finished_study: dict):
    for trial in _load(finished_study).get_trials(states=(TrialState.COMPLETE,)):
        epochs = trial.params["epochs"]
        for epoch in (1, epochs):
            assert f"trial {trial.number} epoch {epoch}/{epochs}:" in finished_study["output"]


@pytest.mark.parametrize(("interval_s", "logged"), [(3600.0, [1, 6]), (0.0, [1, 2, 3, 4, 5, 6])])
def test_epoch_lines_come_at_most_once_an_interval(monkeypatch, caplog, interval_s: float, logged: list[int]):
    monkeypatch.setattr(reporter_module, "LOG_INTERVAL_S", interval_s)
    trial = optuna.create_study(direction="maximize").ask()
    trial.suggest_int("epochs", 6, 6)
    reporter = reporter_module.Reporter(trial, [Objective(metric="val_accuracy")])
    with caplog.at_level(logging.INFO, logger="tuner.progress"):
        for epoch in range(1, 7):
            reporter.record(epoch, {"val_accuracy": 0.5})
    assert [r.progress[1] for r in caplog.records if r.name == "tuner.progress"] == logged


def test_progress_bar_on_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with log_output(console):
        logging.getLogger("tuner.progress").info(
            "trial 3 epoch 2/4", extra={"progress": (3, 2, 4, "val_accuracy=0.91")}
        )
        logging.getLogger("tuner.worker").info("trial 2 complete")
        handler = next(h for h in logging.getLogger().handlers if isinstance(h, ProgressHandler))
        task = handler.progress.tasks[0]
        assert (task.description, task.completed, task.total) == ("trial 3", 2, 4)
    shown = console.file.getvalue()
    assert "val_accuracy=0.91" in shown and "trial 2 complete" in shown and "2/4" in shown


def _assert_files(out: Path, names: set[str]) -> None:
    assert {path.name for path in out.iterdir()} == names | {"index.html"}
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    page = (out / "index.html").read_text()
    assert page.startswith("<!doctype html>") and all(f'src="{name}"' in page for name in names)


def test_report_writes_every_plot(finished_study: dict, tmp_path: Path):
    result = tuner("report", "--study", "watched", "--storage", finished_study["url"], "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    _assert_files(tmp_path, {
        "history_val_accuracy.png", "param_importances.png", "intermediate_values.png",
        "batch_size_lr.png", "metric_vs_batch_size.png", "train_time_vs_batch_size.png",
    })
    best = _load(finished_study).best_trial
    assert f"<td>{best.number}</td>" in (tmp_path / "index.html").read_text()


@pytest.mark.slow
def test_report_of_two_objectives_has_a_pareto_front(write_spec, sqlite_url: str, tmp_path: Path):
    objectives = [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "val_loss", "direction": "minimize"}]
    spec = small_spec("pareto", objectives=objectives, budget={"n_trials": 3})
    del spec["objective"]
    run = tuner("run", str(write_spec(spec)), "--storage", sqlite_url)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "report"
    result = tuner("report", "--study", "pareto", "--storage", sqlite_url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    _assert_files(out, {
        "history_val_accuracy.png", "history_val_loss.png", "param_importances.png", "pareto_front.png",
        "batch_size_lr.png", "metric_vs_batch_size.png", "train_time_vs_batch_size.png",
    })


def test_report_of_four_objectives_draws_the_front_on_the_first_three(sqlite_url: str, tmp_path: Path):
    """Optuna's Pareto plot takes two or three objectives; a spec may name more."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import write_report
    from tuner.spec import parse_spec
    from tuner.study import create_study

    names = [("val_accuracy", "maximize"), ("val_loss", "minimize"), ("train_loss", "minimize"), ("train_time_s", "minimize")]
    spec = small_spec("four", objectives=[{"metric": metric, "direction": way} for metric, way in names])
    del spec["objective"], spec["pruner"]
    study = create_study(parse_spec(spec), sqlite_url)
    for lr, values in [(0.01, [0.9, 0.3, 0.2, 5.0]), (0.02, [0.8, 0.5, 0.4, 1.0]), (0.03, [0.7, 0.6, 0.5, 6.0])]:
        study.add_trial(create_trial(
            params={"lr": lr}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, values=values,
            user_attrs={"effective_batch_size": 32, "lr_used": lr, "train_time_s": values[3], "epochs_completed": 1},
        ))
    written = write_report(study, parse_spec(spec), tmp_path)
    assert tmp_path / "pareto_front.png" in written
    assert "<h2>Pareto front on val_accuracy, val_loss, train_loss</h2>" in (tmp_path / "index.html").read_text()


def test_a_study_too_small_to_rank_its_parameters_says_so_on_the_page_not_on_stderr(sqlite_url: str, tmp_path: Path):
    import warnings

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import write_report
    from tuner.spec import parse_spec
    from tuner.study import create_study

    spec = parse_spec(small_spec("small"))
    study = create_study(spec, sqlite_url)
    study.add_trial(create_trial(
        params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, value=0.9,
        user_attrs={"effective_batch_size": 32, "lr_used": 0.01, "train_time_s": 1.0, "epochs_completed": 1},
    ))
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        write_report(study, spec, tmp_path)
    assert [str(warning.message) for warning in escaped if "importances" in str(warning.message)] == []
    page = (tmp_path / "index.html").read_text()
    assert "<h2>Parameter importances (The number of trials is too small to compute importances." in page


def test_an_objective_named_like_a_record_shows_its_own_value(sqlite_url: str, tmp_path: Path):
    """``train_time_s`` as an objective is the time at the last report; the record of the same
    name, the function's whole time, must not take its column in the tables."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import write_report
    from tuner.report import trial_rows
    from tuner.spec import parse_spec
    from tuner.study import create_study

    objectives = [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "train_time_s", "direction": "minimize"}]
    spec = small_spec("timed", objectives=objectives)
    del spec["objective"]
    study = create_study(parse_spec(spec), sqlite_url)
    study.add_trial(create_trial(
        params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, values=[0.9, 5.0],
        user_attrs={"train_time_s": 7.0, "effective_batch_size": 32, "lr_used": 0.01},
    ))
    (row,) = trial_rows(study)
    assert row["train_time_s"] == 5.0
    write_report(study, parse_spec(spec), tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "<td>5</td>" in page and "<td>7</td>" not in page


def test_the_pareto_table_of_the_report_keeps_each_value_under_its_column(sqlite_url: str, tmp_path: Path):
    """Trials of plain Optuna beside tuner's search other parameters: a front of both lines up."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import write_report
    from tuner.spec import parse_spec
    from tuner.study import create_study

    objectives = [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "train_time_s", "direction": "minimize"}]
    spec = small_spec("lined-up", objectives=objectives)
    del spec["objective"]
    study = create_study(parse_spec(spec), sqlite_url)
    rate = FloatDistribution(1e-3, 1e-1)
    study.add_trial(create_trial(
        params={"lr": 0.01, "momentum": 0.5}, distributions={"lr": rate, "momentum": FloatDistribution(0, 1)},
        values=[0.9, 5.0], user_attrs={"effective_batch_size": 32, "lr_used": 0.02},
    ))
    study.add_trial(create_trial(params={"lr": 0.03}, distributions={"lr": rate}, values=[0.8, 1.0]))
    write_report(study, parse_spec(spec), tmp_path)
    table = (tmp_path / "index.html").read_text().split("<table>")[1].split("</table>")[0]
    header, *rows = table.split("</tr>")[:-1]
    names = header.replace("</th>", "").split("<th>")[1:]
    cells = [dict(zip(names, row.replace("</td>", "").split("<td>")[1:], strict=True)) for row in rows]
    assert [(row["lr"], row["momentum"], row["effective_batch_size"]) for row in cells] == [("0.02", "0.5", "32"), ("0.03", "", "")]


def test_importances_of_several_objectives_rank_what_makes_the_first_one_good():
    """x alone lifts accuracy into its top tenth, y alone orders the rest: the bars for a
    maximized accuracy must put x first, where Optuna's evaluator, reading low values as the
    good ones, would rank y."""
    import random

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import report_figures
    from tuner.spec import parse_spec

    rng = random.Random(0)
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    for _ in range(60):
        x, y = rng.random(), rng.random()
        accuracy = 0.9 + 0.1 * x if x > 0.8 else 0.5 * y
        study.add_trial(create_trial(params={"x": x, "y": y}, distributions=distributions, values=[accuracy, 1 - accuracy]))
    spec = small_spec("pareto", objectives=[{"metric": "val_accuracy", "direction": "maximize"},
                                            {"metric": "val_loss", "direction": "minimize"}])
    del spec["objective"]
    _, figure = report_figures(study, parse_spec(spec))["param_importances.png"]
    axes = figure.axes[0]
    importance = {label.get_text(): bar.get_width() for label, bar in zip(axes.get_yticklabels(), axes.patches)}
    assert importance["x"] > 0.8 > 0.2 > importance["y"]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_batch_lr_plot_shows_the_best_trial_brightest(direction: str):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import batch_lr_figure

    study = optuna.create_study(direction=direction)
    for value in (0.1, 0.5, 0.9):
        study.add_trial(create_trial(
            params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, value=value,
            user_attrs={"effective_batch_size": 32, "lr_used": 0.01},
        ))
    figure = batch_lr_figure(study.trials, "val_loss", study.direction)
    (points,) = figure.axes[0].collections
    brightness = points.to_rgba(points.get_array())[:, :3].sum(axis=1)
    assert study.best_trial.number == int(brightness.argmax())


def test_the_report_colours_batch_and_rate_by_quality_where_time_comes_first():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import report_figures
    from tuner.spec import parse_spec

    study = optuna.create_study(directions=["minimize", "maximize"])
    study.set_metric_names(["train_time_s", "val_accuracy"])
    for seconds, accuracy in [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]:
        study.add_trial(create_trial(
            params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, values=[seconds, accuracy],
            user_attrs={"effective_batch_size": 32, "lr_used": 0.01},
        ))
    spec = small_spec("time-first", objectives=[{"metric": "train_time_s", "direction": "minimize"},
                                                {"metric": "val_accuracy", "direction": "maximize"}])
    del spec["objective"]
    caption, figure = report_figures(study, parse_spec(spec))["batch_size_lr.png"]
    assert caption.endswith("coloured by val_accuracy")
    (points,) = figure.axes[0].collections
    assert list(points.get_array()) == [0.5, 0.7, 0.9]


def test_the_time_plot_of_trials_without_times_draws_without_a_warning():
    """Trials of plain Optuna beside tuner's record no times: matplotlib warned, in the middle
    of the report's output, that the legend had nothing to show."""
    import warnings

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import time_vs_batch_figure

    trial = create_trial(params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, value=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = time_vs_batch_figure([trial])
    assert figure.axes[0].get_legend() is None


def test_a_report_whose_complete_trials_are_all_plain_optunas_is_written(sqlite_url: str, tmp_path: Path):
    """Their trials record no batch or rate used: the batch x rate plot's empty log axis failed
    the whole report with matplotlib's ValueError."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.plots import write_report
    from tuner.spec import parse_spec
    from tuner.study import create_study

    spec = parse_spec(small_spec("plain", budget={"n_trials": 2}))
    study = create_study(spec, sqlite_url)
    for lr, value in [(0.01, 0.9), (0.02, 0.8)]:
        study.add_trial(create_trial(params={"lr": lr}, distributions={"lr": FloatDistribution(1e-3, 1e-1)}, value=value))
    written = write_report(study, spec, tmp_path)
    assert tmp_path / "batch_size_lr.png" in written and (tmp_path / "index.html").exists()


def test_exported_best_trial_retrains_to_its_value(finished_study: dict, tmp_path: Path):
    fragment = tmp_path / "best.yaml"
    exported = tuner("best", "--study", "watched", "--storage", finished_study["url"], "--export", str(fragment))
    assert exported.returncode == 0, exported.stderr
    model = tmp_path / "model.pt"
    trained = tuner("train", str(fragment), "--out", str(model), "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert model.stat().st_size > 10_000
    epochs = _load(finished_study).best_params["epochs"]
    assert f"epoch {epochs}/{epochs}: val_accuracy=" in trained.stderr  # the last epoch, out of all
    shown = next(line for line in trained.stdout.splitlines() if "val_accuracy" in line)
    best = _load(finished_study).best_value
    # Same seed, same data, same loop: the curve repeats up to thread-count rounding.
    assert float(shown.split("│")[2]) == pytest.approx(best, abs=0.02)


def test_export_into_a_new_folder_or_onto_a_folder(finished_study: dict, tmp_path: Path):
    fragment = tmp_path / "new" / "best.yaml"
    exported = tuner("best", "--study", "watched", "--storage", finished_study["url"], "--export", str(fragment))
    assert exported.returncode == 0, exported.stderr
    assert "hyperparameters:" in fragment.read_text()
    refused = tuner("best", "--study", "watched", "--storage", finished_study["url"], "--export", str(tmp_path))
    assert refused.returncode == 2, refused.stderr
    assert f"--export '{tmp_path}' cannot be written: Is a directory" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_train_refuses_a_bad_fragment(write_spec):
    result = tuner("train", str(write_spec({"workload": "digits_mlp", "hyperparameters": {"batch_size": "x"}})))
    assert result.returncode == 2
    assert "hyperparameters.batch_size" in result.stderr and "Traceback" not in result.stderr


def _fixed(workload: str = "digits_mlp", **hyperparameters: object) -> dict:
    """A fragment as ``tuner best --export`` writes it, one short epoch."""
    return {
        "workload": workload,
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "hyperparameters": {"batch_size": 32, "lr": 0.01, "epochs": 1, "base_lr": 0.01, **hyperparameters},
    }


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("batch_size", -4, "greater than or equal to 1"),
    ("batch_size", 100000, "1437 training samples"),
    ("epochs", 0, "greater than or equal to 1"),
    ("optimizer", "lion", "allowed: sgd, adamw, adam"),
    ("lr", -1, "greater than 0"),
    ("momentum", 1.5, "less than 1"),
    ("weight_decay", -0.1, "greater than or equal to 0"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**32, "less than 4294967296"),
    ("lr", float("inf"), "finite number"),
    ("schedule", {"name": "adaptive", "low": 64, "high": 16}, "low (64) must not be above high (16)"),
])
def test_train_refuses_out_of_range_hyperparameters(write_spec, tmp_path: Path, field: str, value: object, shown: str):
    model = tmp_path / "model.pt"
    result = tuner("train", str(write_spec(_fixed(**{field: value}))), "--out", str(model), "--device", "cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"hyperparameters.{field}" in result.stderr and shown in result.stderr
    assert "Traceback" not in result.stderr and not model.exists()


@pytest.mark.parametrize(("field", "fragment"), [
    ("ema_decay", {**_fixed("user_workloads:own_loop"), "ema_decay": 0.99}),
    ("hyperparameters.schedule", _fixed("user_workloads:own_loop", schedule={"name": "ramp"})),
])
def test_train_refuses_what_a_training_function_would_not_apply(write_spec, tmp_path: Path, field: str, fragment: dict):
    result = tuner("train", str(write_spec(fragment)), "--out", str(tmp_path / "model.pt"), "--device", "cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"spec field '{field}'" in result.stderr and "Traceback" not in result.stderr


def test_train_refuses_an_unwritable_out_before_training(write_spec, tmp_path: Path):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "m.pt"
    # Validation that takes ten minutes: only a check before training returns within the timeout.
    result = tuner(
        "train", str(write_spec(_fixed("user_workloads:slow_blobs"))), "--out", str(out), "--device", "cpu",
        env={"SLOW_EVAL_S": "600"}, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"The model folder {str(out.parent)!r} cannot be created or written" in result.stderr
    assert "--out" in result.stderr and "Traceback" not in result.stderr


def test_a_model_that_cannot_be_saved_leaves_the_one_there(write_spec, tmp_path: Path):
    """A save cut short after training (here a file-size limit, as a full disk) is an error of
    one sentence, and the model already at --out is left whole rather than truncated."""
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "model.pt"
    earlier = bytes(range(256)) * 400  # 100 KB: a model of an earlier run
    out.write_bytes(earlier)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run(
        [sys.executable, "-m", "tuner", "train", str(write_spec(_fixed())), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=240, preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONPATH": _python_path()},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().endswith(f"error: --out {str(out)!r}: the trained model cannot be written (File too large).")
    assert out.read_bytes() == earlier and [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_report_counts_failed_trials_among_the_finished(write_spec, sqlite_url: str, tmp_path: Path):
    """The page's count of finished trials is the budget's, as ``tuner status`` shows it: a trial
    that failed for good finished too."""
    spec = small_spec("failing", workload="user_workloads:raises_on_large_batch", budget={"n_trials": 6})
    spec["sampler"] = {"name": "random", "seed": 1}
    spec["search"]["batch_size"] = {"low": 32, "high": 128, "scale": "pow2"}
    run = tuner("run", str(write_spec(spec)), "--storage", sqlite_url)
    trials = _load({"url": sqlite_url, "name": "failing"}).trials
    counts = {state: sum(1 for t in trials if t.state == state) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    assert counts[TrialState.FAIL] and counts[TrialState.COMPLETE], run.stdout + run.stderr
    result = tuner("report", "--study", "failing", "--storage", sqlite_url, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (
        f"6 trials finished: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed." in (tmp_path / "index.html").read_text()
    )
