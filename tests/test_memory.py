"""Out-of-memory without a GPU: ``TUNER_INJECT_OOM_ABOVE`` makes a forward pass of more samples
raise torch.OutOfMemoryError, as a full GPU would; the loop must keep the effective batch, its
gradients and its results, and the study must learn what fits once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import reporter_stopped_after_two_epochs, small_spec
from tuner.space import Hyperparameters
from tuner.spec import Objective, parse_spec
from tuner.study import create_study, load_study
from tuner.train import memory
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import Batches, forward_backward, split_step, train
from tuner.train.reporter import Reporter
from tuner.worker import WorkerOptions, run_worker
from tuner.workloads import load_workload

HP = Hyperparameters(batch_size=512, lr=3e-3, epochs=2, base_lr=3e-3, seed=7)


def test_start_is_the_whole_step_unless_known_to_fail() -> None:
    limits = memory.MicroBatchLimits()
    assert limits.start(512) == 512
    limits.record_failure(128)
    assert limits.start(100) == 100
    assert limits.start(512) == 64  # halved until below the smallest failure
    limits.record_fit(96)
    assert limits.start(512) == 96  # the largest known fit beats halving
    assert limits.start(32) == 32


def test_newer_facts_win_over_older_ones() -> None:
    limits = memory.MicroBatchLimits(largest_fit=64, smallest_failed=128)
    limits.record_failure(64)
    assert (limits.largest_fit, limits.smallest_failed) == (None, 64)
    limits.update(memory.MicroBatchLimits(largest_fit=256))
    assert (limits.largest_fit, limits.smallest_failed) == (256, None)


def test_accumulated_micro_batch_gradient_equals_the_big_batch_gradient() -> None:
    workload = load_workload("digits_mlp")
    torch.manual_seed(0)
    model = workload.model(HP)
    batches = Batches(workload.train_data, torch.device("cpu"))
    # A short last step of an epoch: 413 samples in micro-batches of 64 ends with 29.
    step = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0))[:413]

    def gradient(micro_batch_size: int) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        parts = split_step(step, micro_batch_size)
        data = batches([part for part, _ in parts])
        for (inputs, targets), (_, weight) in zip(data, parts):
            forward_backward(model, workload, inputs, targets, weight, "fp32")
        return [p.grad.clone() for p in model.parameters()]

    whole, accumulated = gradient(413), gradient(64)
    assert len(split_step(step, 64)) == 7
    for big, small in zip(whole, accumulated):
        torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-7)


def _train(limits: memory.MicroBatchLimits | None = None) -> tuple[dict[str, float], dict]:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    reporter = Reporter(study.ask(), [Objective(metric="val_accuracy")])
    metrics = train(load_workload("digits_mlp"), HP, reporter, device=torch.device("cpu"), limits=limits)
    return metrics, reporter.records


def test_effective_batch_512_under_a_limit_of_64_trains_like_an_unlimited_run(monkeypatch) -> None:
    unlimited, unlimited_records = _train()
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "64")
    limits = memory.MicroBatchLimits()
    limited, records = _train(limits)
    assert unlimited_records["micro_batch_size"] == 512
    assert records["micro_batch_size"] == 64
    assert records["accumulation_steps"] == 8
    assert records["oom_retries"] == 3  # 512, 256 and 128 ran out of memory
    assert records["precision"] == "fp32"
    assert (limits.largest_fit, limits.smallest_failed) == (64, 128)
    assert limited["val_accuracy"] == unlimited["val_accuracy"]
    assert limited["val_loss"] == pytest.approx(unlimited["val_loss"], rel=1e-5)
    assert limited["train_loss"] == pytest.approx(unlimited["train_loss"], rel=1e-5)


def test_a_trial_resumed_after_running_out_of_memory_keeps_its_count_of_retries(monkeypatch, tmp_path: Path) -> None:
    """The retries before the checkpoint are the trial's: a resume counted from 0 again."""
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "64")
    hp, checkpoint = replace(HP, epochs=3), Checkpoint(tmp_path / "trial.pt")
    with pytest.raises(KeyboardInterrupt):
        train(load_workload("digits_mlp"), hp, reporter_stopped_after_two_epochs(), device=torch.device("cpu"),
              checkpoint=checkpoint)
    resumed = Reporter(optuna.create_study(direction="maximize").ask(), [Objective(metric="val_accuracy")])
    # A worker that knows what fits runs out of memory no more.
    train(load_workload("digits_mlp"), hp, resumed, device=torch.device("cpu"), checkpoint=checkpoint,
          limits=memory.MicroBatchLimits(largest_fit=64, smallest_failed=128))
    assert resumed.records["resumed_from_epoch"] == 2
    assert resumed.records["oom_retries"] == 3


