"""One exception hierarchy for the core: catch ``RaftError`` for everything, or a leaf."""

from __future__ import annotations

import enum


class RaftError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(RaftError, ValueError):
    """The ``Config`` is invalid; the message says which field and why."""


class DropReason(enum.Enum):
    NO_LEADER = "no leader is known; retry after an election"
    FORWARDING_DISABLED = "this node is not the leader and proposal forwarding is disabled"
    TRANSFER_IN_PROGRESS = "leadership is being transferred; retry against the new leader"
    UNCOMMITTED_LIMIT = "too many uncommitted bytes; retry when the log has caught up"
    NOT_IN_CONFIG = "this leader is leaving the configuration and takes no new work"
    CONF_CHANGE_PENDING = "a configuration change is still uncommitted"
    CONF_CHANGE_TOO_EARLY = "the leader has not yet committed an entry in its term"
    CONF_CHANGE_INVALID = "the configuration change is not valid against the current one"
    TRANSFER_INVALID = "the transfer target is not a voter of the current configuration"


class ProposalDropped(RaftError):
    """A request (proposal, read, transfer, membership change) was refused, never silently.

    ``reason`` says why; the request had no effect and may be retried.
    """

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name}: {reason.value}" + (f" ({detail})" if detail else ""))


class StorageError(RaftError):
    """Base of the errors a ``Storage`` raises for ranges it cannot serve."""


class CompactedError(StorageError):
    """The requested index is older than the first retained entry (it is in a snapshot)."""


class UnavailableError(StorageError):
    """The requested index is beyond the last entry."""


class SnapshotTemporarilyUnavailable(StorageError):
    """The storage is producing a snapshot; the leader retries later."""


class InvariantViolation(RaftError, AssertionError):
    """The core detected a broken internal invariant. Always a bug (or corrupt storage)."""
