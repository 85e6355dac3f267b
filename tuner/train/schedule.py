"""What each epoch trains with: its effective batch and its rate, and the rate within the epoch.

Every value here is a function of the epoch, the position in it and state that the checkpoint
keeps (the batches used so far, the noise scale), so a resumed trial repeats the schedule.

- ``constant``: the searched batch every epoch; the rate warms up, holds, then decays by a
  cosine over the last fifth of the trial.
- ``ramp`` (Smith et al. 2017, "Don't Decay the Learning Rate, Increase the Batch Size"): the
  batch grows by ``ramp_factor`` at set fractions of the epochs *instead of* decaying the rate,
  which only warms up. A batch held at the top of the search range (or at the training set)
  divides the rate by the growth it missed, as the paper does at its largest batch.
- ``adaptive``: from the second epoch on, the batch is the gradient noise scale measured so far
  (McCandlish et al. 2018), clipped to the search range, and the rate follows the batch by the
  spec's scaling rule; warm-up, hold and cosine as for ``constant``.
"""

from __future__ import annotations

import math

from tuner.space import Hyperparameters

WARMUP_FRACTION = 0.05
# The cooldown of a warm-up-stable-decay schedule: Hägele et al. 2024 ("Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations") find that a cosine over the last
# fifth, from a constant rate, matches a cosine over the whole run.
DECAY_FRACTION = 0.2


def epoch_batch_size(hp: Hyperparameters, epoch: int, used: list[int], noise_scale: float | None, train_size: int) -> int:
    """The effective batch of ``epoch`` (counted from 0), at most the training set."""
    schedule = hp.schedule
    batch_size = hp.batch_size
    if schedule.name == "ramp":
        # The growth stops at the top of the search range; a hand-written batch above it stays.
        batch_size = min(ramp_batch_size(hp, epoch), max(hp.batch_size, schedule.high or train_size))
    elif schedule.name == "adaptive" and epoch > 0:
        if noise_scale is None:
            batch_size = used[-1]
        else:
            batch_size = max(schedule.low, min(round(noise_scale), schedule.high or train_size))
    return max(1, min(batch_size, train_size))


def ramp_batch_size(hp: Hyperparameters, epoch: int) -> int:
    """The batch a ramp asks for at ``epoch`` (counted from 0), before any limit."""
    schedule = hp.schedule
    # ceil: a ramp point never falls on the first epoch, and 0.5 of 3 epochs is epoch 2. The
    # rounding first: 0.55 * 100 is 55.00000000000001, whose ceil would be a whole epoch late.
    ramps = sum(epoch >= max(1, math.ceil(round(at * hp.epochs, 9))) for at in schedule.ramp_at)
    return hp.batch_size * schedule.ramp_factor**ramps


def epoch_lr(hp: Hyperparameters, epoch: int, batch_size: int) -> float:
    """The peak rate of ``epoch``, trained at ``batch_size``: the searched rate, moved by the
    scaling rule when the adaptive schedule changed the batch. A ramp keeps it while its batch
    grows, the growing batch being its decay, and divides it by what a held batch did not grow:
    a step's noise goes with rate over batch, so either lowers it alike."""
    if hp.schedule.name == "ramp":
        return hp.lr * batch_size / ramp_batch_size(hp, epoch)
    if hp.schedule.name == "adaptive":
        return hp.lr * (batch_size / hp.batch_size) ** hp.schedule.lr_exponent
    return hp.lr


def lr_factor(start: float, end: float, *, decay: bool) -> float:
    """The rate's factor for a step covering the fractions ``start`` to ``end`` of all the
    samples the trial trains on: a linear warm-up over the first 5%, the full rate, then a
    cosine to zero over the last 20% (or no decay).

    Until its decay a trial trains at the same rate whatever its epochs, so the median rule
    compares trials of different lengths fairly at an epoch: under a cosine over the whole
    trial, a long trial at its peak rate was judged against short ones already decayed, and
    pruned (benchmarks/search_efficiency.py, README "Search efficiency").

    Counted in samples rather than steps because the steps of a ramp or adaptive schedule change
    size, which PyTorch's step-counting schedulers cannot follow.
    """
    if end <= WARMUP_FRACTION:
        return end / WARMUP_FRACTION
    if not decay or start <= 1 - DECAY_FRACTION:
        return 1.0
    progress = (start - (1 - DECAY_FRACTION)) / DECAY_FRACTION
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
