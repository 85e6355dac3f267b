"""The training loop on CPU: exact micro-batch gradients, seeded repeatability, divergence, the
averaged weights it evaluates."""

import math
import random

import numpy as np
import optuna
import pytest
import torch

from conftest import reporter_stopped_after_two_epochs
from tuner.space import Hyperparameters
from tuner.spec import Objective
from tuner.train.averaging import WeightAverage
from tuner.train.checkpoint import Checkpoint
from tuner.train.loop import Batches, evaluate, evaluated_weights, train
from tuner.train.schedule import lr_factor
from tuner.train.reporter import Diverged, Reporter
from tuner.workloads import Classification, load_workload

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


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_resume_from_checkpoint_gives_the_uninterrupted_curve(tmp_path, ema_decay):
    workload = load_workload("digits_mlp")
    uninterrupted = _reporter()
    train(workload, _hp(epochs=4), uninterrupted, device=torch.device("cpu"), ema_decay=ema_decay)

    checkpoint = Checkpoint(tmp_path / "trial.pt")
    with pytest.raises(KeyboardInterrupt):
        train(
            workload, _hp(epochs=4), reporter_stopped_after_two_epochs(), device=torch.device("cpu"),
            checkpoint=checkpoint, ema_decay=ema_decay,
        )
    resumed = _reporter()
    train(workload, _hp(epochs=4), resumed, device=torch.device("cpu"), checkpoint=checkpoint, ema_decay=ema_decay)
    assert _curve(resumed) == _curve(uninterrupted)


class _NoisyDigits(torch.utils.data.Dataset):
    """Digits augmented with noise drawn from Python's and NumPy's generators, as a workload's
    own Dataset may draw it."""

    def __init__(self, data: torch.utils.data.TensorDataset, size: int) -> None:
        self.features, self.targets = (tensor[:size] for tensor in data.tensors)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = random.gauss(0.0, 0.1) + np.random.normal(0.0, 0.1, size=self.features.shape[1])
        return self.features[index] + torch.as_tensor(noise, dtype=torch.float32), self.targets[index]


def test_a_workloads_python_and_numpy_draws_are_seeded_and_resumed(tmp_path):
    digits = load_workload("digits_mlp")
    workload = Classification(digits.model, _NoisyDigits(digits.train_data, 256), digits.val_data)
    uninterrupted, again = _reporter(), _reporter()
    train(workload, _hp(batch_size=32, epochs=4), uninterrupted, device=torch.device("cpu"))
    train(workload, _hp(batch_size=32, epochs=4), again, device=torch.device("cpu"))
    assert _curve(again) == _curve(uninterrupted)

    checkpoint = Checkpoint(tmp_path / "trial.pt")
    with pytest.raises(KeyboardInterrupt):
        train(
            workload, _hp(batch_size=32, epochs=4), reporter_stopped_after_two_epochs(), device=torch.device("cpu"),
            checkpoint=checkpoint,
        )
    resumed = _reporter()
    train(workload, _hp(batch_size=32, epochs=4), resumed, device=torch.device("cpu"), checkpoint=checkpoint)
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


def test_a_checkpoint_that_cannot_be_read_is_trained_again_from_the_start(tmp_path, caplog):
    """A file cut short (a full disk, a copy by hand) is no reason to lose the trial."""
    workload = load_workload("digits_mlp")
    fresh = _reporter()
    train(workload, _hp(epochs=2), fresh, device=torch.device("cpu"))
    path = tmp_path / "trial.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    again = _reporter()
    train(workload, _hp(epochs=2), again, device=torch.device("cpu"), checkpoint=Checkpoint(path))
    assert _curve(again) == _curve(fresh)
    assert f"checkpoint {path} cannot be read" in caplog.text
    assert Checkpoint(path).load()["epoch"] == 2


def test_resume_after_the_last_epoch_keeps_what_the_loop_recorded(tmp_path):
    """A worker killed while telling its trial's result leaves the last epoch's checkpoint: the
    retry trains nothing, yet records the trial's micro-batch, time, throughput and memory."""
    workload = load_workload("digits_mlp")
    checkpoint = Checkpoint(tmp_path / "trial.pt")
    first = _reporter()
    train(workload, _hp(epochs=2), first, device=torch.device("cpu"), checkpoint=checkpoint, micro_batch_size=32)
    again = _reporter()
    train(workload, _hp(epochs=2), again, device=torch.device("cpu"), checkpoint=checkpoint)
    for name in ("micro_batch_size", "accumulation_steps", "precision", "oom_retries", "train_time_s",
                 "samples_per_s", "peak_memory_mb"):
        assert again.records.get(name) == first.records[name], name
    assert again.records["micro_batch_size"] == 32 and again.records["resumed_from_epoch"] == 2


