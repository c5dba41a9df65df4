"""SSH fleets in the replicated state: apply, re-apply with hosts added and removed, the
controller's per-host updates, delete, snapshots (old ones without fleets restore empty), and
the fleet's key sealed to the CA (never plaintext in the log or a snapshot)."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshgpu.security import unseal
from meshgpu.state.cluster import ClusterState, encode_cluster
from meshgpu.state.codec import decode
from meshgpu.state.fleets import ApplyFleet, DeleteFleet, ForgetFleetHost, UpdateFleetHost


def _apply(c: ClusterState, hosts: list[str], at: float = 1.0) -> None:
    cmd = ApplyFleet(at=at, name="gpus", spec={"ssh_config": {}}, keys={}, hostnames=hosts)
    assert c.apply_one(encode_cluster(cmd)[1:]).ok


def _states(c: ClusterState) -> dict[str, tuple[int, str]]:
    return {h: (x.num, x.state) for h, x in c.fleets.fleets["gpus"].hosts.items()}


def test_reapply_adds_and_removes_only_the_changed_hosts() -> None:
    c = ClusterState()
    _apply(c, ["a", "b"])
    assert _states(c) == {"a": (0, "provisioning"), "b": (1, "provisioning")}
    upd = UpdateFleetHost(at=2, name="gpus", hostname="a", state="active", node_id="n1")
    assert c.apply_cmd(upd).ok
    _apply(c, ["a", "c"], at=3)
    assert _states(c) == {"a": (0, "active"), "b": (1, "terminating"), "c": (2, "provisioning")}
    # a conditional update loses against a state change that came first
    stale = UpdateFleetHost(
        at=4, name="gpus", hostname="b", state="active", if_state="provisioning"
    )
    assert c.apply_cmd(stale).code == "stale"
    assert c.apply_cmd(ForgetFleetHost(at=5, name="gpus", hostname="b")).ok
    assert "b" not in c.fleets.fleets["gpus"].hosts


def test_delete_one_host_then_the_fleet() -> None:
    c = ClusterState()
    _apply(c, ["a", "b"])
    assert c.apply_cmd(DeleteFleet(at=2, name="gpus", hosts=["zz"])).code == "not_found"
    assert c.apply_cmd(DeleteFleet(at=2, name="gpus", hosts=["a"])).ok
    assert _states(c) == {"a": (0, "terminating"), "b": (1, "provisioning")}
    assert c.apply_cmd(DeleteFleet(at=3, name="gpus")).ok
    assert c.fleets.fleets["gpus"].deleting
    for h in ("a", "b"):
        assert c.apply_cmd(ForgetFleetHost(at=4, name="gpus", hostname=h)).ok
    assert "gpus" not in c.fleets.fleets  # deleted and empty: gone


def test_snapshot_round_trip_and_old_snapshots() -> None:
    c = ClusterState()
    assert "fleets" not in c.snapshot_doc()  # no fleets: the snapshot keeps its old shape
    _apply(c, ["a"])
    doc = json.loads(json.dumps(c.snapshot_doc()))
    d = ClusterState()
    d.restore_doc(doc)
    assert _states(d) == {"a": (0, "provisioning")}
    old = {k: v for k, v in doc.items() if k != "fleets"}
    e = ClusterState()
    e.restore_doc(old)
    assert e.fleets.fleets == {}


def test_commands_decode() -> None:
    cmd = UpdateFleetHost(at=1, name="gpus", hostname="a", reason="x")
    assert decode(encode_cluster(cmd)) == cmd


async def test_apply_seals_the_key_to_the_ca(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fleet's private key enters the state sealed to the CA certificate: the CA key opens
    it, and its text is nowhere in the proposed entry."""
    from meshgpu.ops.fleets import Fleets
    from meshgpu.security import NodeIdentity, create_cluster
    from meshgpu.state import StateMachine
    from meshgpu.state.machine import Result

    ident = NodeIdentity(tmp_path / "tls")
    ca = create_cluster(ident, 1, hosts=("127.0.0.1",))
    assert ca is not None
    cluster = ClusterState()
    cluster.ca_cert_pem = ident.files.ca_cert.read_text()
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    entries: list[bytes] = []

    class Proposer:
        async def propose(self, data: bytes, request_id: bytes | None = None) -> Result:
            entries.append(data)
            return cluster.apply_one(data[1:])

    fleets = Fleets(Proposer(), cluster, StateMachine())  # type: ignore[arg-type]
    text = "type: fleet\nname: gpus\nssh_config:\n  identity_file: ~/k\n  hosts: [10.0.0.1]\n"
    view = await fleets.apply(text, "fleet.yml", {"~/k": pem})
    assert view["hosts"][0]["state"] == "provisioning"
    secret = pem.splitlines()[1]
    assert all(secret.encode() not in e for e in entries)
    assert secret not in json.dumps(cluster.snapshot_doc())
    f = cluster.fleets.fleets["gpus"]
    ref = f.spec["ssh_config"]["identity_file"]
    ca_key = serialization.load_pem_private_key(ident.ca_key_path.read_bytes(), password=None)
    assert unseal(bytes.fromhex(f.keys[ref]), ca_key).decode() == pem  # type: ignore[arg-type]


