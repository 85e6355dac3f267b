"""``tuner report``: a study's plots as PNG files and one page that ties them together.

Optuna draws what it can (history, importances, intermediate values, Pareto front); the plots
against the *effective* batch size and the rate *as used* are drawn here, since those are trial
records, not parameters, and Optuna plots parameters only.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Optuna's plots go through pyplot; no display is needed or wanted.

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
from optuna.study import StudyDirection  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from tuner.errors import BadInputError, TunerError  # noqa: E402
from tuner.report import best_trials, format_value, quality_objective, used_params  # noqa: E402
from tuner.spec import StudySpec  # noqa: E402
from tuner.storages import slot_holders  # noqa: E402
from tuner.study import FINISHED  # noqa: E402

RECORDS = ("effective_batch_size", "micro_batch_size", "accumulation_steps", "lr_used", "epochs_completed", "train_time_s")


def _optuna_figure(draw: Callable[[], Any]) -> Figure:
    axes = draw()
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _batch_axis(axes: Any) -> None:
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_xlabel("effective batch size")


def _records(trials: list[FrozenTrial], *names: str) -> list[FrozenTrial]:
    return [t for t in trials if all(name in t.user_attrs for name in names)]


def batch_lr_figure(trials: list[FrozenTrial], metric: str, direction: StudyDirection, objective: int = 0) -> Figure:
    """Effective batch size against the rate used, coloured by the metric (objective number
    ``objective``), the good end of the scale bright whichever the direction; pruned trials grey."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    recorded = _records(trials, "effective_batch_size", "lr_used")
    complete = [t for t in recorded if t.state == TrialState.COMPLETE]
    pruned = [t for t in recorded if t.state == TrialState.PRUNED]
    if pruned:
        axes.scatter(
            [t.user_attrs["effective_batch_size"] for t in pruned], [t.user_attrs["lr_used"] for t in pruned],
            marker="x", color="0.6", label="pruned",
        )
    points = axes.scatter(
        [t.user_attrs["effective_batch_size"] for t in complete], [t.user_attrs["lr_used"] for t in complete],
        c=[t.values[objective] for t in complete], cmap="viridis" if direction == StudyDirection.MAXIMIZE else "viridis_r",
        edgecolors="black", label="complete",
    )
    figure.colorbar(points, ax=axes, label=metric)
    _batch_axis(axes)
    # Without a point (plain Optuna's trials record no rate used) a log axis has no range to draw.
    axes.set(yscale="log" if recorded else "linear", ylabel="learning rate used", title="batch size x learning rate")
    axes.legend()
    return figure


def metric_vs_batch_figure(trials: list[FrozenTrial], metrics: list[str]) -> Figure:
    figure = Figure(figsize=(6 * len(metrics), 4.5), layout="constrained")
    complete = [t for t in _records(trials, "effective_batch_size") if t.state == TrialState.COMPLETE]
    for index, (axes, metric) in enumerate(zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics)):
        axes.scatter([t.user_attrs["effective_batch_size"] for t in complete], [t.values[index] for t in complete])
        _batch_axis(axes)
        axes.set(ylabel=metric, title=f"{metric} against effective batch size")
    return figure


