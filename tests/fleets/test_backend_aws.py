"""The ``aws`` backend (libcloud's EC2 driver) against moto's EC2 in server mode on loopback, and
the backend-fleet controller driving it (its Raft commands applied to a local state): offers
filtered by GPU and price, spot vs on-demand; an instance created with the cluster tags and a
user data carrying a join token, the record in the state before the cloud call; a capacity
error (injected at libcloud's connection layer: moto has no capacity limits) falls back to the
next offer; terminated when its record says so; an orphan (tagged, no record) is terminated at
reconciliation; a record left ``pending`` by a leader that died after the call is adopted, not
bought twice; an API that does not answer backs the controller off; wrong credentials are a
clear error at ``backend add``."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from meshgpu.control.backend_fleets import BackendFleetController  # noqa: E402
from meshgpu.errors import Invalid  # noqa: E402
from meshgpu.fleets.backends import (  # noqa: E402
    TAG_CLUSTER,
    TAG_INSTANCE,
    Requirements,
    load,
)
from meshgpu.security import JoinToken  # noqa: E402
from meshgpu.state.cluster import CLUSTER_TAG, InitCluster, Replicated, encode_cluster  # noqa: E402
from meshgpu.state.fleets import AddBackend, ApplyFleet, UpdateFleetInstance  # noqa: E402

AMI = "ami-03cf127a"  # one of moto's built-in images
KEYS = {"access_key": "AKIAFAKEFAKEFAKE", "secret_key": "fake-secret"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto(tmp: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    exe = str(Path(sys.executable).with_name("moto_server"))
    log = open(tmp / f"moto-{port}.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | (env or {}),
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import libcloud.compute.drivers.ec2 as ec2mod

    # moto 5.2 answers in the 2016-11-15 namespace without libcloud's trailing slash
    # (the libcloud-against-moto notes): a test-only patch, real EC2 keeps the slash.
    saved = ec2mod.NAMESPACE
    ec2mod.NAMESPACE = saved.rstrip("/")
    proc, url = _moto(tmp_path_factory.mktemp("moto"))
    try:
        yield url
    finally:
        ec2mod.NAMESPACE = saved
        proc.terminate()
        proc.wait(timeout=10)


def _ec2(url: str) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEYS["access_key"],
        aws_secret_access_key=KEYS["secret_key"],
    )


def _backend(url: str, **extra: str) -> Any:
    return load("aws", "aws", {"endpoint": url, "image": AMI, **extra}, KEYS)


class LocalProposer:
    """Applies each proposal to a local ``Replicated`` at once (the log of one voter)."""

    def __init__(self, rep: Replicated) -> None:
        self.rep, self.index = rep, 0

    async def propose(self, data: bytes) -> Any:
        self.index += 1
        return self.rep.apply([(self.index, data)])[0]


def _world(url: str, spec: dict[str, Any]) -> tuple[Replicated, BackendFleetController]:
    rep = Replicated()
    p = LocalProposer(rep)
    init = InitCluster(
        at=1,
        cluster_id="c-test",
        ca_cert_pem="",
        api_token_hash="",
        founder_raft_id=1,
        founder_node_id="n1",
        founder_name="m1",
        founder_peer_address="10.0.0.1:7481",
        founder_api_url="https://10.0.0.1:7480",
    )
    assert rep.apply([(0, encode_cluster(init))])[0].ok
    cmds = [
        AddBackend(at=1, name="aws", type="aws", config={"endpoint": url, "image": AMI}),
        ApplyFleet(at=1, name="cloud", spec=spec, hostnames=[]),
    ]
    for cmd in cmds:
        assert rep.apply([(0, encode_cluster(cmd))])[0].ok

    async def token(ttl: float) -> str:
        return str(JoinToken.create("c-test", "f" * 16))

    ctl = BackendFleetController(
        None,
        rep.cluster,
        rep.jobs,
        p,  # type: ignore[arg-type]
        token,
        Path("/nonexistent"),
        lambda: Path("/nonexistent/meshgpu.pyz"),
        loader=lambda t, n, c, s: load(t, n, c, KEYS),
    )
    return rep, ctl


def _tagged(url: str, cluster: str = "c-test") -> list[dict[str, Any]]:
    out = []
    for r in _ec2(url).describe_instances(
        Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}]
    )["Reservations"]:
        out += [i for i in r["Instances"] if i["State"]["Name"] not in ("terminated",)]
    return out


def test_offers_by_gpu_price_and_spot(moto: str) -> None:
    b = _backend(moto)
    on_demand = b.offers(Requirements(gpu_count=1, max_price=1.0))
    assert [o.instance_type for o in on_demand] == ["g4dn.xlarge", "g6.xlarge"]
    assert not any(o.spot for o in on_demand)
    spot = b.offers(Requirements(gpu_count=1, max_price=1.0, spot=True))
    assert spot and all(o.spot for o in spot) and spot[0].price < on_demand[0].price
    h100 = b.offers(Requirements(gpu_count=8, gpu_names=("H100",), spot=None))
    assert {o.instance_type for o in h100} == {"p5.48xlarge"} and len(h100) == 2
    assert b.offers(Requirements(gpu_count=1, max_price=0.1)) == []
    b.check()


async def test_create_with_fallback_tags_user_data_and_terminate(moto: str) -> None:
    spec = {
        "nodes": {"min": 1, "max": 2},
        "max_price": 1.0,
        "idle_duration": 20,
        "tags": {"team": "ml"},
    }
    rep, ctl = _world(moto, spec)
    backend = ctl.backend("aws")
    conn = backend.driver.connection
    real = conn.request
    refused: list[str] = []

    def request(action: str, params: Any = None, *a: Any, **kw: Any) -> Any:
        p = params or {}
        if p.get("Action") == "RunInstances" and p.get("InstanceType") == "g4dn.xlarge":
            refused.append(p["InstanceType"])
            raise Exception(  # what libcloud raises for EC2's error response  # noqa: TRY002
                "InsufficientInstanceCapacity: We currently do not have sufficient g4dn.xlarge "
                "capacity in the Availability Zone you requested"
            )
        return real(action, params, *a, **kw)

    conn.request = request
    ctl.reconciled.add("aws")
    f = rep.cluster.fleets.fleets["cloud"]
    wants = ctl._wants(f)
    assert wants == [("", None, None)]  # nodes.min
    await ctl.grow("cloud", wants)
    (inst,) = f.instances.values()
    assert inst.state == "pending" and inst.offer["instance_type"] == "g4dn.xlarge"
    assert [c["instance_type"] for c in inst.candidates] == ["g4dn.xlarge", "g6.xlarge"]
    await ctl.create("cloud", inst.instance_id)
    assert refused == ["g4dn.xlarge"]
    assert inst.state == "provisioning", inst
    assert inst.offer["instance_type"] == "g6.xlarge" and inst.token_id
    (ec2,) = _tagged(moto)
    tags = {t["Key"]: t["Value"] for t in ec2["Tags"]}
    assert tags[TAG_INSTANCE] == inst.instance_id and tags["meshgpu-fleet"] == "cloud"
    assert tags["team"] == "ml"  # the fleet's tags (config/support.py honours them)
    assert ec2["InstanceType"] == "g6.xlarge"
    ud = _ec2(moto).describe_instance_attribute(InstanceId=ec2["InstanceId"], Attribute="userData")
    text = base64.b64decode(ud["UserData"]["Value"]).decode()
    assert text.startswith("#!/bin/sh") and "MESHGPU_JOIN_TOKEN=" in text
    assert "--labels fleet=cloud,instance=0,backend=aws,region=us-east-1" in text
    assert "instance_type=g6.xlarge" in text and "--price 0.805" in text
    assert inst.token_id in text
    # the agent file from the members, by default: their API URLs, the download path, a
    # secret whose hash is in the record (not the join token), the cluster CA pinned
    assert "'https://10.0.0.1:7480'" in text and "/api/v1/agent/meshgpu.pyz" in text
    (secret,) = re.findall(r"'([A-Za-z0-9_-]{43})', '/api/v1/agent/meshgpu.pyz'", text)
    assert hashlib.sha256(secret.encode()).hexdigest() == inst.download_hash
    assert "ctx.check_hostname = False" in text and "cadata=CA" in text
    assert "curl" not in text

    # terminate (idle past idle_duration above nodes.min, or deleted): released at EC2
    upd = UpdateFleetInstance(at=2, name="cloud", instance_id=inst.instance_id, state="terminating")
    assert rep.apply([(99, encode_cluster(upd))])[0].ok
    await ctl.terminate("cloud", inst.instance_id)
    assert not f.instances and _tagged(moto) == []


async def test_reconcile_orphan_and_adopt_pending(moto: str) -> None:
    spec = {"nodes": {"min": 1, "max": 1}, "spot_policy": "spot", "max_price": 1.0}
    rep, ctl = _world(moto, spec)
    ec2 = _ec2(moto)
    tag = [{"Key": TAG_CLUSTER, "Value": "c-test"}]
    # an orphan: this cluster's tag, no record
    ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        InstanceType="g4dn.xlarge",
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [*tag, {"Key": TAG_INSTANCE, "Value": "ighost"}]}
        ],
    )
    assert len(_tagged(moto)) == 1
    await ctl.reconcile("aws")
    assert _tagged(moto) == []

    # a leader recorded the instance, called EC2 and died before recording the answer
    f = rep.cluster.fleets.fleets["cloud"]
    await ctl.grow("cloud", ctl._wants(f))
    (inst,) = f.instances.values()
    assert inst.offer["spot"] is True
    ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        InstanceType=inst.offer["instance_type"],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [*tag, {"Key": TAG_INSTANCE, "Value": inst.instance_id}],
            }
        ],
    )
    await ctl.reconcile("aws")  # not an orphan: its record exists
    await ctl.create("cloud", inst.instance_id)  # the next leader: adopted, not bought again
    assert inst.state == "provisioning"
    (only,) = _tagged(moto)
    assert inst.ref["instance_id"] == only["InstanceId"]
    assert ctl._wants(f) == []  # nodes.max reached: no more


async def test_api_that_does_not_answer_backs_off(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens
    rep, ctl = _world(dead, {"nodes": {"min": 1, "max": 1}})
    f = rep.cluster.fleets.fleets["cloud"]
    await ctl.grow("cloud", ctl._wants(f))  # offers come from the catalogue: recorded
    (inst,) = f.instances.values()
    before = time.time()
    await ctl.create("cloud", inst.instance_id)
    assert inst.state == "pending" and inst.attempts == 1, inst
    assert inst.retry_at > before and "did not answer" in inst.reason, inst.reason
    # the controller's loop leaves it alone until retry_at
    async with trio.open_nursery() as n:
        ctl.reconciled.add("aws")
        ctl.tick(n)
        assert inst.instance_id not in ctl.busy
        n.cancel_scope.cancel()


async def test_wrong_credentials_at_backend_add(tmp_path: Path) -> None:
    import libcloud.compute.drivers.ec2 as ec2mod

    from meshgpu.ops.backends import Backends

    saved = ec2mod.NAMESPACE
    ec2mod.NAMESPACE = saved.rstrip("/")
    # moto checks IAM credentials when INITIAL_NO_AUTH_ACTION_COUNT is 0
    proc, url = _moto(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        rep = Replicated()
        ops = Backends(LocalProposer(rep), rep.cluster)  # type: ignore[arg-type]
        with pytest.raises(Invalid) as e:
            await ops.add("aws", "aws", {"endpoint": url, "image": AMI}, KEYS)
        assert e.value.code == "bad_credentials", e.value
        assert "refused the credentials" in str(e.value.detail), e.value.detail
        with pytest.raises(Invalid) as e:
            await ops.add("aws", "aws", {"endpoint": url}, {"access_key": "x"})
        assert "secret_key" in str(e.value.detail)
        assert not rep.cluster.fleets.backends
    finally:
        ec2mod.NAMESPACE = saved
        proc.terminate()
        proc.wait(timeout=10)


def test_cluster_tag_constant() -> None:
    assert CLUSTER_TAG  # the cluster domain's log tag (the proposer above routes by it)


# --- meshgpu offer: the backends' offers beside the mesh's hosts, answered by the leader ------


class _RaftNode:
    def __init__(self, role: str, leader: int) -> None:
        from consensus.core import Role

        self.role = Role.LEADER if role == "leader" else Role.FOLLOWER
        self.leader = leader


class _ToLeader:
    """``Peers.backend_offers`` as the peer port does it: the leader's use case answers."""

    def __init__(self, leader: Any) -> None:
        self.leader, self.asked = leader, []

    async def backend_offers(self, node_id: str, body: dict[str, Any], *, timeout: float) -> Any:
        self.asked.append(node_id)
        return await self.leader.offers_forwarded(body)


