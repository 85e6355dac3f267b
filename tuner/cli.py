"""The ``tuner`` command: parses, calls the modules, prints. Exit 0 success, 2 bad input, 128 +
the signal after a Ctrl-C or SIGTERM (130, 143), 1 else."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuner.errors import BadInputError, StorageMissingError, TunerError

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from tuner.launch import Finished
    from tuner.spec import StudySpec
    from tuner.train.memory import MicroBatchLimits
    from tuner.train.probe import ProbeResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tune batch size, learning rate and epochs together in an Optuna study.",
)
# Piped output keeps whole table rows instead of folding them to 80 columns. Without markup:
# a study, metric or path named with brackets ("sweep[/lr]") is shown as it is, where rich took
# it for a style, dropped it or failed on it.
console = Console(width=None if sys.stdout.isatty() else 200, markup=False)
# The workers' relayed lines and the progress: a line stays one line, which rich would fold at
# 80 columns in a log file or a pipe into grep.
errors = Console(stderr=True, soft_wrap=True, markup=False)

StorageOption = Annotated[
    Optional[str],
    typer.Option("--storage", help="Storage URL; default $TUNER_STORAGE, else sqlite:///tuner.db."),
]


def _study_named(name: str | None) -> str | None:
    """Refuse an empty ``--study``: read as no name, it took the spec's study, or every study."""
    if name is not None and not name.strip():
        raise typer.BadParameter("a study name cannot be empty")
    return name


StudyOption = Annotated[str, typer.Option("--study", callback=_study_named, help="Study name.")]
SpecStudyOption = Annotated[
    Optional[str], typer.Option("--study", callback=_study_named, help="Override the spec's name.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:K or mps.")]
CheckpointOption = Annotated[
    Optional[Path], typer.Option("--checkpoint-dir", help="Where trials checkpoint each epoch.")
]
ArtifactOption = Annotated[
    Optional[Path],
    typer.Option("--artifact-dir", help="Artifact store folder; default: 'artifacts' beside the storage."),
]
KeepOption = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep finished trials' checkpoints.")]
GpusOption = Annotated[
    Optional[str],
    typer.Option("--gpus", help="all or indices like 0,2: worker processes per GPU, each seeing only its GPU."),
]
WorkersPerGpuOption = Annotated[int, typer.Option("--workers-per-gpu", min=1, help="Workers per GPU with --gpus.")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    if debug:
        os.environ["TUNER_DEBUG"] = "1"


@app.command()
def create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML).")],
    storage: StorageOption = None,
    study: SpecStudyOption = None,
    run_probe: Annotated[bool, typer.Option("--probe", help="Probe the micro-batch that fits first.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Create the study of a spec (idempotent; a different spec under the name is refused)."""
    from tuner.spec import load_spec
    from tuner.storages import mask_url, storage_url
    from tuner.study import create_study

    spec = load_spec(spec_path)
    created = create_study(spec, storage, study_name=study)
    console.print(f"study {created.study_name!r} ready in {mask_url(storage_url(storage))}")
    if run_probe:
        _probe_and_share(spec, created.study_name, storage, device)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML).")],
    storage: StorageOption = None,
    study: SpecStudyOption = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Local worker processes (default 1).")] = None,
    device: DeviceOption = "auto",
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", min=1, help="Override budget.n_trials.")] = None,
    checkpoint_dir: CheckpointOption = None,
    artifact_dir: ArtifactOption = None,
    keep_checkpoints: KeepOption = False,
    gpus: GpusOption = None,
    workers_per_gpu: WorkersPerGpuOption = 1,
) -> None:
    """Create or load the study, run local workers until the budget is met, print the best trial."""
    from tuner.launch import Finished, run_workers
    from tuner.spec import load_spec
    from tuner.storages import storage_url
    from tuner.study import budget_state, create_study, deletion_named

    spec = load_spec(spec_path)
    if n_trials is not None:
        spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": n_trials})})
    if device not in ("auto", "cpu"):
        # Only a named accelerator can be missing; importing torch here costs seconds otherwise.
        from tuner.train.memory import resolve_device

        resolve_device(device)
    if gpus is not None and workers is not None:
        raise BadInputError(
            f"--workers {workers} and --gpus {gpus}: with --gpus the workers are --workers-per-gpu "
            "on each GPU named; give one or the other."
        )
    environments = _gpu_environments(gpus, workers_per_gpu, device)
    url = storage_url(storage)
    created = create_study(spec, url, study_name=study)
    with deletion_named(created):
        budget = budget_state(created, spec)
        if budget.exhausted:
            # Workers would import torch only to find nothing to do.
            met = (
                f"{budget.finished} of {budget.n_trials} trials finished; raise it with --n-trials"
                if budget.n_trials is not None and budget.finished >= budget.n_trials
                else f"its {spec.budget.timeout_s:g} s have passed"
            )
            errors.print(f"study {created.study_name!r} has met its budget ({met}); no workers started", highlight=False)
            finished = Finished(codes=[])
        else:
            # Seeds from index 0 repeat a seeded run of a fresh study; a run that goes on with one
            # (after Ctrl-C, or with a budget raised) draws them, or its workers would propose the
            # trials that the last run's proposed again.
            proposed = any(trial.params for trial in created.get_trials(deepcopy=False))
            finished = run_workers(
                created, spec, url, len(environments) if environments else workers or 1, errors,
                device="cuda" if environments else device, environments=environments,
                checkpoint_dir=checkpoint_dir, artifact_dir=artifact_dir, keep_checkpoints=keep_checkpoints,
                first_index=None if proposed else 0,
            )
        _print_best(created.study_name, url, "table", required=False)
        _exit_as_workers_did(created, spec, finished)
        _fail_without_an_answer(created)


