"""An exponential moving average of a model's weights: the model a trial evaluates and keeps.

The last iterate of SGD or Adam carries the noise of its last few steps, and on a small
validation set that noise moves the metric by a sample or two from seed to seed. An average of
the weights over the last steps (Polyak averaging; Izmailov et al. 2018, Kaddour 2022) removes
most of it for the cost of one fused update a step. The decay of step ``t`` is
``min(decay, (1 + t) / (10 + t))``, as in TensorFlow's and timm's EMA: a trial of a few dozen
steps averages over its last few, one of thousands over its last ``1 / (1 - decay)``, so short
and long trials both end on an average of their own last tenth or less, never on their start.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightAverage:
    """The averaged copy of ``model``'s parameters and floating-point buffers, which follows
    ``model`` as its optimizer updates it in place.

    Not ``torch.optim.swa_utils.AveragedModel``: its update reads its step count, a tensor, back
    to the host at every step, which on a GPU waits for the step to finish; the training loop
    otherwise never waits for the device within an epoch.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.steps = 0
        # Listed once: the optimizer and a checkpoint's restore update the same tensors in place.
        self._current = self._floats(model)
        self._averaged = self._floats(self.module)

    @staticmethod
    def _floats(model: torch.nn.Module) -> list[torch.Tensor]:
        tensors = [*model.parameters(), *model.buffers()]
        return [tensor.detach() for tensor in tensors if tensor.is_floating_point()]

    def update(self) -> None:
        """Move the average towards the model's weights after an optimizer step."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._averaged, self._current, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.steps = int(state["steps"])
