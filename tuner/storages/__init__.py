"""Storages: the URLs of DESIGN.md opened as Optuna storages, and what a worker does to a trial on
any of them.

Each storage is Optuna's own with what tuner adds: a database reconnects and writes a trial's
records in one transaction (``_rdb``), the journal appends them in one go (``_journal``), the
gRPC client sends them in one round trip to ``tuner proxy`` (``_grpc``). Budget slots are
claimed through the atomic WAITING -> RUNNING transition (``_slots``, ``_trials``). Where Optuna
has no heartbeats (the journal, the gRPC client), a lease on the trial stands in (``_lease``).
"""

from tuner.storages._factory import make_storage, storage_name
from tuner.storages._grpc import (
    CLAIM_METHOD,
    SLOT_COUNTS_METHOD,
    STORAGE_FAILED,
    WRITE_METHOD,
    GrpcStorageProxy,
    decode_json,
    decode_trial,
    encode_json,
    encode_trial,
)
from tuner.storages._journal import JournalFileSlots, JournalStorage, PromptJournalFileLock
from tuner.storages._rdb import ReconnectingRDBStorage
from tuner.storages._reconnect import first_line
from tuner.storages._lease import LEASE, LeaseHeartbeat, lease_ages, write_claim_lease
from tuner.storages._slots import (
    HAND_BACKS,
    RETRY_HISTORY,
    RetryStaleTrial,
    claim_order,
    enough_waiting,
    queue_retry,
    slot_holders,
)
from tuner.storages._trials import (
    cache_claimed_trial,
    claim_by_racing,
    claim_next_waiting_trial,
    forget_values,
    one_write,
    rdb_backend,
    record_epochs,
    set_user_attrs,
    show_value,
    slot_counts,
    slot_maker,
)
from tuner.storages._urls import DEFAULT_STORAGE, beside_storage, journal_file, mask_url, sqlalchemy_url, storage_url

__all__ = [
    "CLAIM_METHOD",
    "DEFAULT_STORAGE",
    "GrpcStorageProxy",
    "HAND_BACKS",
    "JournalFileSlots",
    "JournalStorage",
    "LEASE",
    "LeaseHeartbeat",
    "PromptJournalFileLock",
    "RETRY_HISTORY",
    "ReconnectingRDBStorage",
    "RetryStaleTrial",
    "SLOT_COUNTS_METHOD",
    "STORAGE_FAILED",
    "WRITE_METHOD",
    "beside_storage",
    "cache_claimed_trial",
    "claim_by_racing",
    "claim_next_waiting_trial",
    "claim_order",
    "decode_json",
    "decode_trial",
    "encode_json",
    "encode_trial",
    "enough_waiting",
    "first_line",
    "forget_values",
    "journal_file",
    "lease_ages",
    "make_storage",
    "mask_url",
    "one_write",
    "queue_retry",
    "rdb_backend",
    "record_epochs",
    "set_user_attrs",
    "show_value",
    "slot_counts",
    "slot_holders",
    "slot_maker",
    "sqlalchemy_url",
    "storage_name",
    "storage_url",
    "write_claim_lease",
]
