"""Deployment on many machines, checked without a Docker engine, a cluster or Slurm."""

from __future__ import annotations

import os
import socket

from tuner.worker import seed_offset


def test_container_workers_get_distinct_sampler_seeds(monkeypatch):
    """Every container's worker may be PID 1: the seed offset must differ by host all the same."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    offsets = set()
    for host in ("worker-1", "worker-2", "worker-3"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        offsets.add(seed_offset(None))
    assert len(offsets) == 3
    assert seed_offset(4) == 4
