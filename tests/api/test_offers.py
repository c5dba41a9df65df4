"""``GET/POST /api/v1/offers``: where a request would fit now, through the real app."""

from __future__ import annotations

import json
from pathlib import Path

from meshgpu.api.app import APPLIED_HEADER
from tests.api._stub import StubAgent, api
from tests.scheduler._world import host, schedule, submit, task, world


async def test_a_request_that_fits_now(tmp_path: Path) -> None:
    sm = world(
        host("n1", 8, labels={"zone": "a"}),
        host("n2", 8),
        submit("big", task("H100:8"), at=1),
        submit("half", task("H100:4"), at=2),
    )
    schedule(sm)
    sm.applied_index = 41
    async with api(StubAgent(sm, tmp_path)) as c:
        r = await c.get("/api/v1/offers", params={"gpu": "H100:80GB:2"})
    assert r.status_code == 200, r.text
    assert r.headers[APPLIED_HEADER] == "41"
    doc = r.json()
    assert doc["fits_now"] is True and doc["after_queue"] is False
    [req] = doc["requests"]
    assert req["resources"]["gpu"] == "H100:80GB:2" and req["nodes"] == 1
    assert req["summary"].startswith("2xH100:80GB (cpu=2.. mem=8GB.. disk=100GB..")
    assert (req["idle"], req["busy"], req["reason"]) == (1, 1, "")
    idle, busy = req["offers"]
    # n2 holds the 4-GPU run: its 4 free GPUs fit most tightly; n1 is full.
    assert idle == {
        "node_id": "n2",
        "node": "n2",
        "availability": "idle",
        "gpu_indices": [4, 5],
        "gpus": "8xH100:80GB",
        "free_gpus": 4,
        "total_gpus": 8,
        "blocks": None,
        "free_blocks": None,
        "total_blocks": None,
        "reserved_for": None,
        "labels": {},
    }
    assert (busy["node"], busy["availability"], busy["gpu_indices"]) == ("n1", "busy", [])
    assert busy["labels"] == {"zone": "a"}


async def test_busy_hosts_say_why_it_would_wait(tmp_path: Path) -> None:
    sm = world(host("n1", 8), submit("hog", task("H100:8"), at=1))
    schedule(sm)
    async with api(StubAgent(sm, tmp_path)) as c:
        doc = (await c.get("/api/v1/offers", params={"gpu": "2"})).json()
    [req] = doc["requests"]
    assert doc["fits_now"] is False and req["fits_now"] is False
    assert [o["availability"] for o in req["offers"]] == ["busy"]
    assert req["reason"] == (
        "it would wait: no host can take it now; 1 busy host could run it once work there ends"
    )


async def test_no_host_matches_and_the_reason_says_which_fact(tmp_path: Path) -> None:
    sm = world(host("n1", 8), host("t4", 2, name="T4", mem_gb=16))
    async with api(StubAgent(sm, tmp_path)) as c:
        names = (await c.get("/api/v1/offers", params={"gpu": "A100:2"})).json()
        memory = (
            await c.get("/api/v1/offers", params={"resources": json.dumps({"memory": "1TB.."})})
        ).json()
        fleet = (await c.get("/api/v1/offers", params={"gpu": "1", "fleet": ["prod"]})).json()
    [req] = names["requests"]
    assert req["offers"] == [] and not req["fits_now"]
    assert req["reason"] == (
        "no host can ever run it: n1 has 0 matching GPUs, the job needs 2 (A100:2); "
        "t4 has 0 matching GPUs, the job needs 2 (A100:2)"
    )
    assert "n1 has 512GB memory, the job needs 1TB.." in memory["requests"][0]["reason"]
    assert "fleet" in fleet["requests"][0]["reason"]
    assert fleet["requests"][0]["offers"] == []


async def test_bad_specs_are_422_problems_that_say_what_to_write(tmp_path: Path) -> None:
    sm = world(host("n1", 8))
    async with api(StubAgent(sm, tmp_path)) as c:
        twice = await c.get("/api/v1/offers", params={"gpu": "H100:2:3"})
        memory = await c.get("/api/v1/offers", params={"memory": "lots"})
        not_json = await c.get("/api/v1/offers", params={"resources": "{gpu: H100"})
        unknown = await c.get("/api/v1/offers", params={"resources": '{"gpus": "H100"}'})
        nodes = await c.get("/api/v1/offers", params={"nodes": "0"})
        anonymous = await c.get("/api/v1/offers", headers={"Authorization": ""})
    for r in (twice, memory, not_json, unknown, nodes):
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
    doc = twice.json()
    assert doc["code"] == "invalid_resources"
    assert doc["detail"].startswith("gpu: GPU spec 'H100:2:3' gives the count twice. Write")
    assert "gpu=H100:80GB:2" in doc["detail"]
    assert doc["issues"][0]["path"] == "resources.gpu"
    assert memory.json()["detail"].startswith("memory: invalid memory size 'lots'")
    assert "resources is not JSON" in not_json.json()["detail"]
    assert "gpus: unknown field (did you mean 'gpu'?)" in unknown.json()["detail"]
    assert "nodes" in nodes.json()["detail"]
    assert anonymous.status_code == 401


