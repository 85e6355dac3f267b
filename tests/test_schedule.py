"""Batch schedules: constant, ramp (Smith et al. 2017) and adaptive (the noise scale)."""

from __future__ import annotations

import optuna
import pytest
import torch

from conftest import reporter_stopped_after_two_epochs, small_spec
from tuner.errors import SpecError
from tuner.space import BatchSchedule, Hyperparameters, suggest
from tuner.spec import Objective, parse_spec
from tuner.study import create_study
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import train
from tuner.train.reporter import Reporter
from tuner.train.schedule import epoch_batch_size, epoch_lr
from tuner.worker import WorkerOptions, run_worker
from tuner.workloads import load_workload

CPU = torch.device("cpu")
RAMP = BatchSchedule(name="ramp", ramp_factor=2, ramp_at=(0.5, 0.75))
ADAPTIVE = BatchSchedule(name="adaptive", low=16, high=256, lr_exponent=0.5)


def _hp(schedule: BatchSchedule, **changes) -> Hyperparameters:
    values = dict(batch_size=32, lr=0.01, base_lr=0.01, epochs=4, optimizer="sgd", seed=2, schedule=schedule)
    values.update(changes)
    return Hyperparameters(**values)


def _reporter() -> Reporter:
    return Reporter(optuna.create_study(direction="maximize").ask(), [Objective(metric="val_accuracy")])


def test_ramp_multiplies_the_batch_at_its_fractions_of_the_epochs() -> None:
    hp = _hp(RAMP)
    assert [epoch_batch_size(hp, epoch, [], None, 1437) for epoch in range(4)] == [32, 32, 64, 128]
    assert epoch_lr(hp, 3, 128) == hp.lr  # the growing batch replaces the decay
    # 0.55 x 100 is 55.00000000000001 in floating point: still epoch 55, not 56.
    long = _hp(BatchSchedule(name="ramp", ramp_at=(0.55,)), epochs=100)
    assert [epoch_batch_size(long, epoch, [], None, 1437) for epoch in (54, 55)] == [32, 64]


def test_a_ramp_held_at_the_top_of_the_range_lowers_the_rate_instead() -> None:
    """Smith et al. decay the rate once the batch is at its largest: the batch that could not
    grow by 2 halves the rate, so every ramp anneals as much whatever its starting batch."""
    held = _hp(BatchSchedule(name="ramp", ramp_factor=2, ramp_at=(0.5, 0.75), high=64))
    assert [epoch_batch_size(held, epoch, [], None, 1437) for epoch in range(4)] == [32, 32, 64, 64]
    assert [epoch_lr(held, epoch, 64 if epoch > 1 else 32) for epoch in range(4)] == pytest.approx([0.01, 0.01, 0.01, 0.005])
    # The training set holds it back as the range does.
    assert epoch_batch_size(_hp(RAMP), 3, [], None, 100) == 100
    assert epoch_lr(_hp(RAMP), 3, 100) == pytest.approx(0.01 * 100 / 128)
    # A hand-written batch above the range is trained as it is, and only its growth is held.
    above = _hp(BatchSchedule(name="ramp", ramp_at=(0.5,), high=16))
    assert [epoch_batch_size(above, epoch, [], None, 1437) for epoch in (0, 3)] == [32, 32]
    assert epoch_lr(above, 0, 32) == 0.01 and epoch_lr(above, 3, 32) == 0.005


def test_adaptive_follows_the_noise_scale_within_the_range() -> None:
    hp = _hp(ADAPTIVE)
    assert epoch_batch_size(hp, 0, [], 100.0, 1437) == 32  # the first epoch has no measure yet
    assert epoch_batch_size(hp, 1, [32], 100.4, 1437) == 100
    assert epoch_batch_size(hp, 1, [32], 5000.0, 1437) == 256
    assert epoch_batch_size(hp, 1, [32], 3.0, 1437) == 16
    assert epoch_batch_size(hp, 2, [32, 64], None, 1437) == 64
    assert epoch_lr(hp, 1, 128) == pytest.approx(0.02)  # sqrt rule: 4x the batch, 2x the rate


def test_ramp_trains_with_the_growing_batch_at_a_constant_rate() -> None:
    reporter = _reporter()
    train(load_workload("digits_mlp"), _hp(RAMP), reporter, device=CPU)
    assert reporter.records["batch_size_per_epoch"] == [32, 32, 64, 128]
    assert reporter.history[-1]["lr"] == pytest.approx(0.01)
    assert reporter.history[-1]["val_accuracy"] > 0.8

    held = _reporter()
    train(load_workload("digits_mlp"), _hp(BatchSchedule(name="ramp", high=64)), held, device=CPU)
    assert held.records["batch_size_per_epoch"] == [32, 32, 64, 64]
    assert [epoch["lr"] for epoch in held.history[1:]] == pytest.approx([0.01, 0.01, 0.005])


