"""Shared fixtures: a SQLite file per test, a fresh PostgreSQL database per session, and helpers
that run the real ``tuner`` command in worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

# Short heartbeats so that dead workers are noticed within seconds in tests.
os.environ.setdefault("TUNER_HEARTBEAT_INTERVAL", "1")
os.environ.setdefault("TUNER_HEARTBEAT_GRACE", "4")

POSTGRES_URL = os.environ.get("TUNER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# A Redis database that the tests empty: tuner's journal keys there take no prefix of their own.
REDIS_URL = os.environ.get("TUNER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("TUNER_REQUIRE_SERVICES") == "1"
TESTS = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (xdist), every test that talks to PostgreSQL runs on one worker, one
    after the other: one of them restarts the server, and another's connections would drop. So
    do the tests on Redis, which share one database."""
    for item in items:
        if item.get_closest_marker("postgres") or "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("postgres"))
        elif "redis_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("redis"))


@pytest.fixture(autouse=True)
def _stop_signal_handlers_restored():
    """A worker run in this process and stopped by a signal ignores the stop signals as it exits
    (``tuner.worker.run_worker``): the next test gets the process's own handlers back."""
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def small_spec(name: str, **overrides: object) -> dict:
    """A spec that trains in about a second per trial on the digits MLP."""
    spec = {
        "name": name,
        "workload": "digits_mlp",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "budget": {"n_trials": 6},
        "search": {
            "batch_size": {"low": 32, "high": 256, "scale": "pow2"},
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "epochs": {"low": 1, "high": 3},
        },
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "median"},
        # Drawing a trial's PNG costs more than its training here; the tests that look at the
        # learning curves leave the default on.
        "learning_curve_png": False,
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def write_spec(tmp_path: Path):
    def write(spec: dict, filename: str = "spec.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A database of its own for this session, dropped at the end."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        if REQUIRE_SERVICES:
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required (TUNER_REQUIRE_SERVICES=1): {error}")
        pytest.skip(f"PostgreSQL not reachable: {error}")
    name = f"tuner_test_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    # A new connection: a test may have restarted the server meanwhile.
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=30) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def redis_url() -> str:
    """The Redis database of ``TUNER_TEST_REDIS_URL``, emptied for each test; skipped where no
    Redis answers."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.flushdb()
    except redis.ConnectionError as error:
        # Optional beside PostgreSQL, even in CI: the redis:// URLs are an extra (tuner[redis]).
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {error}")
    yield REDIS_URL
    client.flushdb()


def reporter_stopped_after_two_epochs():
    """A trial's reporter that interrupts it after its second epoch, as a stopped worker does,
    leaving that epoch's checkpoint to resume from."""
    import optuna

    from tuner.spec import Objective
    from tuner.train.reporter import Reporter

    class StopAfterTwo(Reporter):
        def decide(self, epoch: int) -> None:
            super().decide(epoch)
            if epoch == 2:
                raise KeyboardInterrupt

    trial = optuna.create_study(direction="maximize").ask()
    return StopAfterTwo(trial, [Objective(metric="val_accuracy", direction="maximize")])


def _python_path() -> str:
    """The test workloads' folder, ahead of whatever path the tests themselves were given."""
    return os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


def tuner(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the real ``tuner`` command and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "PYTHONPATH": _python_path(), **(env or {})},
    )


def start_tuner(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
        env={**os.environ, "PYTHONPATH": _python_path(), **(env or {})},
    )


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small real study run to its budget on SQLite: its URL, name and the run's output."""
    folder = tmp_path_factory.mktemp("finished")
    spec = folder / "spec.yaml"
    watched = small_spec("watched", budget={"n_trials": 5})
    del watched["learning_curve_png"]  # the default, which the curve and dashboard tests look at
    spec.write_text(yaml.safe_dump(watched))
    url = f"sqlite:///{folder / 'study.db'}"
    run = tuner("run", str(spec), "--storage", url)
    assert run.returncode == 0, run.stdout + run.stderr
    return {"url": url, "name": "watched", "folder": folder, "output": run.stdout + run.stderr}
