"""The leader's duties as controllers, each started by ``Leadership`` for a term of leadership
and cancelled at step-down: scheduling, retention, membership, gossip keys, scheduled runs' starts. Each has one named
interval; none asks whether this node leads."""

from meshgpu.control.gossip_keys import GossipKeys
from meshgpu.control.retention import Retention
from meshgpu.control.schedules import Schedules
from meshgpu.control.scheduling import Demand, Scheduling

__all__ = ["Demand", "GossipKeys", "Retention", "Schedules", "Scheduling"]
