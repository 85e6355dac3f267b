"""Coordination overhead per trial: ``tuner worker`` against a plain Optuna loop.

The objective trains nothing: it sleeps ``--sleep-ms`` per epoch and reports 10 epochs, so what
is left of a trial's wall time is coordination (claiming the trial, suggesting, reporting,
pruning checks, records, the JSON learning curve, telling). Both sides run as separate processes
on the same storage, with the same random sampler and no pruner, so that the sampler's own cost
(which grows with the study for TPE, in tuner and in Optuna alike) is not counted as coordination.
tuner runs with ``learning_curve_png: false``: drawing the PNG is plotting, not coordination, and
its cost per trial is measured on its own and printed below the table.

A side whose workers fail (plain Optuna's SQLite workers time out on the database lock with
many workers on a slow disk) is recorded with its error and the run goes on; the script then
exits with status 1.

Overhead per trial = (workers x wall - objective time of all trials) / trials, where wall runs
from the moment every worker is at work (the last one's first trial) to the last trial's end,
as the storage recorded them, and trials are those that started in it: process start-up, and
the trials that overlap other workers' start-up, are not counted. Its growth with the study is
the same figure over each tenth of the trials in the order they finished. Beside it, the
host's busy CPU per trial over the same window (Linux's /proc/stat, every process on the
machine, the database server's included): with more workers than cores the overhead is at
least workers / cores x CPU - objective time, that CPU queued for, and no more where the
CPU is all that a trial waits for.

    python benchmarks/overhead.py [--full] [--storages sqlite,postgres,journal,grpc] [--workers 1,8]
        [--trials 100] [--large 10000] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy
import optuna
from optuna.trial import TrialState

from tuner.launch import worker_command
from tuner.space import Hyperparameters
from tuner.spec import parse_spec
from tuner.storages import make_storage, sqlalchemy_url
from tuner.study import create_study

if TYPE_CHECKING:
    from tuner.workloads import Report

EPOCHS = 10
ROOT = Path(__file__).resolve().parents[1]
SLEEP_ENV = "TUNER_BENCH_SLEEP_MS"


def sleeping_training(hp: Hyperparameters, report: Report) -> dict[str, float]:
    """tuner's side: a training function that sleeps instead of training."""
    sleep_s = float(os.environ.get(SLEEP_ENV, "2")) / 1000
    metrics: dict[str, float] = {}
    for epoch in range(1, EPOCHS + 1):
        time.sleep(sleep_s)
        metrics = {"val_accuracy": 1.0 - hp.lr / epoch}
        report(epoch, metrics)
    return metrics


def plain_optuna_worker(study_name: str, url: str, n_trials: int, seed: int, ready: Path) -> None:
    """Optuna's side: ``study.optimize`` with the same sleeping objective and search space;
    the time it begins is written to ``ready``, outside the storage."""
    sleep_s = float(os.environ.get(SLEEP_ENV, "2")) / 1000

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("batch_size", [16, 32, 64, 128, 256, 512, 1024])
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("epochs", EPOCHS, EPOCHS)
        value = 0.0
        for epoch in range(1, EPOCHS + 1):
            time.sleep(sleep_s)
            value = 1.0 - lr / epoch
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=study_name, storage=_plain_storage(url), sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=optuna.pruners.NopPruner(),
    )
    ready.write_text(str(time.time()))
    study.optimize(objective, n_trials=n_trials)


def _plain_storage(url: str) -> str | optuna.storages.BaseStorage:
    """Optuna's own storage for the URL, without tuner's reconnecting layer: the baseline is plain Optuna."""
    if url.endswith(".log"):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    if url.startswith("grpc://"):
        host, port = url.removeprefix("grpc://").split(":")
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    return sqlalchemy_url(url)


def _spec(name: str, n_trials: int) -> dict:
    return {
        "name": name,
        "workload": "benchmarks.overhead:sleeping_training",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "budget": {"n_trials": n_trials},
        "search": {
            "batch_size": {"low": 16, "high": 1024, "scale": "pow2"},
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "epochs": {"low": EPOCHS, "high": EPOCHS},
        },
        "sampler": {"name": "random", "seed": 0, "first_trial": "sampler"},
        "pruner": {"name": "none"},
        "learning_curve_png": False,
    }


