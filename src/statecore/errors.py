"""The statecore exception hierarchy. Everything statecore raises on bad state or bad
input derives from StateError, except argument mistakes, which raise ValueError,
IndexError or TypeError as Python code expects (some classes are both)."""


class StateError(Exception):
    """Base class of statecore's errors."""


class StoreClosed(StateError):
    """The store (or a snapshot of it) was used after close()."""


class StoreForked(StateError):
    """A store or snapshot made before os.fork() was used in the child."""


class StoreLocked(StateError):
    """Another process has the store file or durable directory open."""


class StoreMismatch(StateError, ValueError):
    """An existing store file has another size or page size than asked for."""


class UnsupportedFormat(StateError):
    """A file or buffer was written by a newer statecore format than this one reads."""


class CorruptData(StateError):
    """Base of the errors for bytes that fail their checks; nothing was applied."""


class CorruptDelta(CorruptData, ValueError):
    """A delta buffer is malformed, truncated or fails a checksum."""


class CorruptCheckpoint(CorruptData):
    """A checkpoint file is malformed, truncated or fails a checksum."""


class CorruptStore(CorruptData):
    """A store file's header is damaged or its length is wrong (or it has no store magic:
    not a statecore store file at all)."""


class EpochGap(StateError):
    """A delta starts after the store's state: the pages in between are missing."""


class IncompatibleDelta(StateError, ValueError):
    """A delta or checkpoint was made for another page size or store size."""


class SnapshotReleased(StateError):
    """The snapshot was released (or its store closed) and can no longer be read."""


class SchemaMismatch(StateError):
    """A durable store's schema version differs from the one asked for, with no migration."""
