"""``tuner probe``: doubling then binary search for the largest micro-batch, under the injected
memory limit of ``TUNER_INJECT_OOM_ABOVE``, and the answer shared through the study."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import small_spec
from tuner.cli import app
from tuner.errors import BadInputError
from tuner.space import Hyperparameters
from tuner.spec import parse_spec
from tuner.study import load_study
from tuner.train import memory
from tuner.train.probe import probe, probe_spec
from tuner.worker import WorkerOptions, run_worker
from tuner.workloads import load_workload

CPU = torch.device("cpu")
HP = Hyperparameters(batch_size=512, lr=1e-3, epochs=1, base_lr=1e-3)


def _probe(max_size: int = 512):
    return probe(load_workload("digits_mlp"), HP, device=CPU, max_size=max_size, min_seconds=0.0)


def test_doubles_then_searches_between_the_last_fit_and_the_first_failure(monkeypatch) -> None:
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "100")
    result = _probe()
    sizes = [attempt.micro_batch_size for attempt in result.attempts]
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    assert (result.largest_fit, result.smallest_failed) == (100, 101)
    assert result.micro_batch_size == 95  # less the 5% safety margin
    for attempt in result.attempts:
        assert attempt.fits == (attempt.micro_batch_size <= 100)
        measured = attempt.samples_per_s is not None and attempt.peak_memory_mb is not None
        assert measured == attempt.fits


def test_without_a_failure_the_largest_size_searched_is_the_answer() -> None:
    result = _probe(max_size=96)
    assert [attempt.micro_batch_size for attempt in result.attempts] == [1, 2, 4, 8, 16, 32, 64, 96]
    assert result.micro_batch_size == result.largest_fit == 96
    assert result.limits() == memory.MicroBatchLimits(largest_fit=96)


def test_when_nothing_fits_the_probe_says_so(monkeypatch) -> None:
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "0")
    result = _probe()
    assert result.limits() == memory.MicroBatchLimits(smallest_failed=1)


def test_create_probe_stores_what_fits_and_trials_start_there(
    monkeypatch, write_spec, sqlite_url: str, tmp_path: Path
) -> None:
    search = {
        "batch_size": {"low": 128, "high": 128, "scale": "pow2"},
        "lr": {"low": 1e-3, "high": 3e-2, "log": True},
        "epochs": {"low": 1, "high": 1},
    }
    spec = write_spec(small_spec("probed", budget={"n_trials": 1}, search=search, pruner={"name": "none"}))
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "64")
    arguments = ["create", str(spec), "--storage", sqlite_url, "--probe", "--device", "cpu"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "micro-batch" in result.stdout and "samples/s" in result.stdout
    assert "largest micro-batch that fits: 64; smallest that failed: 65; workers use 60" in result.stdout
    assert "stored in study 'probed'" in result.stdout

    study, _ = load_study("probed", sqlite_url)
    key = memory.limits_key("digits_mlp", memory.device_name(CPU), "fp32")
    assert memory.load_limits(study, key) == memory.MicroBatchLimits(largest_fit=60, smallest_failed=65)
    run_worker("probed", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    (trial,) = study.get_trials()
    assert trial.user_attrs["micro_batch_size"] == 60
    assert trial.user_attrs["accumulation_steps"] == 3
    assert trial.user_attrs["oom_retries"] == 0


def test_a_training_function_cannot_be_probed() -> None:
    spec = parse_spec(small_spec("own", workload="user_workloads:own_loop"))
    with pytest.raises(BadInputError, match="training function with its own loop"):
        probe_spec(spec, CPU)