def png_ms() -> float:
    """CPU milliseconds to draw one trial's learning-curve PNG (``learning_curve_png: true``)."""
    import io

    from tuner.artifacts import curve_figure

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_accuracy": 1 - 1 / e, "lr": 0.1} for e in range(1, EPOCHS + 1)]
    curve_figure(history, ["val_accuracy"]).savefig(io.BytesIO(), format="png", dpi=80)  # imports, font cache
    started = time.process_time()
    for _ in range(10):
        curve_figure(history, ["val_accuracy"]).savefig(io.BytesIO(), format="png", dpi=80)
    return round(100 * (time.process_time() - started), 1)


def _environment(url: str, sleep_ms: float) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TUNER_STORAGE": url, "PYTHONPATH": path, SLEEP_ENV: str(sleep_ms)}


def _run_side(side: str, url: str, name: str, workers: int, n_trials: int, sleep_ms: float, folder: Path) -> None:
    env = _environment(url, sleep_ms)
    if side == "tuner":
        create_study(parse_spec(_spec(name, n_trials)), url)
        commands = [
            worker_command(name, device="cpu", threads=1, worker_index=index, checkpoint_dir=folder / "ckpt")
            for index in range(workers)
        ]
    else:
        optuna.create_study(study_name=name, storage=_plain_storage(url), direction="maximize")
        shares = [n_trials // workers + (index < n_trials % workers) for index in range(workers)]
        commands = [
            [sys.executable, __file__, "--plain-worker", name, url, str(share), str(index), str(folder / f"{name}-{index}.ready")]
            for index, share in enumerate(shares)
        ]
    # Each worker's log goes to a file: a pipe read only after the first worker exits fills up
    # in a long run and blocks the others mid-trial.
    logs = [open(folder / f"{name}-{index}.log", "w+") for index in range(len(commands))]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True) for c, log in zip(commands, logs)]
    for process, log in zip(processes, logs):
        process.wait()
        log.seek(0)
        errors = log.read()
        log.close()
        if process.returncode != 0:
            raise RuntimeError(f"{side} worker failed:\n{errors[-6000:]}")


def _all_working(trials: list, folder: Path, name: str) -> float:
    """When the last worker began: its first trial's start for tuner (trials name their
    worker), the time a plain worker wrote before ``study.optimize`` for Optuna."""
    ready = list(folder.glob(f"{name}-*.ready"))
    if ready:
        return max(float(path.read_text()) for path in ready)
    first: dict[str, float] = {}
    for trial in trials:
        worker, start = trial.user_attrs["worker"], trial.datetime_start.timestamp()
        first[worker] = min(first.get(worker, start), start)
    return max(first.values())


