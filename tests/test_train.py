"""The training loop on CPU: exact micro-batch gradients, seeded repeatability, divergence."""

import math

import optuna
import pytest
import torch

from tuner.space import Hyperparameters
from tuner.spec import Objective
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import train
from tuner.train.schedule import lr_factor
from tuner.train.reporter import Diverged, Reporter
from tuner.workloads import load_workload

OBJECTIVE = [Objective(metric="val_accuracy", direction="maximize")]


def _reporter() -> Reporter:
    study = optuna.create_study(direction="maximize")
    return Reporter(study.ask(), OBJECTIVE)


def _curve(reporter: Reporter) -> list[dict]:
    """The history less its timings, which differ from run to run."""
    return [{k: v for k, v in entry.items() if k != "train_time_s"} for entry in reporter.history]


def _hp(**changes) -> Hyperparameters:
    values = dict(batch_size=128, lr=0.01, base_lr=0.01, epochs=3, optimizer="adamw", seed=3)
    values.update(changes)
    return Hyperparameters(**values)


def test_same_seed_same_curve():
    workload = load_workload("digits_mlp")
    first, second = _reporter(), _reporter()
    train(workload, _hp(), first, device=torch.device("cpu"))
    train(workload, _hp(), second, device=torch.device("cpu"))
    assert _curve(first) == _curve(second)
    assert [entry["epoch"] for entry in first.history] == [1, 2, 3]
    assert first.history[-1]["val_accuracy"] > 0.8


def test_micro_batches_give_the_same_training():
    workload = load_workload("digits_mlp")
    whole, split = _reporter(), _reporter()
    train(workload, _hp(optimizer="sgd"), whole, device=torch.device("cpu"))
    train(workload, _hp(optimizer="sgd"), split, device=torch.device("cpu"), micro_batch_size=32)
    assert split.records["accumulation_steps"] == 4 and split.records["micro_batch_size"] == 32
    for a, b in zip(whole.history, split.history):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]


def test_resume_from_checkpoint_gives_the_uninterrupted_curve(tmp_path):
    workload = load_workload("digits_mlp")
    uninterrupted = _reporter()
    train(workload, _hp(epochs=4), uninterrupted, device=torch.device("cpu"))

    class StopAfterTwo(Reporter):
        def decide(self, epoch):
            super().decide(epoch)
            if epoch == 2:
                raise KeyboardInterrupt

    checkpoint = Checkpoint(tmp_path / "trial.pt")
    study = optuna.create_study(direction="maximize")
    with pytest.raises(KeyboardInterrupt):
        train(workload, _hp(epochs=4), StopAfterTwo(study.ask(), OBJECTIVE), device=torch.device("cpu"), checkpoint=checkpoint)
    resumed = _reporter()
    train(workload, _hp(epochs=4), resumed, device=torch.device("cpu"), checkpoint=checkpoint)
    assert _curve(resumed) == _curve(uninterrupted)


def test_nan_loss_is_divergence():
    workload = load_workload("digits_mlp")
    with pytest.raises(Diverged, match="is nan"):
        train(workload, _hp(lr=1e6, base_lr=1e6, optimizer="sgd"), _reporter(), device=torch.device("cpu"))


def test_warmup_then_the_full_rate_then_a_cosine_over_the_last_fifth():
    def factor(step: int) -> float:  # 100 equal steps
        return lr_factor(step / 100, (step + 1) / 100, decay=True)

    assert factor(0) == pytest.approx(0.2)
    assert factor(4) == pytest.approx(1.0)
    assert factor(40) == factor(79) == 1.0
    assert factor(90) == pytest.approx(0.5)
    assert factor(85) > factor(90) > factor(95)
    assert factor(100) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(0.9, 0.95, decay=False) == 1.0


def test_resume_after_the_last_epoch_returns_its_metrics(tmp_path):
    workload = load_workload("digits_mlp")
    checkpoint = Checkpoint(tmp_path / "trial.pt")
    first = _reporter()
    final = train(workload, _hp(epochs=2), first, device=torch.device("cpu"), checkpoint=checkpoint)
    again = _reporter()
    assert train(workload, _hp(epochs=2), again, device=torch.device("cpu"), checkpoint=checkpoint) == final
    assert _curve(again) == _curve(first)