def test_the_average_of_the_weights_is_evaluated_and_kept_while_the_weights_train_unchanged():
    workload = load_workload("digits_mlp")
    cpu = torch.device("cpu")
    averaged, raw = _reporter(), _reporter()
    checkpoint = Checkpoint()
    train(workload, _hp(), averaged, device=cpu, checkpoint=checkpoint, ema_decay=0.99)
    train(workload, _hp(), raw, device=cpu)
    assert [e["train_loss"] for e in averaged.history] == [e["train_loss"] for e in raw.history]
    assert [e["val_loss"] for e in averaged.history] != [e["val_loss"] for e in raw.history]

    kept = workload.model(_hp())
    kept.load_state_dict(evaluated_weights(checkpoint.load()))
    metrics = evaluate(kept, workload, Batches(workload.val_data, cpu), 1024, "fp32")
    assert metrics["val_loss"] == pytest.approx(averaged.history[-1]["val_loss"], rel=1e-6)


def test_a_short_run_averages_its_last_steps_and_a_long_one_its_last_hundred():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update()
    # Step 1 decays by 2/11, not 0.99: a few steps in, the average is not the initial weights.
    assert float(average.module.weight) == pytest.approx(1 - 2 / 11)
    for _ in range(2000):
        average.update()
    assert float(average.module.weight) == pytest.approx(1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(100):
        average.update()
    # Capped at 0.99: a hundred steps at the new weights move it 1 - 0.99**100 of the way.
    assert float(average.module.weight) == pytest.approx(1 + (1 - 0.99**100), rel=1e-4)
    restored = WeightAverage(model, decay=0.99)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == average.steps == 2101
    assert float(restored.module.weight) == float(average.module.weight)


def test_a_spec_with_ema_decay_trains_its_trials_and_its_retrained_model_on_the_average(tmp_path):
    from tuner.retrain import fixed_spec, retrain
    from tuner.spec import parse_spec
    from tuner.study import create_study, load_study
    from tuner.worker import WorkerOptions, run_worker

    def spec(name: str, ema_decay: float) -> dict:
        return {
            "name": name, "workload": "digits_mlp", "objective": {"metric": "val_accuracy"},
            "budget": {"n_trials": 1}, "ema_decay": ema_decay, "pruner": {"name": "none"},
            "search": {
                "batch_size": {"low": 128, "high": 128, "scale": "pow2"},
                "lr": {"low": 1e-2, "high": 1e-2, "log": True},
                "epochs": {"low": 2, "high": 2},
            },
        }

    url = f"sqlite:///{tmp_path / 'study.db'}"
    curves = {}
    for name, decay in (("raw", 0.0), ("averaged", 0.99)):
        create_study(parse_spec(spec(name, decay)), url)
        run_worker(name, url, WorkerOptions(device="cpu", checkpoint_dir=tmp_path / "ckpt"))
        study, stored = load_study(name, url)
        curves[name] = study.trials[0].user_attrs["history"]
    assert [e["train_loss"] for e in curves["averaged"]] == [e["train_loss"] for e in curves["raw"]]
    assert [e["val_loss"] for e in curves["averaged"]] != [e["val_loss"] for e in curves["raw"]]

    fixed = fixed_spec(study, stored)
    assert fixed.ema_decay == 0.99
    metrics, saved = retrain(fixed, device="cpu", out=tmp_path / "model.pt")
    workload = load_workload("digits_mlp")
    model = workload.model(fixed.hyperparameters)
    model.load_state_dict(torch.load(saved))
    kept = evaluate(model, workload, Batches(workload.val_data, torch.device("cpu")), 1024, "fp32")
    assert kept["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)


def test_two_writers_of_one_checkpoint_with_the_same_process_id_leave_one_whole_state(tmp_path):
    """Workers in containers are all process 1: a paused one that comes back while its trial's
    retry runs writes the same checkpoint as the retry. Two threads of one process stand in."""
    import threading

    path = tmp_path / "trial.pt"
    states = [{"weights": torch.full((2_000_000,), float(writer))} for writer in range(2)]
    errors: list[Exception] = []
    for _ in range(5):
        start = threading.Barrier(2)

        def write(state: dict) -> None:
            start.wait()
            try:
                Checkpoint(path).save(state)
            except Exception as error:
                errors.append(error)

        threads = [threading.Thread(target=write, args=(state,)) for state in states]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        saved = Checkpoint(path).load()["weights"]
        assert any(torch.equal(saved, state["weights"]) for state in states)
