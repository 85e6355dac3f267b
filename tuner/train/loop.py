"""The training loop of a torch workload: one readable loop over epochs, steps and micro-batches.

Every optimizer step sees exactly ``hp.batch_size`` samples (the last step of an epoch may be
shorter). When the device cannot hold that many at once, the step is split into micro-batches
whose losses are weighted by their share of the step, so the accumulated gradient equals the
gradient of the whole batch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tuner.space import Hyperparameters
from tuner.train import memory
from tuner.train.averaging import WeightAverage
from tuner.train.checkpoint import Checkpoint
from tuner.train.noise import MicroBatchGradients, NoiseScale
from tuner.train.reporter import OutOfMemory, Reporter, metric_value
from tuner.train.schedule import epoch_batch_size, epoch_lr, lr_factor
from tuner.workloads.base import Workload

# A data set whose tensors take less than this stays on the device and is sliced by index.
ON_DEVICE_BYTES = 512 * 2**20
EVAL_BATCH_SIZE = 1024
# What the loop records as it trains, kept in each checkpoint: a retry that resumes after the last
# epoch (its worker died while telling the result) trains nothing that would record them again.
LOOP_RECORDS = (
    "micro_batch_size", "accumulation_steps", "precision", "oom_retries", "train_time_s", "samples_per_s",
    "peak_memory_mb",
)


def make_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    """The trial's optimizer, fused where PyTorch has a fused kernel for its parameters' device:
    one kernel per step instead of several per parameter tensor, which for a small model is
    most of the step (AdamW on digits_cnn, CPU: 62 instead of 251 microseconds)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()) or None
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, fused=fused
        )
    if hp.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)


class Batches:
    """Micro-batches of a data set in a given order: slices of device tensors when the data set
    is small tensors, else a DataLoader over the same indices."""

    def __init__(self, dataset: Dataset, device: torch.device, collate: Any = None) -> None:
        self.dataset = dataset
        self.device = device
        self.collate = collate
        self.tensors: tuple[torch.Tensor, ...] | None = None
        if isinstance(dataset, TensorDataset) and collate is None:
            size = sum(t.element_size() * t.nelement() for t in dataset.tensors)
            if size <= ON_DEVICE_BYTES:
                self.tensors = tuple(t.to(device) for t in dataset.tensors)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __call__(self, chunks: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tensors is not None:
            # One copy of the epoch's indices: a copy per step from pageable memory would wait
            # for the device to finish the previous step, so the host could never run ahead.
            indices = torch.cat(chunks).to(self.device).split([len(chunk) for chunk in chunks])
            for index in indices:
                yield self.tensors[0][index], self.tensors[1][index]
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[chunk.tolist() for chunk in chunks],
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
        )
        for inputs, targets in loader:
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


def evaluate(
    model: torch.nn.Module, workload: Workload, batches: Batches, micro_batch_size: int, precision: str
) -> dict[str, float]:
    model.eval()
    order = torch.arange(len(batches))
    chunks = list(order.split(min(EVAL_BATCH_SIZE, max(micro_batch_size, 1))))
    outputs, targets = [], []
    with torch.no_grad(), _autocast(batches.device, precision):
        for inputs, target in batches(chunks):
            outputs.append(model(inputs).float())
            targets.append(target)
    all_outputs, all_targets = torch.cat(outputs), torch.cat(targets)
    metrics = {"val_loss": float(workload.loss(all_outputs, all_targets))}
    own = workload.metrics(all_outputs, all_targets)
    metrics.update({name: metric_value(name, value) for name, value in own.items()})
    return metrics


