"""A torch workload whose epochs take a set time, so that a test can act in the middle of a trial."""

from __future__ import annotations

import os
import time

import torch

from user_workloads import Blobs

EPOCH_S = float(os.environ.get("TUNER_TEST_EPOCH_S", "0.5"))


class Paced(Blobs):
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        time.sleep(EPOCH_S)
        return super().metrics(outputs, targets)


def paced() -> Paced:
    return Paced()
