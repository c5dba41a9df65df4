"""The leader's duties as controllers, each started by ``Leadership`` for a term of leadership
and cancelled at step-down: scheduling, retention, membership, gossip keys. Each has one named
interval; none asks whether this node leads."""

from meshgpu.control.gossip_keys import GossipKeys
from meshgpu.control.retention import Retention
from meshgpu.control.scheduling import Demand, Scheduling

__all__ = ["Demand", "GossipKeys", "Retention", "Scheduling"]
