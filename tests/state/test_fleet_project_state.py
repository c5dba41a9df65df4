"""A fleet belongs to a project: entries and snapshots written before fleets had one read as
main's, main is left out of the encoding (an older build reads a new main entry), and one
project cannot take over another's fleet by applying its name."""

from __future__ import annotations

import json

from meshgpu.state.cluster import ClusterState, decode_cluster, encode_cluster
from meshgpu.state.fleets import ApplyFleet

OLD_ENTRY = (
    b'{"kind":"apply_fleet","at":1.0,"name":"gpus","spec":{"ssh_config":{}},'
    b'"keys":{},"hostnames":["10.0.0.1"]}'
)


def test_an_old_apply_fleet_entry_is_mains() -> None:
    cmd = decode_cluster(OLD_ENTRY)
    assert isinstance(cmd, ApplyFleet)
    assert cmd.project == "main"
    c = ClusterState()
    assert c.apply_one(OLD_ENTRY).ok
    assert c.fleets.fleets["gpus"].project == "main"
    # main is not written: the entry and the snapshot look as they did before
    assert b"project" not in encode_cluster(cmd)
    assert "project" not in json.dumps(c.snapshot_doc()["fleets"])


def test_a_fleets_project_survives_the_log_and_a_snapshot() -> None:
    c = ClusterState()
    cmd = ApplyFleet(at=1, name="gpus", spec={"ssh_config": {}}, hostnames=["h"], project="a")
    assert c.apply_one(encode_cluster(cmd)[1:]).ok
    assert c.fleets.fleets["gpus"].project == "a"
    c2 = ClusterState()
    c2.restore_doc(json.loads(json.dumps(c.snapshot_doc())))
    assert c2.fleets.fleets["gpus"].project == "a"
    # an old snapshot's fleet (no project) is main's
    doc = c.fleets.snapshot()
    del doc[0]["project"]
    c2.fleets.restore(doc)
    assert c2.fleets.fleets["gpus"].project == "main"


def test_another_project_cannot_take_over_a_fleet_by_name() -> None:
    c = ClusterState()
    mine = ApplyFleet(at=1, name="gpus", spec={"ssh_config": {}}, hostnames=["h"], project="a")
    assert c.apply_cmd(mine).ok
    theirs = ApplyFleet(at=2, name="gpus", spec={"ssh_config": {}}, hostnames=["x"], project="b")
    r = c.apply_cmd(theirs)
    assert (r.ok, r.code) == (False, "exists")
    f = c.fleets.fleets["gpus"]
    assert (f.project, list(f.hosts)) == ("a", ["h"])
    # the same project re-applies as before
    again = ApplyFleet(
        at=3, name="gpus", spec={"ssh_config": {}}, hostnames=["h", "i"], project="a"
    )
    assert c.apply_cmd(again).ok
    assert sorted(c.fleets.fleets["gpus"].hosts) == ["h", "i"]
