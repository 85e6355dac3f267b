"""Device facts: which device to use, what it is called, how much memory a trial took, OOM, and
which micro-batches fit, learned once per study and shared by its workers."""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass

import optuna
import torch

from tuner.errors import BadInputError

# Fault injection for machines without a GPU: a forward pass of more samples than this raises
# the same torch.OutOfMemoryError a full GPU raises.
INJECT_OOM_ENV = "TUNER_INJECT_OOM_ABOVE"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is cuda if present, then mps, then cpu; an unavailable device is bad input, and
    so is any other device type torch knows (``meta``, ``xpu``, ...): the training loop does not
    run there, so each trial would fail and the worker would burn the budget on failures."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise BadInputError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:K or mps.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"Device {name!r} was asked for, but CUDA is not available here.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(
                f"Device {name!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError("Device 'mps' was asked for, but MPS is not available here.")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def effective_precision(device: torch.device, precision: str) -> str:
    """bf16 autocast runs on CUDA only; elsewhere a bf16 spec trains in fp32."""
    return "bf16" if precision == "bf16" and device.type == "cuda" else "fp32"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak, so that each trial of a long-lived worker records its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        # Writing 5 resets the resident-set high-water mark that getrusage reports.
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Device memory at its peak on CUDA; on other devices the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in message or "MPS backend out of memory" in message
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_injected_limit(micro_batch_size: int) -> None:
    """Raise OutOfMemoryError above the test limit in ``TUNER_INJECT_OOM_ABOVE``, if set."""
    limit = os.environ.get(INJECT_OOM_ENV)
    if limit is not None and micro_batch_size > int(limit):
        raise torch.OutOfMemoryError(
            f"injected: micro-batch {micro_batch_size} is above the limit {limit}"
        )


LIMITS_ATTR_PREFIX = "tuner:micro_batch_limits:"


@dataclass
class MicroBatchLimits:
    """The largest micro-batch that ran and the smallest that ran out of memory, for one
    workload on one device model at one precision. When two facts disagree (memory that other
    processes took, then gave back) the newer one wins."""

    largest_fit: int | None = None
    smallest_failed: int | None = None

    def start(self, batch_size: int) -> int:
        """The micro-batch for steps of ``batch_size``: the whole step unless it is known to fail;
        then the largest known fit, else the step halved until below the smallest failure."""
        failed = self.smallest_failed
        if failed is None or batch_size < failed:
            return batch_size
        if self.largest_fit is not None:
            return min(self.largest_fit, batch_size)
        size = batch_size
        while size >= failed and size > 1:
            size //= 2
        return size

    def record_fit(self, size: int) -> None:
        self.largest_fit = max(self.largest_fit or 0, size)
        if self.smallest_failed is not None and self.smallest_failed <= size:
            self.smallest_failed = None

    def record_failure(self, size: int) -> None:
        self.smallest_failed = min(self.smallest_failed or size, size)
        if self.largest_fit is not None and self.largest_fit >= size:
            self.largest_fit = None

    def update(self, newer: MicroBatchLimits) -> None:
        """Take ``newer``'s facts as the more recent ones."""
        if newer.smallest_failed is not None:
            self.record_failure(newer.smallest_failed)
        if newer.largest_fit is not None:
            self.record_fit(newer.largest_fit)


def limits_key(workload: str, device_name: str, precision: str) -> str:
    return f"{LIMITS_ATTR_PREFIX}{workload}|{device_name}|{precision}"


def load_limits(study: optuna.Study, key: str) -> MicroBatchLimits:
    """What the study knows about micro-batches for ``key``; nothing for a new device."""
    stored = study._storage.get_study_system_attrs(study._study_id).get(key)
    return MicroBatchLimits(**stored) if stored else MicroBatchLimits()


def save_limits(study: optuna.Study, key: str, learned: MicroBatchLimits) -> MicroBatchLimits:
    """Add what a worker learned to what the study knows now. Two workers that save at the same
    moment may lose one fact; it is a hint, and the loop relearns it at the cost of one OOM.

    Nothing is written when the study knew it all: a write after every trial is a transaction,
    an append or a round trip that tells no one anything.
    """
    known = load_limits(study, key)
    limits = MicroBatchLimits(**asdict(known))
    limits.update(learned)
    if limits != known:
        study._storage.set_study_system_attr(study._study_id, key, asdict(limits))
    return limits
