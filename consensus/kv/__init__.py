"""A reference replicated key-value service on the Raft node (tests and benchmarks)."""

from consensus.kv.machine import KVStateMachine, append, cas, put

__all__ = ["KVStateMachine", "append", "cas", "put"]