def _busy_s() -> float:
    """CPU seconds the whole host has spent busy since boot: /proc/stat's first line less idle
    and I/O wait."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class HostCPU:
    """The whole host's busy CPU, sampled through a run, to be read over the window that the
    overhead figure counts: with more workers than cores, that figure is mostly the CPU a trial
    costs (the workers', the database server's, the kernel's) queued for. Linux only: no
    samples where there is no /proc/stat."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)

    def __enter__(self) -> HostCPU:
        if os.path.exists("/proc/stat"):
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()

    def _sample(self, interval_s: float) -> None:
        while True:
            self.samples.append((time.time(), _busy_s()))
            if self._stop.wait(interval_s):
                self.samples.append((time.time(), _busy_s()))
                return

    def busy_between(self, start: float, end: float) -> float | None:
        """Busy CPU seconds from ``start`` to ``end`` (Unix times), interpolated between
        samples; None where the samples do not cover the window."""
        if not self.samples or start < self.samples[0][0] or end > self.samples[-1][0]:
            return None
        times, busy = zip(*self.samples)
        return float(numpy.interp(end, times, busy) - numpy.interp(start, times, busy))


def measure_side(side: str, kind: str, url: str, workers: int, n_trials: int, sleep_ms: float, folder: Path) -> dict:
    """Run one side and measure it; a side that failed gets its error instead of figures."""
    name = f"{side}-{kind}-{workers}-{n_trials}-{time.time_ns()}"
    row: dict = {"storage": kind, "workers": workers, "side": side}
    try:
        with HostCPU() as host:
            _run_side(side, url, name, workers, n_trials, sleep_ms, folder)
        return {**row, **overhead(url, name, workers, sleep_ms, folder, host)}
    except RuntimeError as error:
        return {**row, "trials": 0, "ms_per_trial": None, "cpu_ms_per_trial": None, "by_tenth": [], "failed": _reason(str(error))}


def _reason(error: str) -> str:
    """The exception lines of a failure's output, the cause first: a traceback's last line
    alone can name only the wrapper (Optuna's ``StorageInternalError`` around a locked database)."""
    lines = [line.strip() for line in error.splitlines()]
    found = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return "; ".join(dict.fromkeys(found)) or lines[0]


def overhead(url: str, name: str, workers: int, sleep_ms: float, folder: Path, host: HostCPU | None = None) -> dict:
    """Per-trial overhead in ms over the whole run and over each tenth of it, and the host's
    busy CPU ms per trial over the same run where ``host`` sampled it.

    The run counts from the moment every worker works: trials started before that overlap the
    other workers' start-up (tuner's imports torch: about 4 s of CPU each), which is not
    coordination.
    """
    storage = _plain_storage(url)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    started = [t for t in trials if t.datetime_start is not None]
    begun = _all_working(started, folder, name)
    done = sorted(
        (t for t in started if t.state == TrialState.COMPLETE and t.datetime_start.timestamp() >= begun),
        key=lambda t: t.datetime_complete,
    )
    objective_s = EPOCHS * sleep_ms / 1000

    def per_trial(first_start: float, last_end: float, count: int) -> float:
        return round(1000 * (workers * (last_end - first_start) / count - objective_s), 1)

    if not done:
        raise RuntimeError(f"no trial completed of the {len(trials)} in study {name}")
    ends = [t.datetime_complete.timestamp() for t in done]
    start = min(t.datetime_start.timestamp() for t in done)
    tenth = max(1, len(done) // 10)
    growth = [
        per_trial(ends[k - 1] if k else start, ends[min(k + tenth, len(ends)) - 1], min(tenth, len(ends) - k))
        for k in range(0, len(ends) - tenth + 1, tenth)
    ]
    busy = host.busy_between(start, ends[-1]) if host is not None else None
    return {
        "trials": len(done), "ms_per_trial": per_trial(start, ends[-1], len(done)),
        "cpu_ms_per_trial": None if busy is None else round(1000 * busy / len(done), 2), "by_tenth": growth,
    }


@contextmanager
def _storages(kinds: list[str], postgres: str | None, folder: Path) -> Iterator[dict[str, str]]:
    """Storage URLs by kind; a fresh PostgreSQL database and a gRPC proxy in front of SQLite."""
    urls = {"sqlite": f"sqlite:///{folder}/bench.db", "journal": f"{folder}/bench.log"}
    database = f"tuner_overhead_{os.getpid()}"
    proxy = None
    if "postgres" in kinds and postgres:
        with _admin(postgres) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        urls["postgres"] = postgres.rsplit("/", 1)[0] + f"/{database}"
    if "grpc" in kinds:
        port = 13000 + os.getpid() % 1000
        backing = f"sqlite:///{folder}/proxied.db"
        make_storage(backing)  # the schema, made before the proxy and the workers race for it
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tuner", "proxy", "--storage", backing, "--port", str(port)],
            env=_environment(backing, 0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        urls["grpc"] = f"grpc://127.0.0.1:{port}"
        time.sleep(3)
    try:
        yield {kind: urls[kind] for kind in kinds if kind in urls}
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        if "postgres" in urls:
            with _admin(postgres) as connection:  # type: ignore[arg-type]
                connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextmanager
def _admin(url: str) -> Iterator:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as connection:
        yield connection


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    kinds = sorted({row["storage"] for row in rows})
    figure = Figure(figsize=(4 * len(kinds), 3.5), layout="constrained")
    for axes, kind in zip(figure.subplots(1, len(kinds), squeeze=False)[0], kinds):
        mine = [r for r in rows if r["storage"] == kind]
        # --full runs PostgreSQL with 8 workers twice: 1,000 trials and 10,000.
        runs_alike = Counter((r["side"], r["workers"]) for r in mine)
        for row in mine:
            if row.get("failed"):
                continue
            tenths = [(k + 1) * row["trials"] // len(row["by_tenth"]) for k in range(len(row["by_tenth"]))]
            style = "-" if row["side"] == "tuner" else "--"
            label = f"{row['side']}, {row['workers']} workers"
            if runs_alike[row["side"], row["workers"]] > 1:
                label += f", {row['trials']:,} trials"
            axes.plot(tenths, row["by_tenth"], style, marker="o", label=label)
        axes.set(title=kind, xlabel="trials in the study", ylabel="overhead ms / trial", yscale="symlog")
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def summarize(rows: list[dict]) -> list[dict]:
    """One row a run of both sides (plain first): their figures and tuner's over Optuna's, or
    None where a side failed."""
    summary = []
    for plain, mine in zip(rows[::2], rows[1::2]):
        measured = plain["ms_per_trial"] is not None and mine["ms_per_trial"] is not None
        ratio = round(mine["ms_per_trial"] / max(plain["ms_per_trial"], 0.1), 2) if measured else None
        summary.append({
            "storage": mine["storage"], "workers": mine["workers"], "trials": mine["trials"] or plain["trials"],
            "optuna_ms": plain["ms_per_trial"], "tuner_ms": mine["ms_per_trial"], "ratio": ratio,
            "optuna_cpu_ms": plain.get("cpu_ms_per_trial"), "tuner_cpu_ms": mine.get("cpu_ms_per_trial"),
        })
    return summary


def main() -> None:
    sys.path.insert(0, str(ROOT))  # the spec's workload, benchmarks.overhead:sleeping_training
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-worker":
        name, url, n_trials, seed, ready = sys.argv[2:7]
        plain_optuna_worker(name, url, int(n_trials), int(seed), Path(ready))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1, 2, 8 and 32 workers; 1,000 trials, 10,000 on PostgreSQL with 8")
    parser.add_argument("--postgres", default=os.environ.get("TUNER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a server URL whose user may create databases; one is made and dropped")
    parser.add_argument("--storages", default="sqlite,postgres,journal,grpc")
    parser.add_argument("--workers", help="comma-separated worker counts (default 1,8; 1,2,8,32 with --full)")
    parser.add_argument("--trials", type=int, help="trials per run (default 100; 1,000 with --full)")
    parser.add_argument("--large", type=int, help="trials of the PostgreSQL run with 8 workers (default none; 10,000 with --full)")
    parser.add_argument("--sleep-ms", type=float, default=2.0, help="objective sleep per epoch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead")
    args = parser.parse_args()
    if args.sleep_ms < 0:
        parser.error(f"--sleep-ms must be 0 or more (got {args.sleep_ms:g})")
    kinds = args.storages.split(",")
    workers = [int(w) for w in (args.workers or ("1,2,8,32" if args.full else "1,8")).split(",")]
    trials = args.trials or (1000 if args.full else 100)
    large = args.large or (10_000 if args.full else None)
    runs = [(kind, w, trials) for kind in kinds for w in workers] + ([("postgres", 8, large)] if large else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch, _storages(kinds, args.postgres, Path(scratch)) as urls:
        for kind, workers, n_trials in runs:
            if kind not in urls:
                continue
            for side in ("plain", "tuner"):
                row = measure_side(side, kind, urls[kind], workers, n_trials, args.sleep_ms, Path(scratch))
                rows.append(row)
                result = f"failed: {row['failed']}" if row.get("failed") else f"{row['ms_per_trial']:>9} ms/trial"
                print(f"{kind:<9}{workers:>3} workers {side:<6}{row['trials']:>6} trials {result}", flush=True)
    print()
    print(f"{'storage':<10}{'workers':>8}{'trials':>8}{'optuna ms':>11}{'tuner ms':>10}{'ratio':>7}"
          f"{'tuner first/last tenth':>24}{'host CPU ms, optuna/tuner':>28}")
    summary = summarize(rows)
    for row, mine in zip(summary, rows[1::2]):
        growth = f"{mine['by_tenth'][0]} -> {mine['by_tenth'][-1]}" if mine["by_tenth"] else "-"
        cells = [str(row[key]) if row[key] is not None else "failed" for key in ("optuna_ms", "tuner_ms", "ratio")]
        cpu = " / ".join(str(row[key]) if row[key] is not None else "-" for key in ("optuna_cpu_ms", "tuner_cpu_ms"))
        print(f"{row['storage']:<10}{row['workers']:>8}{row['trials']:>8}{cells[0]:>11}{cells[1]:>10}{cells[2]:>7}{growth:>24}{cpu:>28}")
    png = png_ms()
    print(f"\nThe learning-curve PNG (learning_curve_png: true, the default) adds {png} ms of CPU per trial.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"sleep_ms": args.sleep_ms, "epochs": EPOCHS, "full": args.full, "cpus": os.cpu_count(), "png_ms_per_trial": png}
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    failed = [row for row in rows if row.get("failed")]
    for row in failed:
        print(f"{row['side']} on {row['storage']} with {row['workers']} workers failed: {row['failed']}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
