"""``tuner proxy``: Optuna's gRPC storage proxy, with a study created and run through it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from conftest import TESTS, small_spec, tuner

ENV = {"PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}


@contextmanager
def serve_proxy(storage: str, host: str = "127.0.0.1", timeout: float = 60) -> Iterator[str]:
    """Run ``tuner proxy`` on a free port of ``host``; yield its ``grpc://`` URL."""
    with socket.create_server((host, 0)) as probe:
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "tuner", "proxy", "--storage", storage, "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV},
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the proxy does not listen on {host}:{port}"
                time.sleep(0.2)
        yield f"grpc://{host}:{port}"
    finally:
        process.send_signal(signal.SIGTERM)  # as docker stop and Kubernetes stop it
        assert process.wait(timeout=30) == 0


def test_proxy_refuses_a_storage_it_cannot_serve(tmp_path: Path):
    result = tuner("proxy", "--storage", str(tmp_path / "study.log"))
    assert result.returncode == 2
    assert "database storages only" in result.stderr
    assert not (tmp_path / "study.log").exists()


def test_study_is_created_and_run_through_the_proxy(sqlite_url, write_spec, tmp_path: Path):
    spec = small_spec("proxied", workload="paced_workload:paced", budget={"n_trials": 2})
    env = {**ENV, "TUNER_TEST_EPOCH_S": "0"}
    with serve_proxy(sqlite_url) as url:
        created = tuner("create", str(write_spec(spec)), "--storage", url, env=env)
        assert created.returncode == 0, created.stderr
        worked = tuner(
            "worker", "--study", "proxied", "--storage", url, "--device", "cpu",
            "--checkpoint-dir", str(tmp_path / "checkpoints"), env=env,
        )
        assert worked.returncode == 0, worked.stderr
        best = tuner("best", "--study", "proxied", "--storage", url, "--format", "json", env=env)
        assert best.returncode == 0, best.stderr
    study = optuna.load_study(study_name="proxied", storage=sqlite_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
