"""Workers on three "hosts": Linux network namespaces, each joined to this one by a veth link of its
own on a bridge, so that everything a worker says to the study crosses its link.

- Through the gRPC proxy: ``tuner proxy`` listens on the bridge address in front of PostgreSQL, and
  ``grpc://`` is all the workers know of the database.
- A cut link: heartbeats are an RDBStorage feature that the proxy does not carry, so there the
  workers open PostgreSQL themselves. The server listens on 127.0.0.1 only and a test may not
  change it, so a small TCP forwarder on the bridge address passes each connection on to it: the
  workers' traffic still crosses their links, and ``ip link set ... down`` cuts one as a pulled
  cable does (no reset; the worker hangs). Its heartbeats stop, and after the grace period a
  worker on another host fails the trial and runs its retry, with the checkpoints in one folder
  that all hosts share. The URL sets ``idle_in_transaction_session_timeout``: a worker cut between
  two statements of a transaction would otherwise keep the trial's row locked, and the other
  workers would wait for it instead of retrying.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from conftest import REQUIRE_SERVICES, TESTS, small_spec
from test_proxy import serve_proxy
from tuner.spec import parse_spec
from tuner.storages import make_storage
from tuner.study import create_study

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = TESTS.parent
N_TRIALS = 6


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """A network namespace with its own hostname for the workers started in it."""

    name: str
    link: str  # this side's end of the host's veth pair, on the bridge
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, *args: str) -> subprocess.Popen:
        command = [
            "ip", "netns", "exec", self.name, "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.name, sys.executable, "-m", "tuner", *args,
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"},
        )
        self.processes.append(process)
        return process


@dataclass
class Network:
    gateway: str  # this namespace's address on the bridge
    hosts: list[Host]


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    while True:
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"network namespaces are required (TUNER_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(f"cannot make network namespaces here: {reason}")


@pytest.fixture
def network() -> Iterator[Network]:
    """A bridge in this namespace and three namespaces, each on it by a veth pair; all removed after."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        _unavailable("the ip (iproute2) and unshare (util-linux) commands are needed")
    tag = uuid.uuid4().hex[:6]
    bridge = f"tb{tag}"
    prefix = _free_subnet()
    hosts = [Host(f"tn{tag}{i}", f"tv{tag}{i}") for i in range(3)]
    made: list[Host] = []
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for index, host in enumerate(hosts, start=2):
                _ip("netns", "add", host.name)
                made.append(host)
                peer = f"tp{tag}{index}"
                _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", host.name)
                _ip("link", "set", host.link, "master", bridge, "up")
                _ip("-n", host.name, "addr", "add", f"{prefix}.{index}/24", "dev", peer)
                _ip("-n", host.name, "link", "set", peer, "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as error:
            _unavailable(f"{' '.join(error.cmd)}: {error.stderr.strip()}")
        yield Network(f"{prefix}.1", hosts)
    finally:
        for host in made:
            for process in host.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            # A killed worker's sockets can keep its namespace, and so the pair, alive for minutes.
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


class Forwarder:
    """Passes each TCP connection made to ``host`` (any free port) on to ``target``."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _finish(process: subprocess.Popen, timeout: float = 240) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def _spec(name: str, epochs: dict[str, int]) -> dict:
    return small_spec(
        name, workload="paced_workload:paced", budget={"n_trials": N_TRIALS},
        search={
            "batch_size": {"low": 32, "high": 128, "scale": "pow2"},
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "epochs": epochs,
        },
        pruner={"name": "none"},
    )


def _slots(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that hold a slot of the budget: all but failed ones that were retried."""
    trials = study.get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retried]


def _worker_args(name: str, storage: str, checkpoints: Path) -> list[str]:
    return [
        "worker", "--study", name, "--storage", storage, "--device", "cpu", "--threads", "1",
        "--checkpoint-dir", str(checkpoints),
    ]


def test_three_hosts_complete_a_study_through_the_grpc_proxy(network, postgres_url, write_spec, tmp_path):
    name = f"hosts-proxy-{uuid.uuid4().hex[:6]}"
    with serve_proxy(postgres_url, network.gateway) as grpc_url:
        spec_path = write_spec(_spec(name, {"low": 2, "high": 3}))
        _finish(network.hosts[0].start("create", str(spec_path), "--storage", grpc_url))
        workers = [
            host.start(*_worker_args(name, grpc_url, tmp_path / "checkpoints"))
            for host in network.hosts
        ]
        for worker in workers:
            _finish(worker)

    study = optuna.load_study(study_name=name, storage=make_storage(postgres_url))
    slots = _slots(study)
    assert len(slots) == N_TRIALS
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in slots)
    hosts = {t.user_attrs["worker"].split(":")[0] for t in slots}
    assert hosts <= {host.name for host in network.hosts}


def test_cut_link_trial_is_resumed_by_another_host(network, postgres_url, tmp_path):
    name = f"hosts-cut-{uuid.uuid4().hex[:6]}"
    # Three epochs or more: the link is cut in the second, and the cut worker saves that epoch's
    # checkpoint (its disk is not behind the link) but never the last one.
    create_study(parse_spec(_spec(name, {"low": 3, "high": 4})), postgres_url)
    database = make_url(postgres_url)
    forwarder = Forwarder(network.gateway, (database.host, database.port or 5432))
    try:
        across = database.set(
            host=network.gateway, port=forwarder.port,
            query={"options": "-c idle_in_transaction_session_timeout=5000"},
        ).render_as_string(hide_password=False)
        checkpoints = tmp_path / "checkpoints"
        victim, *others = network.hosts
        victim.start(*_worker_args(name, across, checkpoints))

        storage = make_storage(postgres_url)
        study = optuna.load_study(study_name=name, storage=storage)
        deadline = time.monotonic() + 120
        cut = None
        while cut is None and time.monotonic() < deadline:
            running = study.get_trials(states=(TrialState.RUNNING,))
            cut = next((t for t in running if t.intermediate_values), None)
            time.sleep(0.05)
        assert cut is not None, "the first worker reported no epoch in 120 s"
        _ip("link", "set", victim.link, "down")

        workers = [host.start(*_worker_args(name, across, checkpoints)) for host in others]
        for worker in workers:
            _finish(worker)
    finally:
        forwarder.close()

    trials = study.get_trials()
    assert trials[cut.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("retry_history") == [cut.number])
    assert retry.state == TrialState.COMPLETE, retry.user_attrs.get("error")
    assert retry.params == cut.params
    assert retry.user_attrs["retried_from"] == cut.number
    assert retry.user_attrs["worker"].split(":")[0] in {host.name for host in others}
    slots = _slots(study)
    assert len(slots) == N_TRIALS
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in slots)
