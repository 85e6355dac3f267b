"""``--gpus``: which GPU each worker process sees. This machine may have no GPU, so the mapping is
tested as a pure function of a given GPU count, and real worker processes (on the CPU) started by
the same launching function show the ``CUDA_VISIBLE_DEVICES`` they were given."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

from conftest import _python_path, small_spec, tuner
from tuner.cli import app
from tuner.errors import BadInputError
from tuner.launch import follow, gpu_environments, start_workers
from tuner.spec import parse_spec
from tuner.study import create_study
from tuner.train.memory import resolve_device


def visible(environments: list[dict[str, str]]) -> list[str]:
    return [env["CUDA_VISIBLE_DEVICES"] for env in environments]


def test_all_gpus_get_one_worker_each() -> None:
    assert visible(gpu_environments("all", device_count=4)) == ["0", "1", "2", "3"]


def test_workers_per_gpu_are_spread_round_robin() -> None:
    assert visible(gpu_environments("0,2", 2, device_count=4)) == ["0", "2", "0", "2"]


def test_indices_map_through_our_own_visible_devices() -> None:
    assert visible(gpu_environments("1", device_count=2, visible="5, GPU-ab12")) == ["GPU-ab12"]
    assert visible(gpu_environments("all", device_count=2, visible="5,7")) == ["5", "7"]


@pytest.mark.parametrize(
    ("gpus", "count", "message"),
    [
        ("all", 0, "none is available"),
        ("0,2", 2, "has GPUs 0 to 1"),
        ("first", 2, "'all' or GPU indices"),
    ],
)
def test_bad_gpus_are_bad_input(gpus: str, count: int, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        gpu_environments(gpus, device_count=count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_gpus_all_exits_2_and_auto_is_cpu() -> None:
    result = tuner("worker", "--study", "any", "--gpus", "all")
    assert result.returncode == 2
    assert " ".join(result.stderr.split()) == (
        "error: --gpus needs CUDA GPUs and none is available here; use --device cpu or auto."
    )
    assert resolve_device("auto") == torch.device("cpu")


def test_run_refuses_a_worker_count_beside_gpus(write_spec, sqlite_url: str) -> None:
    """With --gpus the count is the GPUs' times --workers-per-gpu: a --workers given as well was
    ignored without a word. Refused before anything else, a machine without CUDA included."""
    result = tuner("run", str(write_spec(small_spec("both"))), "--workers", "4", "--gpus", "0", "--storage", sqlite_url)
    assert result.returncode == 2, result.stderr
    assert "--workers 4 and --gpus 0" in " ".join(result.stderr.split())
    assert optuna.get_all_study_names(sqlite_url) == []


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_threads_are_shared_out_over_the_cpus_this_process_may_use(sqlite_url: str) -> None:
    """A Slurm task or a container pinned to some of the machine's CPUs: the workers share those,
    where each got its share of all the machine's and together they oversubscribed the ones given."""
    given = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(given)})
    try:
        processes = start_workers("pinned", sqlite_url, 1, first_index=0)
    finally:
        os.sched_setaffinity(0, given)
    for process in processes:
        process.kill()
        process.communicate()
    command = processes[0].args
    assert command[command.index("--threads") + 1] == "1"


