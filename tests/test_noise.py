"""The gradient noise scale: against the closed form of linear regression, and in the loop."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from conftest import small_spec
from tuner.errors import SpecError
from tuner.space import BatchSchedule, Hyperparameters
from tuner.spec import Objective, parse_spec
from tuner.study import create_study
from tuner.train.loop import train
from tuner.train.noise import MicroBatchGradients, NoiseScale
from tuner.train.reporter import Reporter
from tuner.train import memory
from tuner.workloads import load_workload
from user_workloads import LongSampleBlobs

CPU = torch.device("cpu")


def _true_noise_scale(offset: torch.Tensor, noise_std: float) -> float:
    """Linear regression, ``x ~ N(0, I_d)``, ``y = x . w* + e``, ``e ~ N(0, s^2)``, loss
    ``(x . w - y)^2 / 2``. With ``d = w - w*`` a sample's gradient is ``x (x . d - e)``, so
    ``G = d``, ``Sigma = d d^T + (|d|^2 + s^2) I`` (Gaussian fourth moments) and
    ``B_simple = tr(Sigma) / |G|^2 = ((dim + 1) |d|^2 + dim s^2) / |d|^2``."""
    dim, squared = offset.numel(), float(offset.square().sum())
    return ((dim + 1) * squared + dim * noise_std**2) / squared


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_converges_to_the_closed_form_of_linear_regression(micro_batches: int) -> None:
    generator = torch.Generator().manual_seed(0)
    dim, noise_std, step_size = 8, 1.0, 64
    target = torch.randn(dim, generator=generator)
    offset = torch.full((dim,), 0.5)
    model = torch.nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(target + offset)
    noise = NoiseScale(decay=0.995)
    gradients = MicroBatchGradients(model.parameters())
    for _ in range(3000):  # fresh samples at a fixed point: every step estimates the same B_simple
        x = torch.randn(step_size, dim, generator=generator)
        y = x @ target + noise_std * torch.randn(step_size, generator=generator)
        for part_x, part_y in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            weight = len(part_x) / step_size
            loss = 0.5 * (model(part_x).squeeze(1) - part_y).square().mean()
            (loss * weight).backward()
            gradients.add(len(part_x), weight)
        gradients.end_step(noise)
        model.zero_grad(set_to_none=True)
    expected = _true_noise_scale(offset, noise_std)
    assert expected == pytest.approx(13.0)
    assert noise.value == pytest.approx(expected, rel=0.05)


def test_unequal_micro_batches_count_by_their_harmonic_mean() -> None:
    noise = NoiseScale(decay=0.0)
    gradients = MicroBatchGradients([])
    gradients.squared_norms[:] = [torch.tensor(3.0), torch.tensor(5.0)]
    gradients.sizes[:] = [1, 3]
    gradients.end_step(noise)
    # mean |g_i|^2 = 4 over B_small = 1.5, |G_big|^2 = 0 over B_big = 4.
    assert noise.squared_gradient == pytest.approx((0 - 1.5 * 4) / (4 - 1.5))
    assert noise.trace == pytest.approx(4 / (1 / 1.5 - 1 / 4))


def test_no_estimate_before_a_step_or_from_one_micro_batch() -> None:
    noise = NoiseScale()
    assert noise.value is None
    gradients = MicroBatchGradients([])
    gradients.squared_norms.append(torch.tensor(1.0))
    gradients.sizes.append(8)
    gradients.end_step(noise)
    assert noise.steps == 0 and noise.value is None


@pytest.mark.parametrize("norm", [math.nan, math.inf])
def test_no_estimate_from_a_step_whose_gradient_is_not_finite(norm: float) -> None:
    """A diverging step: its noise scale would be recorded, and printed, as NaN."""
    noise = NoiseScale()
    noise.update(1.0, 8, 0.6, 16)
    assert noise.value is not None
    noise.update(norm, 8, norm, 16)
    assert noise.value is None


def _reporter() -> Reporter:
    return Reporter(optuna.create_study(direction="maximize").ask(), [Objective(metric="val_accuracy")])


def test_measuring_splits_a_whole_batch_in_two_and_keeps_the_training() -> None:
    workload = load_workload("digits_mlp")
    hp = Hyperparameters(batch_size=128, lr=0.05, base_lr=0.05, epochs=3, optimizer="sgd", seed=1)
    plain, measured = _reporter(), _reporter()
    train(workload, hp, plain, device=CPU)
    train(workload, hp, measured, device=CPU, measure_noise=True)
    assert "gradient_noise_scale" not in plain.records
    assert (measured.records["micro_batch_size"], measured.records["accumulation_steps"]) == (64, 2)
    scales = measured.records["gradient_noise_scale"]
    assert len(scales) == 3 and all(value is not None and value > 0 for value in scales)
    for a, b in zip(plain.history, measured.history):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4)


def test_an_epoch_restarted_after_out_of_memory_measures_as_if_it_had_started_at_its_micro_batch() -> None:
    """The step cut short by out-of-memory in mid-epoch is not counted in the restarted
    epoch's first step: the adaptive schedule picks the batches of a run at that micro-batch."""
    schedule = BatchSchedule(name="adaptive", low=8, high=256, lr_exponent=0.5)
    hp = Hyperparameters(batch_size=64, lr=0.05, base_lr=0.05, epochs=4, optimizer="sgd", seed=0, schedule=schedule)
    # The first epoch's 41st sample: in the second micro-batch (of 32) of its first step.
    long = int(torch.randperm(256, generator=torch.Generator().manual_seed(hp.seed))[40])
    restarted, at_16 = _reporter(), _reporter()
    train(LongSampleBlobs(long), hp, restarted, device=CPU, limits=memory.MicroBatchLimits())
    train(LongSampleBlobs(long), hp, at_16, device=CPU, micro_batch_size=16)
    assert restarted.records["oom_retries"] == 1
    for name in ("gradient_noise_scale", "batch_size_per_epoch"):
        assert restarted.records[name] == at_16.records[name]
    assert [e["val_loss"] for e in restarted.history] == [e["val_loss"] for e in at_16.history]


def test_a_training_function_cannot_measure_the_noise_scale(sqlite_url: str) -> None:
    spec = parse_spec(small_spec("own", workload="user_workloads:own_loop", measure_noise_scale=True))
    with pytest.raises(SpecError, match="spec field 'measure_noise_scale': measuring the noise scale needs"):
        create_study(spec, sqlite_url)
