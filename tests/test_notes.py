"""The study note: written by one worker at a time, and once as the workers stop."""

from __future__ import annotations

import re
import threading
import time

import optuna
from optuna_dashboard import get_note

from conftest import small_spec
from tuner import notes
from tuner.notes import SAVED_AT_ATTR, WRITER_ATTR, NoteKeeper
from tuner.spec import parse_spec
from tuner.storages import make_storage
from tuner.study import create_study, load_study


def _stored(url: str, name: str) -> tuple[str, float]:
    storage = make_storage(url)
    attrs = storage.get_study_system_attrs(storage.get_study_id_from_name(name))
    return attrs[WRITER_ATTR], attrs[SAVED_AT_ATTR]


def _keeper(url: str, name: str, writer: str, interval_s: float = notes.REFRESH_INTERVAL_S) -> NoteKeeper:
    study, spec = load_study(name, make_storage(url))
    return NoteKeeper(study, spec, writer=writer, interval_s=interval_s)


def test_the_last_writer_keeps_the_note_and_another_takes_over_once_it_stops(sqlite_url):
    create_study(parse_spec(small_spec("kept-note")), sqlite_url)
    a, b = (_keeper(sqlite_url, "kept-note", writer, interval_s=1.5) for writer in "ab")
    created = _stored(sqlite_url, "kept-note")
    assert created[0] == "tuner create"
    a.refresh()  # no worker keeps it: the first to look takes it over, however fresh
    taken = _stored(sqlite_url, "kept-note")
    assert taken[0] == "a" and taken[1] > created[1]
    b.refresh()
    assert _stored(sqlite_url, "kept-note") == taken
    time.sleep(1.6)
    b.refresh()
    assert _stored(sqlite_url, "kept-note") == taken  # one interval old: still A's
    a.refresh()
    kept = _stored(sqlite_url, "kept-note")
    assert kept[0] == "a" and kept[1] > taken[1]
    time.sleep(3.1)  # A has stopped
    b.refresh()
    assert _stored(sqlite_url, "kept-note")[0] == "b"


def test_workers_stopping_together_leave_the_last_note_to_its_writer(sqlite_url):
    create_study(parse_spec(small_spec("last-note")), sqlite_url)
    a, b = (_keeper(sqlite_url, "last-note", writer) for writer in "ab")
    a.study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    b.final()  # nobody's note yet (a short study): anyone writes the last word
    assert _stored(sqlite_url, "last-note")[0] == "b"
    a.final()
    assert _stored(sqlite_url, "last-note")[0] == "b"  # it shows every finished trial
    a.study.add_trial(optuna.trial.create_trial(value=0.8, params={}, distributions={}))
    before = _stored(sqlite_url, "last-note")
    a.final()
    assert _stored(sqlite_url, "last-note") == before  # B's to write
    b.final()
    written = _stored(sqlite_url, "last-note")
    assert written[0] == "b" and written[1] > before[1]


def test_a_note_being_built_is_fresh_to_the_other_workers(sqlite_url, monkeypatch):
    """Building a note reads the whole study: a worker looking meanwhile does not build it too."""
    create_study(parse_spec(small_spec("herd-note")), sqlite_url)
    a, b = (_keeper(sqlite_url, "herd-note", writer) for writer in "ab")
    built = []
    build = notes.study_note

    def b_looks_while_a_builds(study: optuna.Study, spec) -> str:
        built.append(study)
        if len(built) == 1:
            b.refresh()
        return build(study, spec)

    monkeypatch.setattr(notes, "study_note", b_looks_while_a_builds)
    a.refresh()
    assert len(built) == 1 and _stored(sqlite_url, "herd-note")[0] == "a"


def test_workers_running_out_together_build_an_unkept_note_once(sqlite_url, monkeypatch):
    """Every worker of a short study finds the note unkept as they all stop: one builds it."""
    create_study(parse_spec(small_spec("together-note")), sqlite_url)
    keepers = [_keeper(sqlite_url, "together-note", f"w{index}") for index in range(6)]
    keepers[0].study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    built = []
    build = notes.study_note

    def counted(study: optuna.Study, spec) -> str:
        built.append(study)
        return build(study, spec)

    monkeypatch.setattr(notes, "study_note", counted)
    ready = threading.Barrier(len(keepers))

    def stop(keeper: NoteKeeper) -> None:
        ready.wait()
        keeper.final()

    threads = [threading.Thread(target=stop, args=(keeper,)) for keeper in keepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    writer = _stored(sqlite_url, "together-note")[0]
    assert built[0] is next(k.study for k in keepers if k.writer == writer)
    assert "**Budget**: 1 of" in get_note(optuna.load_study(study_name="together-note", storage=sqlite_url))


def test_a_long_pareto_front_shows_its_best_trials_first_and_counts_the_rest(sqlite_url):
    objectives = [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "train_time_s", "direction": "minimize"}]
    spec = small_spec("long-front", objectives=objectives, budget={"n_trials": 1})
    del spec["objective"], spec["pruner"]
    study = create_study(parse_spec(spec), sqlite_url)
    for number in range(13):  # each trial more accurate and slower than the last
        study.add_trial(optuna.trial.create_trial(values=[0.8 + 0.01 * number, 1.0 + number], params={}, distributions={}))
    best = notes.study_note(study, parse_spec(spec)).split("### Best so far")[1].split("###")[0]
    shown = [int(line.split("|")[1]) for line in best.splitlines() if line.startswith("| ") and line[2].isdigit()]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert shown == [trial.number for trial in reversed(complete)][:10]  # the most accurate first
    assert "3 more on the Pareto front: `tuner best --study long-front`." in best


