"""Real out-of-memory on a real GPU: a wide layer under a per-process memory cap runs out of
memory at a large micro-batch; the loop must halve, keep the effective batch, and learn the limit."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import small_spec, tuner
from tuner.space import Hyperparameters
from tuner.spec import Objective, parse_spec
from tuner.study import create_study, load_study
from tuner.train import memory
from tuner.train.loop import train
from tuner.train.probe import probe
from tuner.train.reporter import Reporter
from tuner.workloads import Classification

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CAP_BYTES = {"fp32": 3 * 2**30, "bf16": 3 * 2**29}  # per precision: bf16 halves the activations
BATCH = 4096
HIDDEN = 65536  # about 1 MiB of activations and their gradients per sample in fp32


def wide_workload() -> Classification:
    """About 1 GiB of weights, gradients and AdamW state; a step of 4096 samples needs 4 GiB more."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, 1024, generator=generator)
    targets = torch.randint(0, 10, (BATCH,), generator=generator)
    return Classification(
        lambda hp: nn.Sequential(nn.Linear(1024, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)),
        TensorDataset(inputs, targets),
        TensorDataset(inputs[:512], targets[:512]),
    )


@pytest.fixture
def capped_gpu(request: pytest.FixtureRequest):
    """The GPU with this process allowed only its cap, so that a real OOM comes quickly."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(_cap(request) / total, device)
    yield device
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def _cap(request: pytest.FixtureRequest) -> int:
    """The cap of the test's precision; bf16 needs a lower one for a step of BATCH to fail."""
    callspec = getattr(request.node, "callspec", None)
    precision = callspec.params.get("precision", "fp32") if callspec else "fp32"
    return CAP_BYTES[precision]


def test_a_real_oom_is_recognised_and_the_memory_comes_back() -> None:
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2 * total, dtype=torch.uint8, device=device)
    assert memory.is_out_of_memory(caught.value)
    del caught
    memory.free_memory(device)
    assert torch.ones(2**20, device=device).sum().item() == 2**20


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_real_oom_halves_the_micro_batch_and_keeps_the_effective_batch(
    capped_gpu: torch.device, precision: str
) -> None:
    hp = Hyperparameters(batch_size=BATCH, lr=1e-3, epochs=1, base_lr=1e-3)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    reporter = Reporter(study.ask(), [Objective(metric="val_accuracy")])
    limits = memory.MicroBatchLimits()
    train(wide_workload(), hp, reporter, device=capped_gpu, precision=precision, limits=limits)
    records = reporter.records
    assert records["precision"] == precision
    assert records["oom_retries"] >= 1
    assert records["micro_batch_size"] < BATCH
    assert records["micro_batch_size"] * records["accumulation_steps"] == BATCH
    assert records["peak_memory_mb"] <= CAP_BYTES[precision] / 2**20
    assert limits.largest_fit == records["micro_batch_size"]
    assert limits.smallest_failed == 2 * records["micro_batch_size"]


def test_the_probe_finds_the_real_limit(capped_gpu: torch.device) -> None:
    hp = Hyperparameters(batch_size=BATCH, lr=1e-3, epochs=1, base_lr=1e-3)
    result = probe(wide_workload(), hp, device=capped_gpu, max_size=BATCH, min_seconds=0.0)
    assert result.largest_fit is not None and result.smallest_failed is not None
    assert result.smallest_failed == result.largest_fit + 1
    assert result.smallest_failed <= BATCH
    assert all(a.peak_memory_mb <= CAP_BYTES["fp32"] / 2**20 for a in result.attempts if a.fits)


def test_gpus_all_runs_one_worker_per_gpu_on_cuda(sqlite_url: str) -> None:
    create_study(parse_spec(small_spec("gpus", budget={"n_trials": 2})), sqlite_url)
    result = tuner("worker", "--study", "gpus", "--storage", sqlite_url, "--gpus", "all")
    assert result.returncode == 0, result.stderr
    study, _ = load_study("gpus", sqlite_url)
    for trial in study.get_trials():
        assert trial.user_attrs["device"] == "cuda"
        assert trial.user_attrs["device_name"] == torch.cuda.get_device_name(0)
