"""Errors that the command line turns into exit codes and one-sentence messages."""


class TunerError(Exception):
    """Something went wrong that is not the user's input (exit code 1)."""

    exit_code = 1


class BadInputError(TunerError):
    """The user's input is wrong: a spec, a URL, an argument (exit code 2)."""

    exit_code = 2


class SpecError(BadInputError):
    """A spec field is missing, unknown, of the wrong type or out of range."""


class StorageError(BadInputError):
    """A storage URL is malformed or its database cannot be reached."""


class StorageMissingError(StorageError):
    """A SQLite or journal file that a command must not create is not there."""


class StudyNotFoundError(BadInputError):
    """No study of that name is in the storage."""


class WorkloadError(BadInputError):
    """A workload name or ``package.module:function`` reference does not load."""
