"""The gradient noise scale, measured from the micro-batches that a step accumulates anyway.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A: the squared
norms of gradients taken over ``B_small`` and ``B_big`` samples give unbiased estimates

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and their ratio, the simple noise scale ``B_simple = tr(Sigma) / |G|^2``, estimates the critical
batch size: the batch beyond which larger batches stop saving steps. Here ``B_small`` is a
micro-batch and ``B_big`` the whole step, so the measurement costs one copy of the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

# Per optimizer step; both single-step estimates are noisy, the paper smooths them the same way.
DECAY = 0.95


@dataclass
class NoiseScale:
    """Exponential moving averages of the |G|^2 and tr(Sigma) estimates, divided only when read,
    as the paper does: the ratio of two noisy estimates is biased, their averages' is not."""

    decay: float = DECAY
    squared_gradient: float = 0.0
    trace: float = 0.0
    steps: int = 0

    def update(self, small_squared_norm: float, small_batch: float, big_squared_norm: float, big_batch: float) -> None:
        """Add one step: the mean squared norm of its micro-batch gradients (of ``small_batch``
        samples) and the squared norm of its whole gradient (``big_batch`` samples)."""
        squared_gradient = (big_batch * big_squared_norm - small_batch * small_squared_norm) / (big_batch - small_batch)
        trace = (small_squared_norm - big_squared_norm) / (1 / small_batch - 1 / big_batch)
        self.squared_gradient = self.decay * self.squared_gradient + (1 - self.decay) * squared_gradient
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.steps += 1

    @property
    def value(self) -> float | None:
        """``B_simple``, or None before the averages make sense (no step yet, or an estimate
        not above zero, which early noisy steps can give) or after they stop making it (a
        diverging step's NaN or infinite gradient)."""
        if not (0 < self.squared_gradient < math.inf and 0 < self.trace < math.inf):
            return None
        return self.trace / self.squared_gradient

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class MicroBatchGradients:
    """The gradient of each micro-batch of a step, read off the accumulated gradient.

    After a micro-batch's backward pass, the accumulated gradient less its copy from before is
    that micro-batch's gradient times its loss weight (its share of the step); one copy of the
    parameters' gradients is all this keeps.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.previous = [torch.zeros_like(p) for p in self.parameters]
        self.squared_norms: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def add(self, size: int, weight: float) -> None:
        """Take the micro-batch of ``size`` samples whose weighted gradient was just added."""
        squared_norm = torch.zeros((), device=self.previous[0].device if self.previous else None)
        for parameter, previous in zip(self.parameters, self.previous):
            if parameter.grad is None:
                continue
            squared_norm += (parameter.grad - previous).square().sum() / weight**2
            previous.copy_(parameter.grad)
        self.squared_norms.append(squared_norm)
        self.sizes.append(size)

    def end_step(self, noise: NoiseScale) -> None:
        """Give the step to ``noise`` (when it had two micro-batches or more) and start anew.

        Micro-batches of unequal sizes (the short last one) count by the harmonic mean of their
        sizes: the mean of ``|g_i|^2`` is ``|G|^2 + tr(Sigma) * mean(1 / b_i)`` in expectation.
        """
        if len(self.sizes) >= 2:
            small = float(torch.stack(self.squared_norms).mean())
            big = float(sum(previous.square().sum() for previous in self.previous))
            small_batch = len(self.sizes) / sum(1 / size for size in self.sizes)
            noise.update(small, small_batch, big, sum(self.sizes))
        self.discard()

    def discard(self) -> None:
        """Forget the step so far: one cut short by out-of-memory is restarted from the
        checkpoint, and its micro-batches would count in its restarted first step."""
        for previous in self.previous:
            previous.zero_()
        self.squared_norms.clear()
        self.sizes.clear()
