"""The ``tuner`` command: parses, calls the modules, prints. Exit 0 success, 2 bad input, 1 else."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tuner.errors import BadInputError, TunerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tune batch size, learning rate and epochs together in an Optuna study.",
)
console = Console()
errors = Console(stderr=True)

StorageOption = Annotated[
    Optional[str],
    typer.Option("--storage", help="Storage URL; default $TUNER_STORAGE, else sqlite:///tuner.db."),
]
StudyOption = Annotated[str, typer.Option("--study", help="Study name.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:K or mps.")]
CheckpointOption = Annotated[
    Optional[Path], typer.Option("--checkpoint-dir", help="Where trials checkpoint each epoch.")
]
KeepOption = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep finished trials' checkpoints.")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    if debug:
        os.environ["TUNER_DEBUG"] = "1"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("optuna").setLevel(logging.WARNING)


@app.command()
def create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML).")],
    storage: StorageOption = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Override the spec's name.")] = None,
) -> None:
    """Create the study of a spec (idempotent; a different spec under the name is refused)."""
    from tuner.spec import load_spec
    from tuner.storage import mask_url, storage_url
    from tuner.study import create_study

    created = create_study(load_spec(spec_path), storage, study_name=study)
    console.print(f"study {created.study_name!r} ready in {mask_url(storage_url(storage))}")


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML).")],
    storage: StorageOption = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Override the spec's name.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Local worker processes.")] = 1,
    device: DeviceOption = "auto",
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", min=1, help="Override budget.n_trials.")] = None,
    checkpoint_dir: CheckpointOption = None,
    keep_checkpoints: KeepOption = False,
) -> None:
    """Create or load the study, run local workers until the budget is met, print the best trial."""
    from tuner.launch import follow, start_workers
    from tuner.spec import load_spec
    from tuner.storage import storage_url
    from tuner.study import create_study
    from tuner.train.memory import resolve_device

    spec = load_spec(spec_path)
    if n_trials is not None:
        spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": n_trials})})
    resolve_device(device)
    url = storage_url(storage)
    created = create_study(spec, url, study_name=study)
    processes = start_workers(
        created.study_name, url, workers, device=device, checkpoint_dir=checkpoint_dir,
        keep_checkpoints=keep_checkpoints,
    )
    codes = follow(created, spec, processes, errors)
    _print_best(created.study_name, url, "table")
    if any(codes):
        raise TunerError(f"{sum(1 for c in codes if c)} of {len(codes)} workers exited with an error.")


@app.command()
def worker(
    study: StudyOption,
    storage: StorageOption = None,
    device: DeviceOption = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch CPU threads.")] = None,
    worker_index: Annotated[Optional[int], typer.Option("--worker-index", hidden=True)] = None,
    checkpoint_dir: CheckpointOption = None,
    keep_checkpoints: KeepOption = False,
) -> None:
    """Pull trials from a study until its budget is met, then exit 0."""
    from tuner.worker import WorkerOptions, run_worker

    _setup_logging()
    options = WorkerOptions(
        device=device, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
        worker_index=worker_index, threads=threads,
    )
    run_worker(study, storage, options)


FormatOption = Annotated[str, typer.Option("--format", help="table, json (best) or table, csv, json (trials).")]


def _print_best(study_name: str, storage: str | None, output: str) -> None:
    from tuner.report import best_trials, format_value, trial_record
    from tuner.study import load_study

    study, _ = load_study(study_name, storage)
    trials = best_trials(study)
    records = [trial_record(study, trial) for trial in trials]
    if output == "json":
        if len(study.directions) > 1:
            console.print_json(json.dumps({"study": study.study_name, "pareto_front": records}))
        elif records:
            print(json.dumps(records[0]))
        else:
            raise TunerError(f"Study {study_name!r} has no completed trial yet.")
        return
    if not records:
        console.print(f"study {study_name!r} has no completed trial yet")
        return
    for record in records:
        table = Table(title=f"best trial of {study.study_name!r}: #{record['trial']}", show_header=False)
        names = study.metric_names or ["value"]
        for name, value in zip(names, record["values"]):
            table.add_row(name, format_value(value))
        for name, value in record["params"].items():
            table.add_row(name, format_value(value))
        for name in ("micro_batch_size", "accumulation_steps", "epochs_completed", "train_time_s", "device"):
            table.add_row(name, format_value(record["user_attrs"].get(name)))
        console.print(table)


@app.command()
def best(study: StudyOption, storage: StorageOption = None, output: FormatOption = "table") -> None:
    """The best trial (for several objectives: the Pareto front)."""
    if output not in ("table", "json"):
        raise BadInputError(f"--format must be table or json, not {output!r}.")
    _print_best(study, storage, output)


@app.command()
def trials(study: StudyOption, storage: StorageOption = None, output: FormatOption = "table") -> None:
    """Every trial with its state, parameters and records."""
    from tuner.report import format_value, trial_rows
    from tuner.study import load_study

    if output not in ("table", "csv", "json"):
        raise BadInputError(f"--format must be table, csv or json, not {output!r}.")
    loaded, _ = load_study(study, storage)
    rows = trial_rows(loaded)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if output == "json":
        print(json.dumps(rows))
    elif output == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = Table(title=f"trials of {study!r}")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(format_value(row.get(column)) for column in columns))
        console.print(table)


@app.command()
def status(study: Annotated[Optional[str], typer.Option("--study")] = None, storage: StorageOption = None) -> None:
    """Per study: trials by state and budget left."""
    import optuna

    from tuner.storage import make_storage
    from tuner.study import budget_state, load_study

    opened = make_storage(storage)
    names = [study] if study else sorted(optuna.get_all_study_names(opened))
    table = Table(title="studies")
    for column in ("study", "finished", "running", "waiting", "budget", "elapsed_s"):
        table.add_column(column)
    for name in names:
        loaded, spec = load_study(name, opened)
        state = budget_state(loaded, spec)
        table.add_row(
            name, str(state.finished), str(state.running), str(state.waiting),
            str(state.n_trials or "-"), f"{state.elapsed_s:.0f}",
        )
    console.print(table)


@app.command()
def proxy(
    storage: StorageOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 13000,
) -> None:
    """Serve the storage through Optuna's gRPC proxy; workers use --storage grpc://HOST:PORT."""
    from tuner.proxy import serve
    from tuner.storage import mask_url, storage_url

    errors.print(f"proxy for {mask_url(storage_url(storage))} on grpc://{host}:{port}", highlight=False)
    serve(storage, host=host, port=port)


def main() -> None:
    """Entry point: one or two plain sentences on stderr for errors, tracebacks with --debug."""
    import warnings

    import optuna

    # Heartbeats and the retry callback are marked experimental; the user cannot act on that.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        app()
    except TunerError as error:
        if os.environ.get("TUNER_DEBUG"):
            traceback.print_exc()
        errors.print(f"error: {error}", highlight=False, markup=False)
        sys.exit(error.exit_code)
    except Exception as error:  # anything else is a bug or an outside failure: exit 1, one line
        if os.environ.get("TUNER_DEBUG"):
            traceback.print_exc()
        errors.print(f"error: {type(error).__name__}: {error}", highlight=False, markup=False)
        sys.exit(1)