def _fail_without_an_answer(study: optuna.Study) -> None:
    """Exit 1 where the budget is spent and no trial completed (each failed or was pruned): the
    run has no best trial to give, and a script reading its exit code must not take it for one."""
    from optuna.trial import TrialState

    from tuner.storages import slot_holders

    held = slot_holders(study.get_trials(deepcopy=False))
    if any(trial.state == TrialState.COMPLETE for trial in held):
        return
    failed = sum(1 for trial in held if trial.state == TrialState.FAIL)
    pruned = sum(1 for trial in held if trial.state == TrialState.PRUNED)
    raise TunerError(
        f"No trial of study {study.study_name!r} completed ({failed} failed, {pruned} pruned); "
        f"their errors and stop reasons: tuner trials --study {study.study_name}."
    )


@app.command()
def worker(
    study: StudyOption,
    storage: StorageOption = None,
    device: DeviceOption = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch CPU threads.")] = None,
    worker_index: Annotated[Optional[int], typer.Option("--worker-index", hidden=True)] = None,
    checkpoint_dir: CheckpointOption = None,
    artifact_dir: ArtifactOption = None,
    keep_checkpoints: KeepOption = False,
    gpus: GpusOption = None,
    workers_per_gpu: WorkersPerGpuOption = 1,
) -> None:
    """Pull trials from a study until its budget is met, then exit 0.

    On SIGTERM or Ctrl-C, hand the trial back after its epoch and exit 143 or 130. With --gpus, start one such worker process per GPU (--workers-per-gpu each) and wait for them.
    """
    from tuner.progress import log_output
    from tuner.worker import WorkerOptions, run_worker

    environments = _gpu_environments(gpus, workers_per_gpu, device)
    if environments is not None:
        _work_on_gpus(study, storage, environments, threads, checkpoint_dir, artifact_dir, keep_checkpoints)
        return
    options = WorkerOptions(
        device=device, checkpoint_dir=checkpoint_dir, artifact_dir=artifact_dir,
        keep_checkpoints=keep_checkpoints, worker_index=worker_index, threads=threads,
    )
    with log_output(errors):
        summary = run_worker(study, storage, options)
    if summary.stopped_by is not None:
        # Exit 0 says the budget is met: an orchestrator (an Indexed Job, compose's on-failure)
        # would count a preempted worker as done and never start another in its place.
        raise typer.Exit(128 + summary.stopped_by)