def _offer_world(url: str, tmp_path: Path) -> tuple[Any, Any, Any]:
    """A leader holding the CA key (a voter) and a follower without it, over one state with an
    ``aws`` backend whose credentials are sealed to the CA."""
    import json

    from meshgpu.ops.backends import Backends
    from meshgpu.security import NodeIdentity, create_cluster, seal
    from meshgpu.state import StateMachine
    from tests.api._stub import StubAgent

    # Its own directory: the stub agent keeps an identity of its own under tmp_path.
    ident = NodeIdentity(tmp_path / "leader-tls")
    ca = create_cluster(ident, 1, ("127.0.0.1",))
    services = StubAgent(StateMachine(), tmp_path)
    assert services.ssh_keys is not None
    cluster = services.ssh_keys.cluster
    cluster.cluster_id = ""  # initialized below, with a real CA
    rep = Replicated()
    rep.jobs, rep.cluster = services.state, cluster
    init = InitCluster(
        at=1,
        cluster_id="c-test",
        ca_cert_pem=ca.cert_pem().decode(),
        api_token_hash="",
        founder_raft_id=1,
        founder_node_id="n1",
        founder_name="m1",
        founder_peer_address="10.0.0.1:7481",
        founder_api_url="https://10.0.0.1:7480",
    )
    sealed = seal(json.dumps(KEYS).encode(), ca.cert_pem()).hex()
    for i, cmd in enumerate(
        (init, AddBackend(at=1, name="aws", type="aws", config={"endpoint": url}, sealed=sealed))
    ):
        assert rep.apply([(i + 1, encode_cluster(cmd))])[0].ok
    leader = Backends(
        None,
        cluster,
        node=_RaftNode("leader", 1),
        ca_key_path=ident.ca_key_path,  # type: ignore[arg-type]
    )
    peers = _ToLeader(leader)
    follower = Backends(None, cluster, node=_RaftNode("follower", 1), peers=peers)  # type: ignore[arg-type]
    return services, leader, follower


