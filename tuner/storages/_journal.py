"""Optuna's journal storage with writes appended together, a prompt file lock, slots under a lock,
and Redis waited for."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState

from tuner.errors import StorageError
from tuner.storages._lease import LeaseHeartbeat, write_claim_lease
from tuner.storages._reconnect import Backoff, retry_seconds
from tuner.storages._slots import claim_order, enough_waiting, slot_holders
from tuner.storages._urls import mask_url

_T = TypeVar("_T")


class JournalStorage(LeaseHeartbeat, optuna.storages.JournalStorage):
    """Optuna's journal storage, whose writes within ``one_append()`` reach the journal together,
    with leases for heartbeats.

    Each append takes the journal's lock and, on a file, flushes it to disk: the writes of a
    trial that belong together (a claim, who runs it and its lease, the sampled parameters, the
    records of its end and its state) cost one append instead of one each.
    """

    def __init__(self, backend: optuna.storages.journal.BaseJournalBackend) -> None:
        self._held = threading.local()  # before Optuna's first read of the journal
        super().__init__(backend)
        self._no_trial_created_yet()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._held = threading.local()
        super().__setstate__(state)
        self._no_trial_created_yet()

    def _no_trial_created_yet(self) -> None:
        """What Optuna's ``restore_replay_result`` sets: a trial created within ``one_append``
        reads it before the replay of any creation of this process has set it."""
        self._replay_result._last_created_trial_id_by_this_process = -1

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_held"]
        return state

    def _holding(self) -> list[dict[str, Any]] | None:
        return getattr(self._held, "logs", None)

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        held = self._holding()
        if held is None:
            super()._write_log(op_code, extra_fields)
        else:
            held.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})

    def _sync_with_backend(self) -> None:
        """Optuna's replay of the journal's new lines, which goes on past a line of this process
        that is refused (a write to a trial another worker failed meanwhile) and raises its
        error at the end. Optuna's stopped there, leaving the rest of an append's lines to the
        next read, in whichever thread: a worker left its taken-over trial, then failed in its
        next claim on the same trial's error.

        Within ``one_append`` reads see the journal as it was when the block began: the thread's
        own writes are not in it yet, and reading after each of them is what the block saves.
        """
        if self._holding() is not None:
            return
        refused: Exception | None = None
        for log in self._backend.read_logs(self._replay_result.log_number_read):
            try:
                self._replay_result.apply_logs([log])
            except Exception as error:  # raised only for this process's own lines
                refused = refused or error
        if refused is not None:
            raise refused

    def owns(self, trial_id: int) -> bool:
        """Whether this process's last claim, as the journal has it, won ``trial_id``."""
        return self._replay_result.owned_trial_id == trial_id

    @contextlib.contextmanager
    def one_append(self) -> Iterator[None]:
        """Hold this thread's writes made within and append them as the block ends, raised or not.

        A write within returns before its line is in the journal: what it returns (a claim's
        win, a new trial's id) means nothing, and an error its line makes (a finished trial's)
        is raised as the block ends. A block within a block appends with the outer one.
        """
        if self._holding() is not None:
            yield
            return
        self._held.logs = []
        try:
            yield
        finally:
            logs, self._held.logs = self._held.logs, None
            if logs:
                with self._thread_lock:
                    self._backend.append_logs(logs)
                    self._sync_with_backend()


# One append, whole or not at all, and once: a retry after a lost reply finds its token, kept
# for as long as retries go on, and writes nothing. The lines are numbered and keyed as Optuna's
# ``JournalRedisBackend`` writes them. ARGV: the prefix, the token, its lifetime in seconds, the lines.
_APPEND_ONCE = """
local done = string.format('%s:append:%s', ARGV[1], ARGV[2])
if redis.call('exists', done) == 1 then return 0 end
local counter = string.format('%s:log_number', ARGV[1])
redis.call('setnx', counter, -1)
for i = 4, #ARGV do
    local number = redis.call('incr', counter)
    redis.call('set', string.format('%s:log:%d', ARGV[1], number), ARGV[i])
end
redis.call('set', done, 1, 'EX', ARGV[3])
return 1
"""
# Lines fetched per round trip: Optuna's backend fetches one at a time, and a worker joining a
# study of thousands of trials read its hundreds of thousands of lines one round trip each.
_READ_BATCH = 1000


