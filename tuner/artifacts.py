"""Learning curves in Optuna's artifact store, where optuna-dashboard shows them on the trial page."""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from tuner.storages import beside_storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSSES = ("train_loss", "val_loss")


def default_artifact_dir(url: str | None) -> Path:
    """Beside a SQLite or journal file, else ``./artifacts``: the workers and the dashboard of one
    storage agree on it without being told."""
    return beside_storage(url, "artifacts")


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory[str]:
    """Where a trial's files wait for their upload: one folder for the process, removed when
    it exits, since making and removing one per trial cost as much as the upload."""
    return tempfile.TemporaryDirectory(prefix="tuner-curves-")


def curve_figure(history: Sequence[dict[str, float]], metrics: Sequence[str]) -> Figure:
    """Losses, the objective metrics and the learning rate per epoch, side by side.

    A ``Figure`` rather than pyplot: no global state, so workers need no backend choice. Fixed
    margins rather than a layout engine: the layout engine measured every label of the figure
    and took half of the time a worker spent on a trial that trains nothing.
    """
    from matplotlib.figure import Figure  # imported by the first trial to finish, not at start
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(12, 3.5))
    panels = figure.subplots(1, 3, gridspec_kw={"left": 0.05, "right": 0.98, "bottom": 0.15, "top": 0.9, "wspace": 0.25})
    # The time, when an objective, counts seconds: beside a metric of 0 to 1 it flattened that
    # metric's curve to a line, so it is left out unless it is the only objective.
    validation = tuple(name for name in metrics if name != "train_time_s") or tuple(metrics)
    columns = (LOSSES, validation, ("lr",))
    for axes, names, title in zip(panels, columns, ("loss", "validation", "learning rate")):
        for name in names:
            if all(name in entry for entry in history):
                axes.plot(epochs, [entry[name] for entry in history], marker="o", label=name)
        # A title placed where asked: placed on its own, it measures every tick label first.
        axes.set_title(title, y=1.0)
        axes.set_xlabel("epoch")
        # Each tick is lines and a label to lay out, most of the drawing's time: a few suffice.
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
        if axes.lines:
            axes.legend()
    return figure


def upload_learning_curve(
    trial: optuna.Trial,
    history: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    directory: Path,
    png: bool = True,
) -> None:
    """Attach the trial's per-epoch history as JSON and, with ``png``, as a PNG plot.

    Must run before the trial is told: Optuna refuses attributes on finished trials.
    """
    if not history:
        return
    store = artifact_store(directory)
    scratch = Path(_scratch().name)
    data = scratch / f"trial-{trial.number}-curve.json"
    data.write_text(json.dumps(list(history), indent=1))
    paths = [data]
    if png:
        paths.append(scratch / f"trial-{trial.number}-curve.png")
        curve_figure(history, metrics).savefig(paths[-1], dpi=80)
    try:
        for path in paths:
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
