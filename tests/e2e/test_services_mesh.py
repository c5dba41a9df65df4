"""Services on a mesh of three agents in their own network namespaces (separate processes):
every node is an ingress; replicas spread over hosts and serve through any node; requests
without a token get 401; the real ``openai`` client streams a chat completion through the model
endpoint; a ``0..2`` service activates on its first request, scales up under load and back to
zero; a rolling update under steady load fails no request; and the host of a replica is
SIGKILLed while requests keep succeeding through the others.

One mesh serves every check (they run in order, the destructive one last)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshgpu.testing import AgentProcess, cluster_ca_context
from tests.e2e.agents import ns_agent, wait_for
from tests.e2e.netns import Net, available

REASON = available()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A replica that says who it is: which replica, which deployment (VERSION), and on which host.
APP = """\
import json, os, socket, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(0.3)
        body = json.dumps({
            "replica": os.environ.get("MESHGPU_REPLICA_NUM"),
            "version": os.environ.get("VERSION", "1"),
            "host": socket.gethostname() + "/" + os.environ.get("MESHGPU_JOB_ID", ""),
            "path": self.path,
            "auth": self.headers.get("Authorization", ""),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), H).serve_forever()
"""

SMALL = "resources:\n  cpu: 1..\n  memory: 0.1GB..\n  disk: 1GB..\n"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    root = tmp_path_factory.mktemp("svc")
    net = Net.create(3)
    agents: list[AgentProcess] = []
    try:
        for i, h in enumerate(net.hosts, start=1):
            agents.append(ns_agent(h, root, f"h{i}", extra=["--activation-timeout", "120"]))
            agents[-1].start(agents[0].join_token() if i > 1 else None)
        c = agents[0].client()
        wait_for(lambda: len(c.nodes()) == 3, timeout=60)
        yield agents
    finally:
        for a in agents:
            a.close()
        net.delete()


def _project(tmp: Path, name: str, yaml: str, files: dict[str, str] | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "app.py").write_text(APP)
    for fname, text in (files or {}).items():
        (d / fname).write_text(text)
    (d / "service.yml").write_text(yaml)
    return d


def _apply(agent: AgentProcess, proj: Path) -> str:
    r = agent.cli("apply", "-f", "service.yml", "-y", "-d", cwd=proj, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _http(agent: AgentProcess, token: bool = True) -> httpx.Client:
    headers = {"Authorization": f"Bearer {agent.token}"} if token else {}
    return httpx.Client(
        base_url=agent.url, verify=cluster_ca_context(agent.data), headers=headers, timeout=30
    )


def _ready(agent: AgentProcess, run: str, n: int) -> dict:
    c = agent.client()
    return wait_for(
        lambda: (
            (r := c.run(run))
            and r["service"]
            and r["service"]["ready_replicas"] >= n
            and r["status"] == "running"
            and r
        ),
        timeout=90,
    )


def test_two_replicas_answer_through_every_node(mesh: list[AgentProcess], tmp_path: Path) -> None:
    yaml = (
        "type: service\nname: web\nport: 8000\nreplicas: 2\ncommands:\n  - python3 app.py\n" + SMALL
    )
    out = _apply(mesh[1], _project(tmp_path, "web", yaml))
    assert "/proxy/services/main/web/" in out, out
    run = _ready(mesh[0], "web", 2)
    hosts = {j["node"] for j in run["jobs"] if j["status"] == "running"}
    assert len(hosts) == 2, run  # spread over two hosts
    served: set[str] = set()
    for a in mesh:
        with _http(a) as h:
            for _ in range(8):
                r = h.get("/proxy/services/main/web/hello?x=1")
                assert r.status_code == 200, r.text
                doc = r.json()
                assert doc["path"] == "/hello?x=1"  # prefix stripped
                served.add(doc["replica"])
    assert served == {"0", "1"}, served
    with _http(mesh[2], token=False) as h:
        r = h.get("/proxy/services/main/web/")
        assert r.status_code == 401 and r.json()["status"] == 401, r.text
    # ps -v shows the replicas and their readiness
    ps = mesh[0].cli("ps", "-v")
    assert "replica 0" in ps.stdout and "ready" in ps.stdout, ps.stdout


def test_openai_client_streams_a_chat_completion(mesh: list[AgentProcess], tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    d = tmp_path / "llm"
    shutil.copytree(EXAMPLES / "service-openai", d)
    (d / "service.yml").write_text(
        "type: service\nname: llm\nport: 8000\nmodel: tiny-chat\n"
        "env:\n  - MODEL_NAME=tiny-chat\n"
        "commands:\n  - python3 server.py\n" + SMALL
    )
    out = _apply(mesh[0], d)
    assert "/proxy/models/main/" in out, out
    _ready(mesh[0], "llm", 1)
    a = mesh[2]
    http = httpx.Client(verify=cluster_ca_context(a.data), timeout=30)
    client = openai.OpenAI(base_url=f"{a.url}/proxy/models/main", api_key=a.token, http_client=http)
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    stream = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta]
    text = "".join(x for x in chunks if x)
    assert len(chunks) > 1 and text, chunks
    mesh[0].client().stop("llm")  # frees its host's port 8000 for the last check


def test_scale_from_zero_up_and_back_to_zero(mesh: list[AgentProcess], tmp_path: Path) -> None:
    yaml = (
        "type: service\nname: elastic\nport: 8001\nreplicas: 0..2\nenv:\n  - PORT=8001\n"
        "scaling:\n  metric: rps\n  target: 0.2\n  window: 30s\n"
        "  scale_up_delay: 2s\n  scale_down_delay: 2s\n"
        "commands:\n  - python3 app.py\n" + SMALL
    )
    _apply(mesh[0], _project(tmp_path, "elastic", yaml))
    c = mesh[0].client()
    run = wait_for(lambda: (r := c.run("elastic")) and r["status"] == "running" and r, timeout=30)
    assert not [j for j in run["jobs"] if j["status"] != "terminated"], run  # starts at zero
    with _http(mesh[1]) as h:
        t0 = time.monotonic()
        r = h.get("/proxy/services/main/elastic/first", timeout=120)
        assert r.status_code == 200, r.text  # held until a replica was up: no error
        activation = time.monotonic() - t0
        for _ in range(20):  # 20 requests in a 30 s window at target 0.2 rps: 2 replicas
            assert h.get("/proxy/services/main/elastic/").status_code == 200
    wait_for(lambda: c.run("elastic")["service"]["ready_replicas"] == 2, timeout=90)
    # idle: the window empties and the service goes back to zero replicas
    wait_for(
        lambda: (s := c.run("elastic")["service"]) and s["replicas"] == 0 and s,
        timeout=120,
        interval=1,
    )
    assert activation < 60, activation
    c.stop("elastic")


def test_rolling_update_under_load_fails_no_request(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    yaml = (
        "type: service\nname: roll\nport: 8002\nreplicas: 2\nenv:\n  - VERSION=1\n  - PORT=8002\n"
        "commands:\n  - python3 app.py\n" + SMALL
    )
    proj = _project(tmp_path, "roll", yaml)
    _apply(mesh[0], proj)
    _ready(mesh[0], "roll", 2)
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def load(agent: AgentProcess) -> None:
        with _http(agent) as h:
            while not stop.is_set():
                try:
                    r = h.get("/proxy/services/main/roll/slow")
                    results.append((r.status_code, r.json()["version"] if r.is_success else ""))
                except httpx.HTTPError as e:
                    results.append((0, repr(e)))

    threads = [threading.Thread(target=load, args=(a,)) for a in mesh]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        (proj / "service.yml").write_text(yaml.replace("VERSION=1", "VERSION=2"))
        _apply(mesh[1], proj)
        c = mesh[0].client()
        wait_for(
            lambda: (
                (r := c.run("roll"))
                and r["service"]["deployment_num"] == 1
                and sum(
                    1 for j in r["jobs"] if j["status"] == "running" and j["deployment_num"] == 1
                )
                == 2
                and all(j["deployment_num"] == 1 for j in r["jobs"] if j["status"] == "running")
                and r["service"]["ready_replicas"] == 2
            ),
            timeout=120,
        )
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert "1" in versions and versions[-1] == "2", versions[-10:]
    mesh[0].client().stop("roll")


def test_replica_host_killed_requests_keep_succeeding(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    c = mesh[0].client()
    run = _ready(mesh[0], "web", 2)
    leader = c.status()["leader"]
    by_name = {a.name: a for a in mesh}
    # a host that runs a replica of "web" and is not the leader (the mesh keeps its quorum)
    victim_name = next(
        j["node"]
        for j in run["jobs"]
        if j["status"] == "running" and by_name[j["node"]].client().status()["raft_id"] != leader
    )
    victim = by_name[victim_name]
    survivors = [a for a in mesh if a is not victim]
    victim.kill()
    victim.kill_jobs()
    sc = survivors[0].client()
    # the replica is replaced on a live host, and both survivors' ingress answers
    wait_for(
        lambda: (
            (r := sc.run("web"))
            and r["service"]["ready_replicas"] == 2
            and victim_name not in {j["node"] for j in r["jobs"] if j["ready"]}
        ),
        timeout=120,
    )
    for a in survivors:
        with _http(a) as h:
            for _ in range(10):
                assert h.get("/proxy/services/main/web/").status_code == 200