async def test_apply_refuses_what_it_cannot_provision(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cloud fleet, a fleet without a name, a key that is not a private key, and a host that
    belongs to another fleet are refused before anything is proposed."""
    import pytest

    from meshgpu.errors import Conflict, Invalid
    from meshgpu.ops.fleets import Fleets
    from meshgpu.security import NodeIdentity, create_cluster
    from meshgpu.state import StateMachine
    from meshgpu.state.machine import Result

    ident = NodeIdentity(tmp_path / "tls")
    create_cluster(ident, 1, hosts=("127.0.0.1",))
    cluster = ClusterState()
    cluster.ca_cert_pem = ident.files.ca_cert.read_text()
    proposed: list[bytes] = []

    class Proposer:
        async def propose(self, data: bytes, request_id: bytes | None = None) -> Result:
            proposed.append(data)
            return cluster.apply_one(data[1:])

    fleets = Fleets(Proposer(), cluster, StateMachine())  # type: ignore[arg-type]
    _apply(cluster, ["10.0.0.1"])  # fleet gpus holds 10.0.0.1
    ssh = "ssh_config:\n  hosts: [10.0.0.1]\n"
    cases = [
        ("type: fleet\nname: cloud\nnodes: 2\n", {}, Invalid, "no_backend"),
        ("type: fleet\n" + ssh, {}, Invalid, "no_name"),
        (
            "type: fleet\nname: x\nssh_config:\n  identity_file: k\n  hosts: [10.0.0.9]\n",
            {"k": "not a key"},
            Invalid,
            "bad_key",
        ),
        (
            "type: fleet\nname: x\nssh_config:\n  identity_file: k\n  hosts: [10.0.0.9]\n",
            {},
            Invalid,
            "missing_key",
        ),
        ("type: fleet\nname: other\n" + ssh, {}, Conflict, "host_in_use"),
    ]
    for text, keys, kind, code in cases:
        with pytest.raises(kind) as e:
            await fleets.apply(text, "fleet.yml", keys)
        assert e.value.code == code, (text, e.value)
    assert proposed == []


def test_backend_fleet_instances_and_backends_in_the_state() -> None:
    from meshgpu.state.fleets import (
        AddBackend,
        AddFleetInstance,
        ForgetFleetInstance,
        RemoveBackend,
        UpdateFleetInstance,
    )

    c = ClusterState()
    assert c.apply_cmd(AddBackend(at=1, name="aws", type="aws", sealed="00ff")).ok
    spec = {"nodes": {"min": 0, "max": 1}}
    assert c.apply_cmd(ApplyFleet(at=1, name="cloud", spec=spec, hostnames=[])).ok
    add = AddFleetInstance(
        at=2, name="cloud", instance_id="i1", backend="aws", offer={"price": 1}, max_instances=1
    )
    assert c.apply_cmd(add).ok
    # nodes.max is enforced by the state (two leaders' decisions cannot both pass)
    again = add.model_copy(update={"instance_id": "i2"})
    assert c.apply_cmd(again).code == "full"
    assert c.apply_cmd(RemoveBackend(at=3, name="aws")).code == "in_use"
    upd = UpdateFleetInstance(at=3, name="cloud", instance_id="i1", state="terminating")
    assert c.apply_cmd(upd).ok
    back = UpdateFleetInstance(at=4, name="cloud", instance_id="i1", state="idle")
    assert c.apply_cmd(back).code == "stale"  # terminating is final
    # snapshot round trip; the secrets stay sealed
    doc = json.loads(json.dumps(c.snapshot_doc()))
    assert doc["backends"][0]["sealed"] == "00ff"
    c2 = ClusterState()
    c2.restore_doc(doc)
    assert c2.fleets.fleets["cloud"].instances["i1"].state == "terminating"
    assert c2.fleets.backends["aws"].type == "aws"
    assert c.apply_cmd(ForgetFleetInstance(at=5, name="cloud", instance_id="i1")).ok
    assert c.apply_cmd(RemoveBackend(at=6, name="aws")).ok
    # an SSH fleet's snapshot keeps its shape (no "instances" key when there are none)
    c.apply_cmd(ApplyFleet(at=7, name="gpus", spec={"ssh_config": {}}, hostnames=["a"]))
    snap = c.snapshot_doc()
    assert "instances" not in next(f for f in snap["fleets"] if f["name"] == "gpus")
    assert "backends" not in snap


def test_env_sealed_is_left_out_when_unset() -> None:
    """An ApplyFleet without sealed env encodes as before it existed, and old entries (no
    env_sealed, the values in the spec) still decode."""
    cmd = ApplyFleet(at=1, name="gpus", spec={"env": {"A": "1"}}, hostnames=["a"])
    data = encode_cluster(cmd)
    assert b"env_sealed" not in data
    assert decode(data).env_sealed == ""
    sealed = cmd.model_copy(update={"env_sealed": "ab"})
    assert decode(encode_cluster(sealed)).env_sealed == "ab"


def test_forget_node_ends_its_jobs_and_drops_the_record() -> None:
    """ForgetNode (a fleet host deleted): the node's record goes from the state and from
    snapshots; a second ForgetNode, or one for an unknown node, changes nothing."""
    from meshgpu.state.cluster import ForgetNode, Replicated
    from meshgpu.state.codec import encode
    from meshgpu.state.commands import RegisterNode

    rep = Replicated()
    i = 0

    def apply(data: bytes) -> None:
        nonlocal i
        i += 1
        assert rep.apply([(i, data)])[0].ok

    for node_id in ("n1", "n2"):
        apply(encode(RegisterNode(at=1, node_id=node_id, name=node_id)))
    apply(encode_cluster(ForgetNode(at=2, node_id="n1")))
    assert set(rep.jobs.nodes) == {"n2"}
    apply(encode_cluster(ForgetNode(at=3, node_id="n1")))
    apply(encode_cluster(ForgetNode(at=3, node_id="nope")))
    other = Replicated()
    other.restore(rep.snapshot())
    assert set(other.jobs.nodes) == {"n2"}
