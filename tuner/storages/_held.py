"""Writes to a trial held within a block and sent together: one commit or round trip, not one each."""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import optuna


class HeldWrites:
    """Writes to trials held by thread within a block and sent together as it ends, by
    ``write_held``: a database's commit or the proxy's round trip each is most of what a trial's
    sampled parameters or its records cost."""

    _held: threading.local
    _running_here: dict[int, optuna.trial.FrozenTrial]

    @contextlib.contextmanager
    def one_transaction(self) -> Iterator[None]:
        """Hold this thread's parameter, attribute and epoch writes made within and write them
        in one transaction as the block ends, raised or not.

        A write within returns before it is stored, and an error it makes (a finished trial's)
        is raised as the block ends. Reading a trial writes the held writes first, except a
        trial this process runs, whose copy has them; setting a trial's state writes them with
        it. A block within a block writes with the outer one.
        """
        if self._holding() is not None:
            yield
            return
        self._held.writes = []
        try:
            yield
        finally:
            try:
                self.write_held()
            finally:
                self._held.writes = None

    def _holding(self) -> list[Any] | None:
        return getattr(self._held, "writes", None)

    def write_held(self, end: Any = None) -> None:
        """Write the writes held so far together, with ``end`` (a trial's end) where given.
        They are taken out first, and held again where writing them fails."""
        writes = self._holding()
        if writes is None:
            writes = []
        if not writes and end is None:
            return
        # Taken out first: a refused write reads the trial for its message, which writes the
        # held writes.
        pending = writes[:]
        writes.clear()
        try:
            self._write_together(pending, end)
        except BaseException:
            writes[:0] = pending
            raise

    def _write_together(self, writes: list[Any], end: Any) -> None:
        raise NotImplementedError

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.record_epochs(trial_id, {}, {key: value})

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes in one write (a commit, a round trip) instead of one each."""
        self.record_epochs(trial_id, {}, attrs)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.record_epochs(trial_id, {step: intermediate_value}, {})

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        """The trial as stored; a trial this process claimed and runs comes from its own copy
        (see ``claim_next_waiting_trial``), saving a trial's two whole reads (as Optuna's
        ``Trial`` begins and as its tell checks the trial). The copy has the held writes
        already: they stay held, to go with the trial's end."""
        kept = self._running_here.get(trial_id)
        if kept is not None:
            return copy.deepcopy(kept)
        self.write_held()
        return super().get_trial(trial_id)  # type: ignore[misc]

    # A kept trial's copy takes each write as a read would give it back.

    def _keep_param(
        self, trial_id: int, name: str, value_internal: float, distribution: optuna.distributions.BaseDistribution
    ) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.params[name] = distribution.to_external_repr(value_internal)
            kept.distributions[name] = distribution

    def _keep_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.system_attrs.update(as_read({key: value}))

    def _keep_records(self, trial_id: int, values: Mapping[int, float], attrs: Mapping[str, Any]) -> None:
        kept = self._running_here.get(trial_id)
        if kept is not None:
            kept.user_attrs.update(as_read(attrs))
            kept.intermediate_values.update({step: float(value) for step, value in values.items()})


def as_read(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as a read gives them back: through JSON, so a tuple is a list, and a copy,
    so a list that grows after being written does not grow in the kept trial."""
    return json.loads(json.dumps(dict(attrs)))