BestFormatOption = Annotated[str, typer.Option("--format", help="table or json.")]
TrialsFormatOption = Annotated[str, typer.Option("--format", help="table, csv or json.")]


def _print_best(study_name: str, storage: str | None, output: str, *, required: bool = True) -> None:
    """The best trial or Pareto front; a study without one is an error where one was asked for
    (``tuner best``), a line where a run merely ended without one."""
    from tuner.report import best_trials, trial_record
    from tuner.study import load_study

    study, _ = load_study(study_name, storage)
    trials = best_trials(study)
    records = [trial_record(study, trial) for trial in trials]
    several = len(study.directions) > 1
    if not records:
        if required:
            raise TunerError(f"Study {study_name!r} has no completed trial yet.")
        console.print(f"study {study_name!r} has no completed trial yet")
    elif output == "json":
        _print_json({"study": study.study_name, "pareto_front": records} if several else records[0])
    elif several:
        console.print(_pareto_table(study, records))
    else:
        console.print(_trial_table(study, records[0], f"best trial of {study.study_name!r}: #{records[0]['trial']}"))


def _print_json(answer: object) -> None:
    """Print ``answer`` as JSON, NaN and infinity as null: a diverged epoch's records (its noise
    scale) hold them, and Python's NaN literal is not JSON, so jq and JSON.parse refuse it."""

    def finite(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    print(json.dumps(finite(answer), allow_nan=False))


def _trial_table(study: optuna.Study, record: dict, title: str) -> Table:
    from tuner.report import format_value

    table = Table(title=title, show_header=False)
    names = study.metric_names or ["value"]
    for name, value in zip(names, record["values"]):
        table.add_row(name, format_value(value))
    for name, value in record["params"].items():
        table.add_row(name, format_value(value))
    for name in ("micro_batch_size", "accumulation_steps", "epochs_completed", "train_time_s", "device"):
        if name not in names:
            table.add_row(name, format_value(record["user_attrs"].get(name)))
    return table


def _pareto_table(study: optuna.Study, records: list[dict]) -> Table:
    """One row per trial of the Pareto front, in ``best_trials``' order."""
    from tuner.report import format_value

    names = study.metric_names or [f"value_{i}" for i in range(len(study.directions))]
    params = list(dict.fromkeys(name for record in records for name in record["params"]))
    times = [] if "train_time_s" in names else ["train_time_s"]
    table = Table(title=f"Pareto front of {study.study_name!r}: {len(records)} trials")
    for column in ("trial", *names, *params, *times):
        table.add_column(column, justify="right")
    for record in records:
        table.add_row(
            f"#{record['trial']}", *(format_value(v) for v in record["values"]),
            *(format_value(record["params"].get(name)) for name in params),
            *(format_value(record["user_attrs"].get(name)) for name in times),
        )
    return table


def _parse_percent(text: str) -> float:
    try:
        percent = float(text.strip().removesuffix("%"))
    except ValueError:
        percent = -1.0
    if not 0 <= percent <= 100:
        raise BadInputError(f"--within takes a percentage from 0 to 100, such as 1%, not {text!r}.")
    return percent / 100


def _print_fastest_within(study_name: str, storage: str | None, text: str, output: str, export: Path | None) -> None:
    """Print the fastest trial nearly as good as the best, written to ``export`` first (as in
    ``best``: an export that fails must not follow an answer that a script would take)."""
    from tuner.report import digits, fastest_within, format_value, quality_objective, trial_record
    from tuner.study import load_study

    tolerance = _parse_percent(text)
    study, _ = load_study(study_name, storage)
    found = fastest_within(study, tolerance)
    if found is None:
        raise TunerError(f"Study {study_name!r} has no completed trial with a recorded train_time_s yet.")
    best, fastest = found
    _export(study_name, storage, export, fastest)
    objective = quality_objective(study)
    metric = (study.metric_names or ["value"] * len(study.directions))[objective]
    if output == "json":
        record = trial_record(study, fastest)
        record.update(within=tolerance, metric=metric, best_trial=best.number, best_value=best.values[objective])
        _print_json(record)
        return
    best_time, fast_time = best.user_attrs["train_time_s"], fastest.user_attrs["train_time_s"]
    console.print(
        f"fastest trial within {text.strip().removesuffix('%')}% of the best {metric}: #{fastest.number} "
        f"({metric} {format_value(fastest.values[objective])} in {digits(fast_time, 3)} s); the best, #{best.number}, "
        f"has {format_value(best.values[objective])} in {digits(best_time, 3)} s "
        f"({digits(best_time / fast_time if fast_time else float('inf'), 2)}x the time)",
        highlight=False,
    )
    console.print(_trial_table(study, trial_record(study, fastest), f"fastest within {text}: #{fastest.number}"))


@app.command()
def best(
    study: StudyOption,
    storage: StorageOption = None,
    output: BestFormatOption = "table",
    export: Annotated[
        Optional[Path], typer.Option("--export", help="Also write the best trial (with --within, the one found) as a spec fragment for 'tuner train'.")
    ] = None,
    within: Annotated[
        Optional[str],
        typer.Option("--within", help="The fastest trial (by train_time_s) whose metric is within this percentage of the best, e.g. 1%."),
    ] = None,
) -> None:
    """The best trial; for several objectives, the Pareto front.

    With --within, the fastest trial that is nearly as good.
    """
    if output not in ("table", "json"):
        raise BadInputError(f"--format must be table or json, not {output!r}.")
    if within is not None:
        _print_fastest_within(study, storage, within, output, export)
    else:
        # Written first: a study with no single best trial to write fails with its one sentence,
        # not after a table or JSON that a script would take for the answer.
        _export(study, storage, export, None)
        _print_best(study, storage, output)


def _export(study_name: str, storage: str | None, export: Path | None, trial: FrozenTrial | None) -> None:
    if export is None:
        return
    from tuner.retrain import export_trial
    from tuner.study import load_study

    export_trial(*load_study(study_name, storage), export, trial)
    errors.print(f"wrote {export}; retrain with: tuner train {export}", highlight=False)


@app.command(name="train")
def train_once(
    fixed_path: Annotated[Path, typer.Argument(metavar="FIXED", help="Spec fragment from 'tuner best --export'.")],
    device: DeviceOption = "auto",
    out: Annotated[Path, typer.Option("--out", help="Where to save the trained weights.")] = Path("model.pt"),
) -> None:
    """Train the workload once with fixed hyperparameters, save the model, print the metrics."""
    from tuner.progress import log_output
    from tuner.report import format_value
    from tuner.retrain import load_fixed_spec, retrain

    fixed = load_fixed_spec(fixed_path)
    with log_output(errors):
        metrics, saved = retrain(fixed, device=device, out=out)
    table = Table(title=f"{fixed.workload} trained once", show_header=False)
    for name, value in metrics.items():
        table.add_row(Text(name, style="bold" if name == fixed.objective.metric else ""), format_value(value))
    console.print(table)
    console.print(f"model saved to {saved}" if saved else "the training function saves its own model")


@app.command()
def trials(study: StudyOption, storage: StorageOption = None, output: TrialsFormatOption = "table") -> None:
    """Every trial with its state, parameters and records."""
    from tuner.report import format_value, listed_trials, trial_record, trial_rows, value_columns
    from tuner.study import load_study

    if output not in ("table", "csv", "json"):
        raise BadInputError(f"--format must be table, csv or json, not {output!r}.")
    loaded, _ = load_study(study, storage)
    if output == "json":
        # The objects of ``tuner best --format json``, every record included.
        _print_json([trial_record(loaded, trial) for trial in listed_trials(loaded)])
        return
    rows = trial_rows(loaded, every_record=output == "csv")
    if not rows and output == "table":
        console.print(f"no trial of {study!r} has started yet")
        return
    # Without a row, a CSV still has its header: a script reading it finds the columns it expects.
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["number", "state", *value_columns(loaded)]
    if output == "table":
        columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    if output == "csv":
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
def status(
    study: Annotated[
        Optional[str], typer.Option("--study", callback=_study_named, help="One study; default: every study.")
    ] = None,
    storage: StorageOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.5, help="Seconds between refreshes.")] = 2.0,
    last: Annotated[int, typer.Option("--last", min=1, help="Finished trials the pace is measured over.")] = 10,
) -> None:
    """Per study: trials by state, budget, best value, epochs saved by pruning, pace, ETA, live workers."""
    import time

    from rich.live import Live

    from tuner.status import status_table, study_status
    from tuner.storages import make_storage, storage_name
    from tuner.study import SPEC_ATTR, load_study

    opened = make_storage(storage, create=False)

    def studies() -> tuple[list[str], list[str]]:
        """tuner's studies, and the others: plain Optuna's studies may share the database, and
        with no stored spec they have no budget to show and would fail the status of every study."""
        if study:
            return [study], []
        # One read of every study's attributes, the stored spec among them.
        made_by_tuner = {frozen.study_name: SPEC_ATTR in frozen.system_attrs for frozen in opened.get_all_studies()}
        names = sorted(made_by_tuner)
        return [name for name in names if made_by_tuner[name]], [name for name in names if not made_by_tuner[name]]

    names, others = studies()
    if others:
        console.print(f"left out, not made by tuner (no spec, no budget): {', '.join(map(repr, others))}", highlight=False)
    if not names:
        console.print(f"no studies {'made by tuner ' if others else ''}in {storage_name(opened)}; `tuner create` or `tuner run` makes one")
        return

    def table() -> Table:
        # The studies, each with its stored spec, are read again at every refresh: a study made
        # since the last shows, and `tuner create` or `tuner run --n-trials` may have raised a
        # budget, which --watch would show as met.
        return status_table([study_status(*load_study(name, opened), last=last) for name in studies()[0]])

    if not watch:
        console.print(table())
        return
    with Live(table(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(table(), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command()
def report(
    study: StudyOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG files and index.html.")],
    storage: StorageOption = None,
) -> None:
    """Plots of a study as PNG files and an index.html with the best trial's parameters."""
    from tuner.plots import write_report
    from tuner.study import load_study

    loaded, spec = load_study(study, storage)
    written = write_report(loaded, spec, out)
    console.print(f"wrote {len(written)} files; open {out / 'index.html'}")


@app.command()
def dashboard(
    storage: StorageOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; other machines need 0.0.0.0.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 8080,
    artifact_dir: ArtifactOption = None,
) -> None:
    """optuna-dashboard on the storage and the workers' artifact store, until Ctrl-C."""
    from tuner.dashboard import serve

    serve(storage, host=host, port=port, artifact_dir=artifact_dir, announce=console.print)


@app.command()
def probe(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec (YAML).")],
    storage: StorageOption = None,
    study: SpecStudyOption = None,
    device: DeviceOption = "auto",
    suggest: Annotated[
        bool, typer.Option("--suggest", help="Recommend effective batch and learning-rate ranges from the noise scale.")
    ] = False,
    write: Annotated[
        Optional[Path], typer.Option("--write", help="Write the spec with the recommended ranges here (implies --suggest).")
    ] = None,
) -> None:
    """The largest micro-batch that fits on the device, then the gradient noise scale.

    Reports samples/s at each micro-batch size tried and stores the largest that fits in the study
    (when it exists), so that its workers start trials there; then measures the gradient noise
    scale over a short training run.
    """
    from tuner.spec import load_spec
    from tuner.train.memory import resolve_device

    spec = load_spec(spec_path)
    result = _probe_and_share(spec, study or spec.name, storage, device)
    _noise_and_ranges(spec, resolve_device(device), result.limits(), suggest or write is not None, write)


def _noise_and_ranges(
    spec: StudySpec, device: torch.device, limits: MicroBatchLimits, suggest: bool, write: Path | None
) -> None:
    """The noise scale table of a short run; with ``suggest``, the ranges it recommends."""
    from tuner.report import format_value
    from tuner.suggest import NOISE_EPOCHS, probe_noise, suggest_ranges, write_suggested_spec

    noise = probe_noise(spec, device, limits)
    table = Table(title=f"gradient noise scale over {NOISE_EPOCHS} epochs (McCandlish et al. 2018)")
    for column in ("epoch", "samples", noise.metric, "noise scale"):
        table.add_column(column, justify="right")
    for point in noise.points:
        table.add_row(str(point.epoch), str(point.samples), format_value(point.metric), format_value(point.noise_scale))
    console.print(table)
    if not suggest:
        return
    ranges = suggest_ranges(spec, noise.latest, noise.train_size)
    console.print(
        f"suggested effective batch: {ranges.batch_low} to {ranges.batch_high} (pow2, around the noise "
        f"scale {ranges.noise_scale:.0f}, at most the {noise.train_size} training samples)\n"
        f"suggested learning rate: {ranges.lr_low:.3g} to {ranges.lr_high:.3g} at batch "
        f"{ranges.reference_batch_size}, scaled by {ranges.scale_with_batch}",
        highlight=False,
    )
    if write is not None:
        written = write_suggested_spec(spec, ranges, write)
        console.print(f"wrote {write} (study {written.name!r}); run it with: tuner run {write}", highlight=False)


def _probe_and_share(spec: StudySpec, study_name: str, storage: str | None, device: str) -> ProbeResult:
    import optuna

    from tuner.report import format_value
    from tuner.storages import make_storage
    from tuner.train.memory import resolve_device
    from tuner.train.probe import probe_spec, share

    # Opened before the probe, so that an unreachable database fails before minutes of it; a
    # missing file only means there is no study to store the answer in yet.
    try:
        opened = make_storage(storage, create=False)
    except StorageMissingError:
        opened = None
    result = probe_spec(spec, resolve_device(device))
    table = Table(title=f"{spec.workload} on {result.device} ({result.device_name}, {result.precision})")
    for column in ("micro-batch", "fits", "peak memory MB", "samples/s"):
        table.add_column(column, justify="right")
    for attempt in result.attempts:
        table.add_row(
            str(attempt.micro_batch_size), "yes" if attempt.fits else "out of memory",
            format_value(attempt.peak_memory_mb), format_value(attempt.samples_per_s),
        )
    console.print(table)
    if result.smallest_failed is None:
        console.print(f"every micro-batch up to {result.max_size} fits (the largest effective batch searched)")
    elif result.largest_fit is None:
        console.print("not even a micro-batch of 1 fits")
    else:
        console.print(
            f"largest micro-batch that fits: {result.largest_fit}; smallest that failed: "
            f"{result.smallest_failed}; workers use {result.micro_batch_size} "
            f"({result.margin:.0%} safety margin)"
        )
    if opened is None or study_name not in optuna.get_all_study_names(opened):
        console.print(f"not stored: no study {study_name!r} yet (tuner create SPEC --probe stores it)")
        return result
    share(result, optuna.load_study(study_name=study_name, storage=opened), spec.workload)
    console.print(f"stored in study {study_name!r} for {result.device_name} at {result.precision}")
    return result


def _gpu_environments(gpus: str | None, workers_per_gpu: int, device: str) -> list[dict[str, str]] | None:
    """Each worker's ``CUDA_VISIBLE_DEVICES``, None without --gpus; bad input where this machine
    has no such GPUs, or a --workers-per-gpu comes without --gpus, which would go unheeded."""
    if gpus is None:
        if workers_per_gpu != 1:
            raise BadInputError(
                f"--workers-per-gpu {workers_per_gpu} needs --gpus (all or indices like 0,2): it is the "
                "number of workers on each GPU named there."
            )
        return None
    import torch

    from tuner.launch import gpu_environments

    if device not in ("auto", "cuda"):
        raise BadInputError(
            f"--gpus gives each worker one GPU as 'cuda'; it does not go with --device {device}."
        )
    return gpu_environments(
        gpus, workers_per_gpu, device_count=torch.cuda.device_count(),
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def _work_on_gpus(
    study_name: str,
    storage: str | None,
    environments: list[dict[str, str]],
    threads: int | None,
    checkpoint_dir: Path | None,
    artifact_dir: Path | None,
    keep_checkpoints: bool,
) -> None:
    from tuner.launch import run_workers
    from tuner.storages import storage_url
    from tuner.study import deletion_named, load_study

    url = storage_url(storage)
    loaded, spec = load_study(study_name, url)
    with deletion_named(loaded):
        finished = run_workers(
            loaded, spec, url, len(environments), errors, device="cuda", environments=environments, threads=threads,
            checkpoint_dir=checkpoint_dir, artifact_dir=artifact_dir, keep_checkpoints=keep_checkpoints,
        )
        _exit_as_workers_did(loaded, spec, finished)


def _exit_as_workers_did(study: optuna.Study, spec: StudySpec, finished: Finished) -> None:
    """After a stop signal, say how far the study got and that the same command resumes it, and
    exit 128 + the signal as a shell does (130 for Ctrl-C), since the budget is not met; else
    exit 2 where every failed worker stopped on bad input, 1 where another failed."""
    from tuner.launch import STOP_SIGNALS
    from tuner.study import budget_state

    # A worker stopped by a signal exits 128 + it, as this command does: no error of its own.
    stopped = {128 + sig for sig in STOP_SIGNALS}
    failed = [code for code in finished.codes if code and code not in stopped]
    failures = f"{len(failed)} of {len(finished.codes)} workers exited with an error"
    state = budget_state(study, spec)
    stopped_by = finished.stopped_by
    signalled = [code for code in finished.codes if code in stopped]
    if stopped_by is None and signalled and not state.exhausted:
        # Workers signalled themselves (kill PID), not through this command, left the budget unmet.
        stopped_by = signal.Signals(signalled[0] - 128)
    if stopped_by is not None:
        done = f"{state.finished} of {state.n_trials}" if state.n_trials is not None else str(state.finished)
        also = f"; {failures}" if failed else ""
        # A time budget runs out while the workers finish the trials they started: those handed
        # back on the signal find it spent, and the same command starts no worker for them.
        then = "the budget is met: the same command starts no more trials" if state.exhausted else "run the same command again to resume"
        errors.print(f"interrupted: {done} trials finished{also}; {then}", highlight=False)
        raise typer.Exit(128 + stopped_by)
    if failed:
        # Workers that all stopped on bad input (a metric the workload does not report, a lost
        # database) make the run's own exit 2, as the same error in `tuner worker` does.
        bad_input = all(code == BadInputError.exit_code for code in failed)
        raise (BadInputError if bad_input else TunerError)(f"{failures}.")


@app.command()
def proxy(
    storage: StorageOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 13000,
) -> None:
    """Serve the storage through Optuna's gRPC proxy; workers use --storage grpc://HOST:PORT."""
    from tuner.proxy import serve
    from tuner.storages import mask_url, storage_url

    errors.print(f"proxy for {mask_url(storage_url(storage))} on grpc://{host}:{port}", highlight=False)
    serve(storage, host=host, port=port)


def main() -> None:
    """Entry point: one or two plain sentences on stderr for errors, tracebacks with --debug."""
    import warnings

    import optuna

    # Heartbeats and the retry callback are marked experimental; the user cannot act on that.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Optuna's own notes ("Using an existing study ...") repeat what the commands print.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        app()
    except TunerError as error:
        if os.environ.get("TUNER_DEBUG"):
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:  # anything else is a bug or an outside failure: exit 1, one line
        if os.environ.get("TUNER_DEBUG"):
            traceback.print_exc()
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
