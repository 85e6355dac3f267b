"""Resume on a real GPU: dropout draws from the device's generator, which the checkpoint must
carry as it carries the CPU's, or a resumed trial's masks repeat its first epochs'."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import reporter_stopped_after_two_epochs
from tuner.space import Hyperparameters
from tuner.spec import Objective
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.workloads import Classification

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

OBJECTIVE = [Objective(metric="val_accuracy", direction="maximize")]
HP = Hyperparameters(batch_size=64, lr=1e-3, epochs=4, base_lr=1e-3, seed=3)


def dropout_workload() -> Classification:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1024, 32, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    return Classification(
        lambda hp: nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 2)),
        TensorDataset(inputs[:768], targets[:768]),
        TensorDataset(inputs[768:], targets[768:]),
    )


def _reporter() -> Reporter:
    return Reporter(optuna.create_study(direction="maximize").ask(), OBJECTIVE)


def test_a_trial_resumed_on_the_gpu_draws_the_dropout_masks_of_an_uninterrupted_one(tmp_path) -> None:
    device = torch.device("cuda")
    uninterrupted = _reporter()
    train(dropout_workload(), HP, uninterrupted, device=device)

    checkpoint = Checkpoint(tmp_path / "trial.pt")
    with pytest.raises(KeyboardInterrupt):
        train(dropout_workload(), HP, reporter_stopped_after_two_epochs(), device=device, checkpoint=checkpoint)
    resumed = _reporter()
    train(dropout_workload(), HP, resumed, device=device, checkpoint=checkpoint)
    for whole, again in zip(uninterrupted.history, resumed.history, strict=True):
        assert again["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