@pytest.mark.parametrize("command", ["worker", "run"])
def test_workers_per_gpu_without_gpus_is_refused(command: str, write_spec, sqlite_url: str) -> None:
    """--workers-per-gpu counts workers on each GPU of --gpus: without it one worker ran on the
    default device, the count ignored without a word."""
    target = ["--study", "alone"] if command == "worker" else [str(write_spec(small_spec("alone")))]
    result = CliRunner().invoke(app, [command, *target, "--workers-per-gpu", "2", "--storage", sqlite_url])
    assert isinstance(result.exception, BadInputError), result.output
    assert "--workers-per-gpu 2 needs --gpus" in str(result.exception)
    assert optuna.get_all_study_names(sqlite_url) == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_each_launched_worker_sees_its_own_gpu_and_the_given_folders_and_threads(
    sqlite_url: str, tmp_path: Path
) -> None:
    """``tuner worker --gpus`` hands its own folders and threads on to each worker it starts."""
    study = create_study(parse_spec(small_spec("launch", budget={"n_trials": 1})), sqlite_url)
    study.tell(study.ask(), 0.5)  # the budget is met: the workers start, report and exit
    environments = gpu_environments("0,1", device_count=2)
    processes = start_workers(
        "launch", sqlite_url, 2, device="cpu", environments=environments, threads=3,
        checkpoint_dir=tmp_path / "checkpoints", artifact_dir=tmp_path / "artifacts",
    )
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    for process, output, expected in zip(processes, outputs, ["0", "1"]):
        assert f"CUDA_VISIBLE_DEVICES={expected}\n" in output, output
        given = dict(zip(process.args[4::2], process.args[5::2]))
        assert given["--threads"] == "3"
        assert given["--checkpoint-dir"] == str(tmp_path / "checkpoints")
        assert given["--artifact-dir"] == str(tmp_path / "artifacts")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_gpu_workers_of_two_launches_do_not_repeat_each_others_trials(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tuner worker --gpus`` on a second machine (here: a second launch under another host
    name, after the first) gave its workers the same indices, so the same seeds, and they
    proposed the trials the first machine's workers had already run."""
    monkeypatch.setenv("PYTHONPATH", _python_path())
    spec = small_spec("hosts", workload="user_workloads:own_loop", sampler={"name": "random", "seed": 0})
    for host, n_trials in (("node-a", 2), ("node-b", 4)):
        create_study(parse_spec({**spec, "budget": {"n_trials": n_trials}}), sqlite_url)
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        [process] = start_workers("hosts", sqlite_url, 1, device="cpu", threads=1)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 0, output
    study = optuna.load_study(study_name="hosts", storage=sqlite_url)
    params = [tuple(sorted(trial.params.items())) for trial in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(params) == 4 and len(set(params)) == 4, params


def test_a_run_that_goes_on_with_a_study_does_not_repeat_its_trials(tmp_path: Path, write_spec) -> None:
    """A seeded ``tuner run`` repeats on a fresh study; run again with the budget raised, its
    workers took seeds from index 0 again and proposed the first run's trials a second time."""
    spec = write_spec(small_spec("again", workload="user_workloads:own_loop", sampler={"name": "random", "seed": 0}))
    runs = {}
    for name, budgets in (("once", ["2"]), ("twice", ["2", "4"])):
        url = f"sqlite:///{tmp_path / name}.db"
        for n_trials in budgets:
            result = tuner("run", str(spec), "--storage", url, "--n-trials", n_trials)
            assert result.returncode == 0, result.stderr
        study = optuna.load_study(study_name="again", storage=url)
        runs[name] = [tuple(sorted(trial.params.items())) for trial in study.get_trials(states=(TrialState.COMPLETE,))]
    assert runs["twice"][:2] == runs["once"]
    assert len(set(runs["twice"])) == 4, runs["twice"]


def test_the_progress_line_shows_a_best_value_of_10000_and_more_in_whole_numbers(sqlite_url: str) -> None:
    """As the tables of ``tuner best`` do: 15000, not 1.5e+04."""
    objective = {"metric": "val_loss", "direction": "minimize"}
    spec = parse_spec(small_spec("loss", objective=objective, budget={"n_trials": 2}))
    study = create_study(spec, sqlite_url)
    study.tell(study.ask(), 15000.0)
    shown = io.StringIO()
    follow(study, spec, [], Console(file=shown, width=200))
    assert "trials 1/2 · best val_loss=15000 · running 0" in shown.getvalue()


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_the_progress_line_shows_a_metric_named_with_brackets(sqlite_url: str, terminal: bool) -> None:
    objective = {"metric": "val_loss[/train]", "direction": "minimize"}
    spec = parse_spec(small_spec("brackets", objective=objective, budget={"n_trials": 2}))
    study = create_study(spec, sqlite_url)
    study.tell(study.ask(), 0.25)
    shown = io.StringIO()
    follow(study, spec, [], Console(file=shown, width=200, force_terminal=terminal))
    assert "best val_loss[/train]=0.25" in shown.getvalue()