def test_the_note_of_several_objectives_names_no_pruner(sqlite_url):
    objectives = [{"metric": "val_accuracy", "direction": "maximize"}, {"metric": "train_time_s", "direction": "minimize"}]
    spec = small_spec("unpruned", objectives=objectives)
    del spec["objective"], spec["pruner"]  # the default median, which Optuna cannot apply here
    study = create_study(parse_spec(spec), sqlite_url)
    assert "| pruner | none: Optuna prunes single-objective studies only |" in get_note(study)


def test_the_note_counts_a_retried_trial_once_as_status_does(sqlite_url):
    """A trial whose worker died fails and is replaced by a retry: the budget counts the retry
    only, so the note does not call the study's one trial both finished and failed."""
    spec = parse_spec(small_spec("retried-note", budget={"n_trials": 1}))
    study = create_study(spec, sqlite_url)
    lost = study.ask()
    study.tell(lost, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[lost.number])
    study.tell(study.ask(), 0.9)
    assert "**Budget**: 1 of 1 trials finished; 0 running, 0 pruned, 0 failed." in notes.study_note(study, spec)


def test_the_note_of_a_time_budget_counts_the_trials_finished(sqlite_url):
    spec = parse_spec(small_spec("timed-note", budget={"timeout_s": 3600}))
    study = create_study(spec, sqlite_url)
    for value in (0.8, 0.9):
        study.tell(study.ask(), value)
    assert re.search(r"\*\*Budget\*\*: \d+ s of 3600 s used, 2 trials finished; 0 running", notes.study_note(study, spec))


def test_the_batch_findings_rank_by_quality_where_time_is_the_first_objective(sqlite_url):
    objectives = [{"metric": "train_time_s", "direction": "minimize"}, {"metric": "val_accuracy", "direction": "maximize"}]
    spec = small_spec("time-first", objectives=objectives)
    del spec["objective"]
    spec = parse_spec(spec)
    study = create_study(spec, sqlite_url)
    for seconds, accuracy in [(1.0, 0.5), (5.0, 0.9)]:
        trial = study.ask()
        trial.set_user_attr("effective_batch_size", 32)
        study.tell(trial, [seconds, accuracy])
    note = notes.study_note(study, spec)
    findings = note.split("### Batch-size findings")[1]
    assert "best val_accuracy" in findings and "0.9" in findings and "0.5" not in findings


def test_the_memory_limits_count_the_batches_memory_split(sqlite_url):
    """A trial that measures the noise scale splits every batch in two, fit or not; a ramp
    trial's micro-batches are those of its last epoch's batch, not of the batch searched."""
    spec = parse_spec(small_spec("memory-note"))
    study = create_study(spec, sqlite_url)
    for records in (
        {"effective_batch_size": 16, "micro_batch_size": 8, "accumulation_steps": 2, "gradient_noise_scale": [40.0]},
        {"effective_batch_size": 32, "micro_batch_size": 32, "accumulation_steps": 4, "batch_size_per_epoch": [32, 64, 128]},
        {"effective_batch_size": 512, "micro_batch_size": 256, "accumulation_steps": 2},
    ):
        trial = study.ask()
        for name, value in {"device_name": "cpu", **records}.items():
            trial.set_user_attr(name, value)
        study.tell(trial, 0.9)
    memory = notes.study_note(study, spec).split("### Memory limits learned")[1]
    assert "| cpu | 256 | 128 | 0 |" in memory


def test_a_writer_stopping_while_trials_run_leaves_the_last_word_to_the_next(sqlite_url):
    """Past a time budget, or without heartbeats, a worker stops while others still train: the
    note it writes then must not stay the last, missing the trials that end after it."""
    create_study(parse_spec(small_spec("running-note")), sqlite_url)
    a, b = (_keeper(sqlite_url, "running-note", writer) for writer in "ab")
    running = b.study.ask()
    a.study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    a.final()
    assert "1 of 6 trials finished; 1 running" in get_note(a.study)
    b.study.tell(running, 0.9)
    b.final()
    note = get_note(optuna.load_study(study_name="running-note", storage=sqlite_url))
    assert "2 of 6 trials finished; 0 running" in note
    assert f"| {running.number} | val_accuracy = 0.9 |" in note