async def test_blocks_and_gangs(tmp_path: Path) -> None:
    sm = world(
        host("b", 8, blocks=2, labels={"cluster": "x"}),
        host("c", 8, labels={"cluster": "y"}),
        host("d", 8, labels={"cluster": "y"}),
    )
    async with api(StubAgent(sm, tmp_path)) as c:
        one = (await c.get("/api/v1/offers", params={"gpu": "1.."})).json()
        gang = (await c.get("/api/v1/offers", params={"gpu": "8", "nodes": 3})).json()
    by_node = {o["node"]: o for o in one["requests"][0]["offers"]}
    # One block of b is 4 GPUs: the smallest share with at least one GPU.
    b = by_node["b"]
    assert (b["blocks"], b["free_blocks"], b["total_blocks"]) == (1, 2, 2)
    assert len(b["gpu_indices"]) == 4
    assert by_node["c"]["gpu_indices"] == [0]
    [req] = gang["requests"]
    assert (req["jobs"], req["nodes"], req["idle"]) == (3, 3, 3)
    # Three idle hosts, but a gang stays in one cluster and no cluster has three.
    assert req["fits_now"] is False
    assert (
        req["reason"] == "it would wait: 2 of the 3 hosts it needs in one cluster can take it now"
    )


async def test_post_answers_for_a_whole_configuration(tmp_path: Path) -> None:
    sm = world(
        host("n1", 8, labels={"fleet": "prod"}),
        host("n2", 8, labels={"fleet": "dev"}),
        host("t4", 4, name="T4", mem_gb=16, labels={"fleet": "prod"}),
    )
    cfg = """
type: task
fleets: [prod]
groups:
  - name: trainer
    nodes: 1
    commands: [train]
    resources: {gpu: H100:8}
  - name: worker
    nodes: 1
    commands: [work]
    resources: {gpu: T4:2}
"""
    async with api(StubAgent(sm, tmp_path)) as c:
        r = await c.post("/api/v1/offers", json={"config": cfg, "filename": "train.yml"})
        override = await c.post(
            "/api/v1/offers",
            json={"config": {"type": "task", "commands": ["x"]}, "gpu": "H100:2", "nodes": 2},
        )
        bad = await c.post("/api/v1/offers", json={"config": "type: task\nresources: {gpu: 1}\n"})
        fleet_cfg = await c.post("/api/v1/offers", json={"config": "type: fleet\nnodes: 1\n"})
        bad_override = await c.post(
            "/api/v1/offers", json={"config": cfg, "gpu": "H100:x:y", "nodes": 3}
        )
    assert r.status_code == 200, r.text
    doc = r.json()
    trainer, worker = doc["requests"]
    assert (trainer["group"], trainer["nodes"]) == ("trainer", 2)
    # Only the prod fleet: n2 has H100s but is in dev.
    assert [o["node"] for o in trainer["offers"]] == ["n1"]
    assert [o["node"] for o in worker["offers"]] == ["t4"]
    assert doc["fits_now"] is True
    o = override.json()["requests"][0]
    assert (o["nodes"], o["jobs"], o["resources"]["gpu"]) == (2, 2, "H100:2")
    assert {x["node"] for x in o["offers"]} == {"n1", "n2"}
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_config"
    assert "commands" in bad.json()["detail"]
    assert fleet_cfg.status_code == 422 and fleet_cfg.json()["code"] == "not_a_run"
    assert bad_override.status_code == 422
    assert bad_override.json()["detail"].startswith("gpu: GPU spec 'H100:x:y' gives the name")


async def test_after_queue_shows_what_the_queue_holds(tmp_path: Path) -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("hog", task("H100:6"), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8", nodes=2), at=1))
    async with api(StubAgent(sm, tmp_path)) as c:
        now = (await c.get("/api/v1/offers", params={"gpu": "H100:2"})).json()
        queued = (
            await c.get("/api/v1/offers", params={"gpu": "H100:2", "after_queue": "true"})
        ).json()
    assert now["fits_now"] is True
    assert queued["after_queue"] is True and queued["fits_now"] is False
    assert {o["reserved_for"] for o in queued["requests"][0]["offers"]} == {"head"}
    assert queued["requests"][0]["reason"] == (
        "it would wait: no host can take it now; 2 busy hosts could run it once work there ends "
        "(held for waiting run head)"
    )