def time_vs_batch_figure(trials: list[FrozenTrial]) -> Figure:
    """Seconds per epoch, so that trials of different lengths and pruned ones compare."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    timed = [t for t in _records(trials, "effective_batch_size", "train_time_s") if t.user_attrs.get("epochs_completed")]
    for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        chosen = [t for t in timed if t.state == state]
        if not chosen:
            continue
        axes.scatter(
            [t.user_attrs["effective_batch_size"] for t in chosen],
            [t.user_attrs["train_time_s"] / t.user_attrs["epochs_completed"] for t in chosen],
            marker=marker, label=state.name.lower(),
        )
    _batch_axis(axes)
    axes.set(ylabel="training seconds per epoch", title="training time against effective batch size")
    if axes.collections:  # no timed trial (plain Optuna's beside tuner's): no legend to draw
        axes.legend()
    return figure


def _objective_importances(study: optuna.Study, objective: int, metric: str) -> Any:
    """The importances for one of several objectives, good values being its good ones.

    Optuna's default evaluator (PED-ANOVA) takes a target's low values for the good ones, and
    says so in a warning each time: a maximized objective is handed over negated, so that the
    bars rank what makes it high, and the warning, answered, is not shown.
    """
    sign = -1.0 if study.directions[objective] == StudyDirection.MAXIMIZE else 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
        return optuna_plots.plot_param_importances(study, target=lambda t: sign * t.values[objective], target_name=metric)


def report_figures(study: optuna.Study, spec: StudySpec) -> dict[str, tuple[str, Figure]]:
    """File name -> (caption, figure) of every plot of the report; the importances and the
    batch x rate plot are of the objective that measures quality (``quality_objective``)."""
    metrics = [objective.metric for objective in spec.all_objectives]
    quality = quality_objective(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    figures: dict[str, tuple[str, Figure]] = {}
    single = len(metrics) == 1
    for index, metric in enumerate(metrics):
        target = None if single else (lambda t, i=index: t.values[i])
        figures[f"history_{metric}.png"] = (f"Optimization history of {metric}", _optuna_figure(
            lambda: optuna_plots.plot_optimization_history(study, target=target, target_name=metric)
        ))
    # Optuna warns of a study too small to rank its parameters ("importances will be equal") on
    # stderr, in the middle of the command's output: the caption tells it beside the plot.
    with warnings.catch_warnings(record=True) as caught:
        importances = _optuna_figure(
            lambda: optuna_plots.plot_param_importances(study) if single else _objective_importances(study, quality, metrics[quality])
        )
    told = (str(w.message) for w in caught if not issubclass(w.category, optuna.exceptions.ExperimentalWarning))
    cautions = "".join(f" ({message})" for message in dict.fromkeys(told))
    figures["param_importances.png"] = ("Parameter importances" + cautions, importances)
    if single:
        figures["intermediate_values.png"] = ("Per-epoch curves (intermediate values)", _optuna_figure(
            lambda: optuna_plots.plot_intermediate_values(study)
        ))
    else:
        # Optuna draws two or three objectives; of more, the front (of them all) on the first three.
        drawn = metrics[:3]
        caption = "Pareto front" + ("" if drawn == metrics else f" on {', '.join(drawn)}")
        figures["pareto_front.png"] = (caption, _optuna_figure(
            lambda: optuna_plots.plot_pareto_front(study, target_names=drawn, targets=lambda t: t.values[:3])
        ))
    figures["batch_size_lr.png"] = (
        "Batch size x learning rate, coloured by " + metrics[quality],
        batch_lr_figure(trials, metrics[quality], study.directions[quality], quality),
    )
    figures["metric_vs_batch_size.png"] = ("Metric against effective batch size", metric_vs_batch_figure(trials, metrics))
    figures["train_time_vs_batch_size.png"] = ("Training time against effective batch size", time_vs_batch_figure(trials))
    return figures


def _best_table(study: optuna.Study, spec: StudySpec) -> str:
    rows = []
    metrics = [objective.metric for objective in spec.all_objectives]
    for trial in best_trials(study):
        cells = {
            "trial": trial.number,
            **dict(zip(metrics, trial.values)),
            **used_params(trial),
            # A record named like an objective (train_time_s) would overwrite its value, as the
            # best table of the command line does not let it.
            **{name: trial.user_attrs.get(name) for name in RECORDS if name not in metrics},
        }
        rows.append(cells)
    # Every row's columns: trials of plain Optuna beside tuner's may search other parameters.
    columns = list(dict.fromkeys(name for row in rows for name in row))
    header = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(name)))}</td>" for name in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def _finished_line(study: optuna.Study) -> str:
    """The finished trials as the budget and ``tuner status`` count them: failed ones included,
    except those a retry replaced."""
    held = slot_holders(study.get_trials(deepcopy=False))
    counts = {state: sum(1 for t in held if t.state == state) for state in FINISHED}
    return (
        f"{sum(counts.values())} trials finished: {counts[TrialState.COMPLETE]} complete, "
        f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed"
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>{title}</h1><p>{summary}</p><h2>{best_heading}</h2>{best}{figures}</body></html>
"""


def write_report(study: optuna.Study, spec: StudySpec, out: Path) -> list[Path]:
    """Write every plot as PNG and ``index.html``; return the paths written."""
    if not best_trials(study):
        raise TunerError(f"Study {study.study_name!r} has no completed trial to report on yet.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"--out {str(out)!r} cannot be made a folder: {error.strerror or error}.") from None
    written = []
    sections = []
    for name, (caption, figure) in report_figures(study, spec).items():
        figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(out / name)
        sections.append(f'<h2>{html.escape(caption)}</h2><img src="{name}" alt="{html.escape(caption)}">')
    page = PAGE.format(
        title=html.escape(f"tuner report: {study.study_name}"),
        summary=html.escape(f"Workload {spec.workload}; {_finished_line(study)}."),
        best_heading="Best trial" if len(spec.all_objectives) == 1 else "Pareto front",
        best=_best_table(study, spec),
        figures="".join(sections),
    )
    index = out / "index.html"
    index.write_text(page)
    return [*written, index]
