"""The profiles copy memberlist's config.go; the derived values are its util.go formulas."""

from __future__ import annotations

import math

import pytest

from meshgpu.mesh.gossip import ConfigError, GossipConfig
from meshgpu.mesh.gossip.config import push_pull_scale, retransmit_limit, suspicion_timeout


def test_lan_profile_is_memberlist_default_lan_config() -> None:
    c = GossipConfig.lan()
    assert (c.probe_interval, c.probe_timeout) == (1.0, 0.5)
    assert (c.gossip_interval, c.gossip_nodes) == (0.2, 3)
    assert (c.suspicion_mult, c.suspicion_max_timeout_mult) == (4, 6)
    assert (c.retransmit_mult, c.indirect_checks) == (4, 3)
    assert (c.push_pull_interval, c.gossip_to_the_dead_time, c.tcp_timeout) == (30.0, 30.0, 10.0)
    assert (c.awareness_max_multiplier, c.udp_buffer_size) == (8, 1400)
    assert c.lifeguard and not c.disable_tcp_pings


def test_wan_and_local_profiles() -> None:
    w = GossipConfig.wan()
    assert (w.probe_interval, w.probe_timeout, w.suspicion_mult) == (5.0, 3.0, 6)
    assert (w.gossip_interval, w.gossip_nodes, w.push_pull_interval) == (0.5, 4, 60.0)
    assert (w.gossip_to_the_dead_time, w.tcp_timeout) == (60.0, 30.0)
    loc = GossipConfig.local()
    assert (loc.probe_interval, loc.probe_timeout, loc.suspicion_mult) == (1.0, 0.2, 3)
    assert (loc.indirect_checks, loc.retransmit_mult, loc.gossip_interval) == (1, 2, 0.1)
    assert (loc.push_pull_interval, loc.gossip_to_the_dead_time, loc.tcp_timeout) == (
        15.0,
        15.0,
        1.0,
    )
    assert GossipConfig.profile("wan") == w
    with pytest.raises(ConfigError):
        GossipConfig.profile("moon")


@pytest.mark.parametrize(
    ("n", "susp_min", "susp_max", "retransmits", "push_pull"),
    [
        # reference raft-and-gossip.md §E.2, "Derived (LAN)"
        (10, 4.0, 24.0, 8, 30.0),
        (100, 8.0, 48.0, 12, 90.0),
        (1000, 12.0, 72.0, 16, 180.0),
        (10000, 16.0, 96.0, 20, 300.0),
    ],
)
def test_derived_lan_values(
    n: int, susp_min: float, susp_max: float, retransmits: int, push_pull: float
) -> None:
    c = GossipConfig.lan()
    assert c.suspicion_min(n) == pytest.approx(susp_min)
    assert c.suspicion_max(n) == pytest.approx(susp_max)
    assert c.retransmit_limit(n) == retransmits
    assert c.push_pull_period(n) == pytest.approx(push_pull)


def test_derived_wan_value_and_small_clusters() -> None:
    assert GossipConfig.wan().suspicion_min(100) == pytest.approx(60.0)
    assert GossipConfig.wan().suspicion_max(100) == pytest.approx(360.0)
    # log10 scale is floored at 1: tiny clusters get the multiplier times the interval.
    assert suspicion_timeout(4, 1, 1.0) == suspicion_timeout(4, 10, 1.0) == 4.0
    assert suspicion_timeout(4, 30, 1.0) == pytest.approx(4 * 1.477)  # truncated to ms
    assert retransmit_limit(4, 1) == 4
    assert push_pull_scale(30.0, 32) == 30.0 and push_pull_scale(30.0, 33) == 60.0


def test_expected_detection_time_is_swim_first_detection_plus_suspicion() -> None:
    c = GossipConfig.lan()
    assert c.expected_detection_time(1000) == pytest.approx(math.e / (math.e - 1) + 12.0)
    assert 0 < c.expected_dissemination_time(1000) < 3.0
    assert c.expected_dissemination_time(1) == 0.0


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_timeout": 1.0},
        {"probe_interval": 0.0},
        {"gossip_nodes": 0},
        {"meta_max_size": 1390},
        {"push_pull_interval": -1.0},
        {"suspicion_mult": 0},
    ],
)
def test_validation_rejects_values_that_break_the_protocol(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        GossipConfig.lan().replace(**changes)