class RedisJournalBackend(optuna.storages.journal.JournalRedisBackend):
    """Optuna's journal on Redis, which waits out a lost server as a database is waited for
    (``TUNER_DB_RETRY_S``), then raises a ``StorageError`` that names it.

    Waiting is safe because an append is one script, applied whole and only once however often
    it is sent, where Optuna's appends a command per line: a retried line could be written
    twice, or an append cut short. A server back without the journal it held (restarted
    without its data) is an error, not an empty study this worker would write into unseen.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._append_once = self._redis.register_script(_APPEND_ONCE)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._append_once = self._redis.register_script(_APPEND_ONCE)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_append_once"]
        return state

    def _waited(self, call: Callable[[], _T]) -> _T:
        import redis  # the optional client: only a Redis URL needs it

        backoff = Backoff()
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if backoff.expired():
                    raise StorageError(f"Lost Redis at {mask_url(self._url)!r} and it did not come back: {error}") from None
                backoff.pause("Redis", str(error))

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        counter = self._waited(lambda: self._redis.get(f"{self._prefix}:log_number"))
        lines_there = 0 if counter is None else int(counter) + 1
        if lines_there < log_number_from:
            raise StorageError(
                f"Redis at {mask_url(self._url)!r} holds {lines_there} lines of the journal, of the "
                f"{log_number_from} this process read: it lost them (restarted without its data; "
                "keep them with appendonly yes)."
            )
        number = log_number_from
        while number < lines_there:
            keys = [self._key_log_id(n) for n in range(number, min(number + _READ_BATCH, lines_there))]
            for line in self._waited(lambda: self._redis.mget(keys)):
                if line is None:
                    # Numbered but not yet written: an append of Optuna's own, a command per line.
                    time.sleep(0.1)
                    break
                yield json.loads(line)
                number += 1

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        token = uuid.uuid4().hex
        lifetime_s = math.ceil(retry_seconds()) + 60
        lines = [json.dumps(log) for log in logs]
        self._waited(lambda: self._append_once(args=[self._prefix, token, lifetime_s, *lines]))

    def save_snapshot(self, snapshot: bytes) -> None:
        self._waited(functools.partial(super().save_snapshot, snapshot))

    def load_snapshot(self) -> bytes | None:
        return self._waited(super().load_snapshot)


class PromptJournalFileLock(optuna.storages.journal.JournalFileSymlinkLock):
    """Optuna's symlink lock of a journal file, looked for every few milliseconds while it is
    taken.

    Optuna's waiter doubles its pause up to a second: with 32 workers appending to one journal,
    waiters slept on long after the lock was free, and a claim, which appends under the slots'
    lock, kept every other claimer waiting while it slept. The lock file is Optuna's own, so plain
    Optuna processes on the same journal exclude and are excluded as before. A wait longer than
    ``PROMPT_WAIT_S`` goes on in Optuna's loop, which frees a lock left by a dead holder.
    """

    PROMPT_WAIT_S = 2.0
    MAX_PAUSE_S = 0.01

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.PROMPT_WAIT_S
        pause_s = 0.0005
        while time.monotonic() < deadline:
            try:
                os.symlink(self._lock_target_file, self._lock_file)
                return True
            except FileExistsError:
                # Jittered, so that waiters woken by one release do not all try at once.
                time.sleep(pause_s * random.uniform(0.5, 1.5))
                pause_s = min(2 * pause_s, self.MAX_PAUSE_S)
        return super().acquire()


class JournalFileSlots:
    """Budget slots of a journal file's studies, counted, added and claimed under one lock, as a
    database counts and adds them under the lock of the study's row.

    Optuna's journal lock is held for one append only, so the lock is a file beside the journal,
    locked with flock(2) by every process that adds or claims slots; the system releases it when
    its holder dies.
    """

    def __init__(self, storage: optuna.storages.JournalStorage) -> None:
        self.storage = storage
        self.lock_path = f"{storage._backend._file_path}.slots.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, taken once this process has read the journal nearly up to now.

        Under the lock a claimer reads what every other worker appended since it last looked:
        waiting in line for the lock, then reading all that under it, made 32 workers wait
        400 ms a claim for each other's reads (13 ms each under the lock). So a worker reads
        while it waits, looking for the lock between reads, and under the lock only the last
        few appends are left to read.
        """
        pause_s = 0.001
        with open(self.lock_path, "a") as lock:
            while True:
                # Only the read: listing the study's trials each time would cost as much again,
                # more as the study grows.
                with self.storage._thread_lock:
                    self.storage._sync_with_backend()
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(pause_s)
                    pause_s = min(2 * pause_s, 0.05)
            yield

    def add_waiting_trials(self, study_id: int, n_trials: int, ahead: int) -> int:
        """As ``ReconnectingRDBStorage.add_waiting_trials``; the new slots in one append."""
        blank = optuna.trial.create_trial(state=TrialState.WAITING)
        with self._locked():
            holders = slot_holders(self.storage.get_all_trials(study_id, deepcopy=False))
            waiting = sum(t.state == TrialState.WAITING for t in holders)
            if enough_waiting(waiting, ahead):
                return waiting
            added = max(0, min(ahead - waiting, n_trials - len(holders)))
            with _appended_together(self.storage):
                for _ in range(added):
                    self.storage.create_new_trial(study_id, template_trial=blank)
        return waiting + added

    def claim_next_waiting_trial(self, study_id: int, attrs: Mapping[str, Any]) -> int | None:
        """As ``ReconnectingRDBStorage.claim_next_waiting_trial``: the claim, the attributes and
        the first lease in one append. Under the lock no other worker claims; in a race, a
        loser's attributes would land on the winner's trial."""
        with self._locked():
            waiting = self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
            if not waiting:
                return None
            trial_id = min(waiting, key=claim_order)._trial_id
            with _appended_together(self.storage):
                self.storage.set_trial_state_values(trial_id, TrialState.RUNNING)
                for key, value in attrs.items():
                    self.storage.set_trial_user_attr(trial_id, key, value)
                write_claim_lease(self.storage, trial_id)
        return trial_id


def _appended_together(storage: optuna.storages.JournalStorage) -> contextlib.AbstractContextManager[None]:
    """One append for tuner's journal storage; Optuna's own appends each write."""
    return storage.one_append() if isinstance(storage, JournalStorage) else contextlib.nullcontext()
