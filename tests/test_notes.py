"""The study note: written by one worker at a time, and once as the workers stop."""

from __future__ import annotations

import time

import optuna

from conftest import small_spec
from tuner.notes import SAVED_AT_ATTR, NoteKeeper
from tuner.spec import parse_spec
from tuner.storage import make_storage
from tuner.study import create_study, load_study


def _saved_at(url: str, name: str) -> float:
    storage = make_storage(url)
    return storage.get_study_system_attrs(storage.get_study_id_from_name(name))[SAVED_AT_ATTR]


def test_the_last_writer_keeps_the_note_and_another_takes_over_once_it_stops(sqlite_url):
    create_study(parse_spec(small_spec("kept-note")), sqlite_url)
    a = NoteKeeper(*load_study("kept-note", make_storage(sqlite_url)), interval_s=1.5)
    b = NoteKeeper(*load_study("kept-note", make_storage(sqlite_url)), interval_s=1.5)
    created = _saved_at(sqlite_url, "kept-note")
    time.sleep(1.6)
    a.refresh()
    b.refresh()
    assert _saved_at(sqlite_url, "kept-note") == created  # tuner create wrote it: neither's own
    time.sleep(1.5)
    a.refresh()
    taken = _saved_at(sqlite_url, "kept-note")
    assert taken > created and a.saved_at == taken
    time.sleep(1.6)
    b.refresh()
    assert _saved_at(sqlite_url, "kept-note") == taken  # one interval old: still A's
    a.refresh()
    kept = _saved_at(sqlite_url, "kept-note")
    assert kept > taken and a.saved_at == kept
    time.sleep(3.1)  # A has stopped
    b.refresh()
    assert _saved_at(sqlite_url, "kept-note") > kept and b.saved_at == _saved_at(sqlite_url, "kept-note")


def test_workers_stopping_together_write_the_last_note_once(sqlite_url):
    create_study(parse_spec(small_spec("last-note")), sqlite_url)
    study, spec = load_study("last-note", make_storage(sqlite_url))
    a = NoteKeeper(study, spec)
    b = NoteKeeper(*load_study("last-note", make_storage(sqlite_url)))
    study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    a.final()
    shown = _saved_at(sqlite_url, "last-note")
    assert a.saved_at == shown
    b.final()
    assert b.saved_at is None and _saved_at(sqlite_url, "last-note") == shown
    study.add_trial(optuna.trial.create_trial(value=0.8, params={}, distributions={}))
    b.final()
    assert b.saved_at == _saved_at(sqlite_url, "last-note") > shown