def test_adaptive_training_uses_the_measured_scale_and_resumes_the_same(tmp_path) -> None:
    workload = load_workload("digits_mlp")
    uninterrupted = _reporter()
    train(workload, _hp(ADAPTIVE), uninterrupted, device=CPU)
    used, scales = uninterrupted.records["batch_size_per_epoch"], uninterrupted.records["gradient_noise_scale"]
    assert used[0] == 32 and len(scales) == 4
    assert used[1:] == [max(16, min(round(scale), 256)) for scale in scales[:-1]]

    checkpoint = Checkpoint(tmp_path / "trial.pt")
    with pytest.raises(KeyboardInterrupt):
        train(workload, _hp(ADAPTIVE), reporter_stopped_after_two_epochs(), device=CPU, checkpoint=checkpoint)
    resumed = _reporter()
    train(workload, _hp(ADAPTIVE), resumed, device=CPU, checkpoint=checkpoint)
    assert resumed.records["batch_size_per_epoch"] == used
    assert resumed.records["gradient_noise_scale"] == pytest.approx(scales)
    assert resumed.history[-1]["val_loss"] == pytest.approx(uninterrupted.history[-1]["val_loss"], rel=1e-6)


def test_the_schedule_is_searched_as_a_categorical() -> None:
    spec = small_spec("s")
    spec["search"]["lr"]["scale_with_batch"] = "linear"
    spec["search"]["batch_schedule"] = {"choices": ["constant", "ramp", "adaptive"], "ramp_factor": 4}
    space = parse_spec(spec).search
    hp = suggest(optuna.trial.FixedTrial({"batch_size": 64, "base_lr": 0.01, "epochs": 2, "batch_schedule": "adaptive"}), space, seed=0)
    assert hp.schedule == BatchSchedule(name="adaptive", ramp_factor=4, ramp_at=(0.5, 0.75), low=32, high=256, lr_exponent=1.0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names = {suggest(study.ask(), space, seed=0).schedule.name for _ in range(20)}
    assert names == {"constant", "ramp", "adaptive"}


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ({"choices": ["warmup"]}, r"search\.batch_schedule\.choices\.0.*'constant', 'ramp' or 'adaptive'.*warmup"),
        ({"choices": ["ramp"], "ramp_at": [1.5]}, r"search\.batch_schedule\.ramp_at\.0.*less than 1"),
        ({"choices": ["ramp"], "ramp_factor": 1}, r"search\.batch_schedule\.ramp_factor.*greater than or equal to 2"),
    ],
)
def test_bad_schedules_name_the_field(schedule: dict, expected: str) -> None:
    spec = small_spec("bad")
    spec["search"]["batch_schedule"] = schedule
    with pytest.raises(SpecError, match=expected):
        parse_spec(spec)


def test_a_study_records_the_batches_and_noise_scales_of_its_trials(sqlite_url: str, tmp_path) -> None:
    spec = small_spec("scheduled", budget={"n_trials": 3}, measure_noise_scale=True, pruner={"name": "none"})
    spec["search"]["batch_schedule"] = {"choices": ["constant", "ramp", "adaptive"]}
    create_study(parse_spec(spec), sqlite_url)
    run_worker("scheduled", sqlite_url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path))
    for trial in optuna.load_study(study_name="scheduled", storage=sqlite_url).trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        epochs = trial.params["epochs"]
        assert len(trial.user_attrs["batch_size_per_epoch"]) == len(trial.user_attrs["gradient_noise_scale"]) == epochs
        assert trial.user_attrs["batch_size_per_epoch"][0] == trial.params["batch_size"]
        assert trial.params["batch_schedule"] in ("constant", "ramp", "adaptive")


def test_a_training_function_is_refused_the_ramp_schedule(sqlite_url: str) -> None:
    """Its own loop trains at ``hp.batch_size`` throughout: a searched ramp would change nothing."""
    spec = small_spec("own-ramp", workload="user_workloads:own_loop")
    spec["search"]["batch_schedule"] = {"choices": ["constant", "ramp"]}
    with pytest.raises(SpecError, match="spec field 'search.batch_schedule.choices': the ramp schedule needs"):
        create_study(parse_spec(spec), sqlite_url)
    assert optuna.get_all_study_names(sqlite_url) == []
