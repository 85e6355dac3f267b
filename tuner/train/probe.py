"""The probe: the largest micro-batch that fits on a device, and how fast each size trains.

Doubling, then binary search between the last size that fit and the first that did not, as
Lightning's BatchSizeFinder does, less its safety margin for memory that a long run takes beyond
a few steps (fragmentation, evaluation). Unlike it, the answer goes into the study, where every
worker with the same device model starts its trials at that micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
import torch

from tuner.space import Hyperparameters
from tuner.spec import StudySpec
from tuner.train import memory
from tuner.train.loop import Batches, forward_backward, make_optimizer
from tuner.workloads import Workload, load_torch_workload
from tuner.workloads.base import train_size

MARGIN = 0.05
# Each size trains at least this many steps and this long after a warm-up step, so that the
# samples/s of a small model are not timer noise.
MIN_STEPS = 3
MIN_SECONDS = 0.2
# Optimizer state kept per parameter: the probe trains with the most memory-hungry choice.
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class Attempt:
    """One micro-batch size tried: a few optimizer steps, timed after a warm-up step; peak
    memory and samples/s are those of a size that fits."""

    micro_batch_size: int
    fits: bool
    peak_memory_mb: float | None = None
    samples_per_s: float | None = None


@dataclass(frozen=True)
class ProbeResult:
    device: str
    device_name: str
    precision: str
    max_size: int
    attempts: list[Attempt]
    margin: float = MARGIN

    @property
    def largest_fit(self) -> int | None:
        return max((a.micro_batch_size for a in self.attempts if a.fits), default=None)

    @property
    def smallest_failed(self) -> int | None:
        return min((a.micro_batch_size for a in self.attempts if not a.fits), default=None)

    @property
    def micro_batch_size(self) -> int | None:
        """What workers should use: the largest fit, less the margin when a failure bounds it."""
        if self.largest_fit is None or self.smallest_failed is None:
            return self.largest_fit
        return max(1, int(self.largest_fit * (1 - self.margin)))

    def limits(self) -> memory.MicroBatchLimits:
        return memory.MicroBatchLimits(self.micro_batch_size, self.smallest_failed)


@dataclass
class _Trainer:
    """A model and its optimizer that take optimizer steps on random micro-batches."""

    workload: Workload
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Batches
    precision: str
    generator: torch.Generator

    def step(self, size: int) -> None:
        chunk = torch.randperm(len(self.batches), generator=self.generator)[:size]
        for inputs, targets in self.batches([chunk]):
            forward_backward(self.model, self.workload, inputs, targets, 1.0, self.precision)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def attempt(self, size: int, min_steps: int, min_seconds: float) -> Attempt:
        device = self.batches.device
        self.model.train()
        memory.reset_peak_memory(device)
        try:
            self.step(size)  # warm-up: allocator, kernels, optimizer state
            memory.synchronize(device)
            started, steps = time.perf_counter(), 0
            while steps < min_steps or time.perf_counter() - started < min_seconds:
                self.step(size)
                steps += 1
            memory.synchronize(device)
        except RuntimeError as error:
            if not memory.is_out_of_memory(error):
                raise
        else:
            seconds = time.perf_counter() - started
            return Attempt(size, True, memory.peak_memory_mb(device), size * steps / seconds)
        # Out of memory: freed outside the except clause, whose traceback holds the tensors.
        self.optimizer.zero_grad(set_to_none=True)
        memory.free_memory(device)
        return Attempt(size, fits=False)


def probe(
    workload: Workload,
    hp: Hyperparameters,
    *,
    device: torch.device,
    max_size: int,
    precision: str = "fp32",
    margin: float = MARGIN,
    min_steps: int = MIN_STEPS,
    min_seconds: float = MIN_SECONDS,
) -> ProbeResult:
    """Try micro-batches 1, 2, 4, ... up to ``max_size`` until one runs out of memory, then
    binary-search between the last that fit and the first that did not."""
    precision = memory.effective_precision(device, precision)
    torch.manual_seed(hp.seed)
    model = workload.model(hp).to(device)
    trainer = _Trainer(
        workload, model, make_optimizer(model, hp),
        Batches(workload.train_data, device, getattr(workload, "collate", None)),
        precision, torch.Generator().manual_seed(hp.seed),
    )
    attempts: list[Attempt] = []

    def fits(size: int) -> bool:
        attempts.append(trainer.attempt(size, min_steps, min_seconds))
        return attempts[-1].fits

    fit, failed, size = 0, None, 1
    while failed is None and fit < max_size:
        if fits(size):
            fit, size = size, min(2 * size, max_size)
        else:
            failed = size
    while failed is not None and failed - fit > 1:
        middle = (fit + failed) // 2
        if fits(middle):
            fit = middle
        else:
            failed = middle
    return ProbeResult(
        str(device), memory.device_name(device), precision, max_size, attempts, margin=margin
    )


def probe_spec(spec: StudySpec, device: torch.device) -> ProbeResult:
    """Probe a spec's workload up to its largest effective batch (at most the training set),
    with the optimizer of the search space that keeps the most state."""
    workload = load_torch_workload(spec.workload, "the probe")
    max_size = min(spec.search.batch_size.high, train_size(workload) or spec.search.batch_size.high)
    choices = spec.search.optimizer.choices if spec.search.optimizer else ["adamw"]
    lr = spec.search.lr.low
    hp = Hyperparameters(
        batch_size=max_size, lr=lr, epochs=1, base_lr=lr,
        optimizer=max(choices, key=OPTIMIZER_STATES.__getitem__),
    )
    return probe(workload, hp, device=device, max_size=max_size, precision=spec.precision)


def share(result: ProbeResult, study: optuna.Study, workload: str) -> memory.MicroBatchLimits:
    """Store the probe's answer in the study, under the key that workers look up."""
    key = memory.limits_key(workload, result.device_name, result.precision)
    return memory.save_limits(study, key, result.limits())