def _study(name: str, url: str, n_trials: int) -> None:
    spec = small_spec(
        name,
        budget={"n_trials": n_trials},
        search={
            "batch_size": {"low": 512, "high": 512, "scale": "pow2"},
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "epochs": {"low": 1, "high": 1},
        },
        pruner={"name": "none"},
    )
    create_study(parse_spec(spec), url)


def test_what_fits_is_learned_once_and_the_next_trial_starts_there(
    monkeypatch, sqlite_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "64")
    _study("learn", sqlite_url, n_trials=2)
    run_worker("learn", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    study, _ = load_study("learn", sqlite_url)
    first, second = study.get_trials()
    assert first.state == second.state == TrialState.COMPLETE
    assert first.user_attrs["oom_retries"] == 3
    assert second.user_attrs["oom_retries"] == 0
    for trial in (first, second):
        assert trial.user_attrs["micro_batch_size"] == 64
        assert trial.user_attrs["accumulation_steps"] == 8
        assert trial.user_attrs["effective_batch_size"] == 512
        assert trial.user_attrs["precision"] == "fp32"
        assert trial.user_attrs["peak_memory_mb"] > 0
        assert trial.user_attrs["samples_per_s"] > 0
    key = memory.limits_key("digits_mlp", memory.device_name(torch.device("cpu")), "fp32")
    assert memory.load_limits(study, key) == memory.MicroBatchLimits(largest_fit=64, smallest_failed=128)


def test_limits_the_study_knows_already_are_not_written_again(tmp_path: Path) -> None:
    journal = tmp_path / "limits.log"
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.create_study(storage=optuna.storages.JournalStorage(backend))
    learned = memory.MicroBatchLimits(largest_fit=64, smallest_failed=128)
    memory.save_limits(study, "key", learned)
    size = journal.stat().st_size
    assert memory.save_limits(study, "key", memory.MicroBatchLimits(largest_fit=32)) == learned
    assert journal.stat().st_size == size
    memory.save_limits(study, "key", memory.MicroBatchLimits(largest_fit=96))
    assert journal.stat().st_size > size
    assert memory.load_limits(study, "key") == memory.MicroBatchLimits(largest_fit=96, smallest_failed=128)


def test_a_limit_below_one_prunes_as_out_of_memory_and_marks_the_trial_infeasible(
    monkeypatch, sqlite_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv(memory.INJECT_OOM_ENV, "0")
    _study("no-memory", sqlite_url, n_trials=2)
    summary = run_worker("no-memory", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    assert summary.trials == {"out_of_memory": 2}
    study, _ = load_study("no-memory", sqlite_url)
    first, second = study.get_trials()
    for trial in (first, second):
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["stop_reason"] == "out_of_memory"
        assert trial.constraints == {"out_of_memory": 1.0}
        assert trial.user_attrs["peak_memory_mb"] > 0
    assert first.user_attrs["oom_retries"] == 10  # 512 halved down to 1
    assert second.user_attrs["oom_retries"] == 1  # the study knew that even 1 fails