def _autocast(device: torch.device, precision: str) -> Any:
    enabled = memory.effective_precision(device, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def split_step(step: torch.Tensor, micro_batch_size: int) -> list[tuple[torch.Tensor, float]]:
    """A step's sample indices as micro-batches, each with its share of the step: the weight of
    its mean loss, so that the accumulated gradient is the gradient of the whole step."""
    return [(part, len(part) / len(step)) for part in step.split(micro_batch_size)]


def forward_backward(
    model: torch.nn.Module,
    workload: Workload,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight: float,
    precision: str,
) -> torch.Tensor:
    """Add one micro-batch's weighted gradient to the parameters'; return its mean loss."""
    memory.check_injected_limit(len(inputs))
    with _autocast(inputs.device, precision):
        loss = workload.loss(model(inputs), targets)
    # A whole step in one micro-batch (weight 1) needs no scaling: one tensor op less a step.
    (loss if weight == 1.0 else loss * weight).backward()
    return loss.detach()


def train(
    workload: Workload,
    hp: Hyperparameters,
    report: Reporter,
    *,
    device: torch.device,
    micro_batch_size: int | None = None,
    checkpoint: Checkpoint | None = None,
    precision: str = "fp32",
    limits: memory.MicroBatchLimits | None = None,
    measure_noise: bool = False,
    ema_decay: float = 0.0,
) -> dict[str, float]:
    """Train ``hp.epochs`` epochs, reporting after each; resume from ``checkpoint`` if it holds
    a state. Returns the last epoch's metrics.

    With an ``ema_decay`` the model evaluated, and kept by ``evaluated_weights``, is the moving
    average of the weights (``tuner.train.averaging``).

    Each epoch's effective batch and rate come from ``hp.schedule``; the batches used are
    recorded as ``batch_size_per_epoch``. ``micro_batch_size`` caps the micro-batch; otherwise
    ``limits`` say what fits. Out of memory makes the micro-batch smaller (halved, or the largest
    known to fit) and restarts the epoch from its checkpoint; the effective batch never changes.
    A micro-batch of one that does not fit raises ``OutOfMemory``. What fits and what failed goes
    into ``limits``. With ``measure_noise`` (always for the adaptive schedule) the gradient noise
    scale at the end of each epoch is recorded as ``gradient_noise_scale``.
    """
    checkpoint = checkpoint or Checkpoint()
    limits = limits if limits is not None else memory.MicroBatchLimits()
    precision = memory.effective_precision(device, precision)
    measure_noise = measure_noise or hp.schedule.name == "adaptive"
    # A workload's own randomness (augmentation in a Dataset, say) may draw from Python's or
    # NumPy's generator: seeded too, a trial and its retry train alike.
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = workload.model(hp).to(device)
    optimizer = make_optimizer(model, hp)
    average = WeightAverage(model, ema_decay) if ema_decay else None
    train_batches = Batches(workload.train_data, device, getattr(workload, "collate", None))
    val_batches = Batches(workload.val_data, device, getattr(workload, "collate", None))
    shuffle = torch.Generator().manual_seed(hp.seed)
    noise = NoiseScale()
    gradients = MicroBatchGradients(model.parameters()) if measure_noise else None
    batch_sizes: list[int] = []
    noise_scales: list[float | None] = []

    def state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": model.state_dict(),
            "average": average.state_dict() if average is not None else None,
            "optimizer": optimizer.state_dict(),
            "shuffle": shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            # Dropout on a GPU draws from the device's generator, not the CPU's.
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": report.history,
            "noise": noise.state_dict(),
            "batch_sizes": list(batch_sizes),
            "noise_scales": list(noise_scales),
            "records": {name: report.records[name] for name in LOOP_RECORDS if name in report.records},
        }

    def record_schedule() -> None:
        report.records["batch_size_per_epoch"] = list(batch_sizes)
        if measure_noise:
            report.records["gradient_noise_scale"] = list(noise_scales)

    def restore(saved: dict[str, Any]) -> int:
        model.load_state_dict(saved["model"])
        if average is not None and saved.get("average") is not None:
            average.load_state_dict(saved["average"])
        elif average is not None:  # a checkpoint of a trial that evaluated its raw weights
            average.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle.set_state(saved["shuffle"])
        torch.set_rng_state(saved["torch_rng"])
        # Absent from a checkpoint written before they were kept: the seeded states stand.
        if "python_rng" in saved:
            random.setstate(saved["python_rng"])
            np.random.set_state(saved["numpy_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        noise.load_state_dict(saved["noise"])
        batch_sizes[:] = saved["batch_sizes"]
        noise_scales[:] = saved["noise_scales"]
        return int(saved["epoch"])

    saved = checkpoint.load()
    if saved is None:
        checkpoint.save(state(0))
        start_epoch = 0
    else:
        start_epoch = restore(saved)
        report.restore(saved["history"])
        report.records.update(saved.get("records", {}), resumed_from_epoch=start_epoch)
        record_schedule()

    memory.reset_peak_memory(device)
    # A trial resumed after its last epoch was saved has nothing left to train but its metrics.
    metrics = {k: v for k, v in report.history[-1].items() if k != "epoch"} if report.history else {}
    # A resumed trial goes on from its checkpoint's time and out-of-memory retries.
    train_seconds, oom_retries = metrics.get("train_time_s", 0.0), report.records.get("oom_retries", 0)
    epoch = start_epoch
    while epoch < hp.epochs:
        batch_size = epoch_batch_size(hp, epoch, batch_sizes, noise.value, len(train_batches))
        micro = min(micro_batch_size or limits.start(batch_size), batch_size)
        if measure_noise and micro == batch_size > 1:
            # Two micro-batches give the two batch sizes the estimate needs; the gradient is exact.
            micro = math.ceil(batch_size / 2)
        report.records.update(
            micro_batch_size=micro,
            accumulation_steps=math.ceil(batch_size / micro),
            precision=precision,
            oom_retries=oom_retries,
        )
        started = time.perf_counter()
        out_of_memory = False
        try:
            train_loss = _train_epoch(
                model, workload, optimizer, train_batches, shuffle, batch_size, micro, precision,
                _rates(hp, epoch, batch_size, len(train_batches)), gradients, noise, average,
            )
            evaluated = average.module if average is not None else model
            metrics = evaluate(evaluated, workload, val_batches, micro, precision)
        except RuntimeError as error:
            if not memory.is_out_of_memory(error):
                raise
            out_of_memory = True
        if out_of_memory:
            # Recovered outside the except clause: until it ends, the error's traceback keeps
            # the failed micro-batch's tensors alive.
            optimizer.zero_grad(set_to_none=True)
            if gradients is not None:
                gradients.discard()
            memory.free_memory(device)
            oom_retries += 1
            limits.record_failure(micro)
            if micro == 1:
                report.records.update(oom_retries=oom_retries, peak_memory_mb=memory.peak_memory_mb(device))
                raise OutOfMemory(f"a micro-batch of 1 does not fit on {device}")
            micro_batch_size = None
            restore(checkpoint.load())  # type: ignore[arg-type]
            continue
        limits.record_fit(micro)
        train_seconds += time.perf_counter() - started
        epoch += 1
        batch_sizes.append(batch_size)
        if measure_noise:
            noise_scales.append(noise.value)
        record_schedule()
        metrics.update(train_loss=train_loss, lr=optimizer.param_groups[0]["lr"], train_time_s=train_seconds)
        report.records.update(
            train_time_s=train_seconds,
            samples_per_s=epoch * len(train_batches) / train_seconds if train_seconds else 0.0,
            peak_memory_mb=memory.peak_memory_mb(device),
        )
        report.record(epoch, metrics)
        checkpoint.save(state(epoch))
        report.decide(epoch)
    return metrics


def _rates(hp: Hyperparameters, epoch: int, batch_size: int, train_size: int) -> Callable[[int, int], float]:
    """The rate of a step of ``epoch`` that covers its samples ``start`` to ``end``."""
    peak = epoch_lr(hp, epoch, batch_size)
    total = train_size * hp.epochs
    offset = epoch * train_size

    def rate(start: int, end: int) -> float:
        factor = lr_factor((offset + start) / total, (offset + end) / total, decay=hp.schedule.name != "ramp")
        return peak * factor

    return rate


def _train_epoch(
    model: torch.nn.Module,
    workload: Workload,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    shuffle: torch.Generator,
    batch_size: int,
    micro_batch_size: int,
    precision: str,
    rate: Callable[[int, int], float],
    gradients: MicroBatchGradients | None,
    noise: NoiseScale,
    average: WeightAverage | None = None,
) -> float:
    """One pass over the data; ``gradients``, when given, feed ``noise`` after every step, and
    ``average``, when given, follows the weights."""
    model.train()
    order = torch.randperm(len(batches), generator=shuffle)
    steps = [split_step(step, micro_batch_size) for step in order.split(batch_size)]
    micro_batches = batches([part for parts in steps for part, _ in parts])
    total_loss = torch.zeros((), device=batches.device)
    optimizer.zero_grad(set_to_none=True)
    seen = 0
    for parts in steps:
        for (_, weight), (inputs, targets) in zip(parts, micro_batches):
            loss = forward_backward(model, workload, inputs, targets, weight, precision)
            total_loss.add_(loss.float(), alpha=len(inputs))
            if gradients is not None:
                gradients.add(len(inputs), weight)
        if gradients is not None:
            gradients.end_step(noise)
        step_size = sum(len(part) for part, _ in parts)
        for group in optimizer.param_groups:
            group["lr"] = rate(seen, seen + step_size)
        seen += step_size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update()
    return float(total_loss) / len(batches)


def evaluated_weights(saved: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's trial was evaluated with: its average where it kept one."""
    average = saved.get("average")
    return average["model"] if average is not None else saved["model"]
