"""The replicated state as the rest of meshgpu sees it: the Raft node and its state machine
started together (``start_replica``), followed in tasks of their own (``follow_applied``), a
typed proposer, and ``Leadership`` (the leader's
controllers in a nursery per term)."""

from meshgpu.replica.follow import follow_applied, follow_version
from meshgpu.replica.leadership import Controller, Leadership, election_window_s
from meshgpu.replica.proposer import Proposer, RaftProposer

__all__ = [
    "Controller",
    "Leadership",
    "Proposer",
    "RaftProposer",
    "election_window_s",
    "follow_applied",
    "follow_version",
]
