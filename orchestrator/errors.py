"""User-facing errors: each carries one message naming the bad input and how to fix it.

The entry prints them without a traceback and exits non-zero (2 for configuration,
1 for everything else), before any checkpoint is touched.
"""


class OrchestratorError(Exception):
    exit_code = 1


class ConfigError(OrchestratorError):
    exit_code = 2


class DataError(OrchestratorError):
    pass


class ModelLoadError(OrchestratorError):
    pass


class CheckpointError(OrchestratorError):
    pass


class StorageError(CheckpointError):
    """Writing a checkpoint failed for lack of space, quota or a failing/read-only
    filesystem: not a worker failure, so the run stops instead of restarting."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint does not match the manifest written when it was saved."""


class RunDirLockedError(OrchestratorError):
    """Another live run holds the run directory (names its host, pid and start time)."""


class WorkerError(OrchestratorError):
    """A worker actor died or raised; names the rank and node."""


class WorkerOOMError(WorkerError):
    """Ray's memory monitor killed a worker: the node ran out of memory. Not retried: a
    restart would run into the same limit."""


class NonFiniteError(OrchestratorError):
    """Non-finite loss or gradient norm with train.on_nonfinite=stop."""
