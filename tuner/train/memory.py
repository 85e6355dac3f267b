"""Device facts: which device to use, what it is called, how much memory a trial took, and OOM."""

from __future__ import annotations

import os
import platform
import resource
import sys

import torch

from tuner.errors import BadInputError

# Fault injection for machines without a GPU: a forward pass of more samples than this raises
# the same torch.OutOfMemoryError a full GPU raises.
INJECT_OOM_ENV = "TUNER_INJECT_OOM_ABOVE"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is cuda if present, then mps, then cpu; an unavailable device is bad input."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(
            f"Unknown device {name!r}; use auto, cpu, cuda, cuda:K or mps."
        ) from None
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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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