async def test_offer_lists_backend_offers_through_the_leader(moto: str, tmp_path: Path) -> None:
    import httpx

    from meshgpu.api import create_app
    from tests.api._stub import TOKEN

    services, leader, follower = _offer_world(moto, tmp_path)
    # The credentials open on the leader: the plugin's check against moto works with them.
    backend = load(
        "aws",
        "aws",
        {"endpoint": moto},
        leader._secrets("aws", leader.cluster.fleets.backends["aws"].sealed),
    )
    backend.check()
    services.backends = follower  # asked through a follower: forwarded to the leader
    app = create_app(services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://node",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        r = await c.get("/api/v1/offers", params={"gpu": "A10G:1", "memory": "8GB.."})
        assert r.status_code == 200, r.text
        (req,) = r.json()["requests"]
        offers = req["backend_offers"]
        assert req["backend_errors"] == []
        assert {o["instance_type"] for o in offers} == {"g5.xlarge"}  # 1 GPU: not the 4-GPU one
        assert {o["spot"] for o in offers} == {False}  # spot_policy: on-demand by default
        assert [o["price"] for o in offers] == sorted(o["price"] for o in offers)
        assert all(o["region"] == "us-east-1" and o["backend"] == "aws" for o in offers)
        # the mesh's own hosts are still there, beside them
        assert req["offers"] == [] and req["fits_now"] is False and req["reason"]
        assert follower.peers.asked == ["n1"]
        # a run's filters count: on-demand under $2/h
        cfg = "type: task\ncommands: [x]\nresources: {gpu: A10G}\nspot_policy: on-demand\nmax_price: 2\n"
        r = await c.post("/api/v1/offers", json={"config": cfg})
        (req,) = r.json()["requests"]
        assert [(o["instance_type"], o["spot"]) for o in req["backend_offers"]] == [
            ("g5.xlarge", False)
        ]
        cfg = "type: task\ncommands: [x]\nresources: {gpu: A10G:1}\nspot_policy: auto\n"
        r = await c.post("/api/v1/offers", json={"config": cfg})
        (req,) = r.json()["requests"]
        assert [o["spot"] for o in req["backend_offers"]] == [True, False]  # cheapest first
        r = await c.get("/api/v1/offers", params={"gpu": "1", "backends": "false"})
        assert "backend_offers" not in r.json()["requests"][0]


async def test_offers_need_the_leader_and_its_ca_key(moto: str, tmp_path: Path) -> None:
    from meshgpu.errors import Unavailable

    _, leader, follower = _offer_world(moto, tmp_path)
    with pytest.raises(Unavailable) as e:  # a forwarded question lands on a non-leader
        await follower.offers_forwarded({"req": {}})
    assert e.value.code == "not_leader"
    leader.ca_key_path = tmp_path / "none.pem"  # a leader that cannot open the credentials
    got = await leader.offers({"gpu_count": 1})
    assert got["offers"] == [] and "cannot open backend aws's secrets" in got["failed"][0]
    with pytest.raises(Invalid):
        await leader.offers_forwarded({"req": {}, "only": "aws"})


def test_offer_cli_shows_backend_offers_beside_the_hosts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from meshgpu.cli._offer import _show_request

    o = {
        "backend": "aws",
        "region": "us-east-1",
        "zone": "",
        "instance_type": "g5.xlarge",
        "gpu_count": 1,
        "gpu_name": "A10G",
        "gpu_memory_gb": 24.0,
        "cpus": 4,
        "memory_gb": 16.0,
        "spot": True,
        "price": 0.45,
        "availability": "available",
    }
    req = {
        "summary": "1xA10G",
        "group": None,
        "nodes": 1,
        "jobs": 1,
        "offers": [],
        "fits_now": False,
        "reason": "no host can ever run it",
        "idle": 0,
        "backend_offers": [o],
        "backend_errors": ["gcp: no answer within 20 s"],
    }
    _show_request(req)
    text = capsys.readouterr().out
    assert "backend offers" in text and "g5.xlarge" in text and "$0.45" in text
    assert "spot" in text and "us-east-1" in text and "1xA10G:24GB" in text
    assert "backend error: gcp: no answer within 20 s" in text


async def test_cluster_fleet_in_one_placement_group_and_zone(moto: str) -> None:
    """placement: cluster: a cluster placement group made once (tagged), both instances
    launched into it, the second in the first one's zone. moto 5.2 has no placement groups:
    their two calls are answered here (their parameters checked), RunInstances goes to moto."""
    import xml.etree.ElementTree as ET

    import libcloud.compute.drivers.ec2 as ec2mod

    spec = {"nodes": {"min": 2, "max": 2}, "placement": "cluster", "max_price": 1.0}
    rep, ctl = _world(moto, spec)
    conn = ctl.backend("aws").driver.connection
    real = conn.request
    groups: list[str] = []
    calls: list[dict[str, Any]] = []

    class Answer:
        def __init__(self, xml: str) -> None:
            self.object = ET.fromstring(xml)

    def request(action: str, params: Any = None, *a: Any, **kw: Any) -> Any:
        p = dict(params or {})
        ns = ec2mod.NAMESPACE
        if p.get("Action") == "DescribePlacementGroups":
            items = "".join(
                f"<item><groupName>{g}</groupName><state>available</state>"
                "<strategy>cluster</strategy></item>"
                for g in groups
            )
            return Answer(f'<R xmlns="{ns}"><placementGroupSet>{items}</placementGroupSet></R>')
        if p.get("Action") == "CreatePlacementGroup":
            calls.append(p)
            groups.append(p["GroupName"])
            return Answer(f'<R xmlns="{ns}"><return>true</return></R>')
        if p.get("Action") == "RunInstances":
            calls.append(p)
        return real(action, params, *a, **kw)

    conn.request = request
    ctl.reconciled.add("aws")
    f = rep.cluster.fleets.fleets["cloud"]
    await ctl.grow("cloud", ctl._wants(f))
    first, second = sorted(f.instances.values(), key=lambda i: i.num)
    await ctl.create("cloud", first.instance_id)
    await ctl.create("cloud", second.instance_id)
    made = [c for c in calls if c["Action"] == "CreatePlacementGroup"]
    assert len(made) == 1  # once per fleet
    (pg,) = made
    assert pg["GroupName"] == "meshgpu-c-test-cloud" and pg["Strategy"] == "cluster"
    assert pg["TagSpecification.1.ResourceType"] == "placement-group"
    tags = {
        pg[k]: pg[k.replace(".Key", ".Value")]
        for k in pg
        if k.startswith("TagSpecification.1.Tag.") and k.endswith(".Key")
    }
    assert tags == {TAG_CLUSTER: "c-test", "meshgpu-fleet": "cloud"}
    runs = [c for c in calls if c["Action"] == "RunInstances"]
    assert [r["Placement.GroupName"] for r in runs] == ["meshgpu-c-test-cloud"] * 2
    zone = first.ref["zone"]
    assert zone.startswith("us-east-1") and "Placement.AvailabilityZone" not in runs[0]
    assert runs[1]["Placement.AvailabilityZone"] == zone == second.ref["zone"]
    ids = {first.ref["instance_id"], second.ref["instance_id"]}
    ec2 = [i for i in _tagged(moto) if i["InstanceId"] in ids]  # (other tests' share moto)
    assert len(ec2) == 2 and {i["Placement"]["AvailabilityZone"] for i in ec2} == {zone}
    ud = _ec2(moto).describe_instance_attribute(
        InstanceId=ec2[0]["InstanceId"], Attribute="userData"
    )
    assert ",cluster=cloud" in base64.b64decode(ud["UserData"]["Value"]).decode()
    for inst in list(f.instances.values()):
        upd = UpdateFleetInstance(
            at=2, name="cloud", instance_id=inst.instance_id, state="terminating"
        )
        assert rep.apply([(99, encode_cluster(upd))])[0].ok
        await ctl.terminate("cloud", inst.instance_id)
    assert not ids & {i["InstanceId"] for i in _tagged(moto)}
