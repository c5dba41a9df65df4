"""``scripts/bench ingress`` end to end at a small size, with an nginx standing in for the
agent's ingress (``--fake-ingress``): a real agent runs both replicas (nginx answering 1 KiB, and
examples/service-openai streaming), and the last line is one JSON object with every key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshgpu.testing import this_meshgpu_env

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_ingress.py"
KEYS = {
    "ingress_rps",
    "direct_rps",
    "nginx_rps",
    "ingress_added_p50_ms",
    "ingress_added_p99_ms",
    "sse_ttfb_added_ms",
    "sse_streams_held",
}


TOOLS = bool(shutil.which("wrk") and (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()))
if not TOOLS and os.environ.get("CI") == "true":
    raise RuntimeError(
        "under CI the ingress bench test must run: scripts/test installs wrk and nginx"
    )


@pytest.mark.slow
@pytest.mark.skipif(not TOOLS, reason="needs wrk and nginx (apt-get install wrk nginx-light)")
def test_bench_ingress_small_run_with_a_stand_in_ingress() -> None:
    args = ["--fake-ingress", "--no-https", "--duration", "1", "--latency-duration", "1"]
    args += ["--sse-streams", "50", "--sse-hold", "1", "--sse-tokens", "5", "--budget", "90"]
    out = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=this_meshgpu_env(),
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(lines[-1])
    assert doc.keys() >= KEYS, doc
    assert "error" not in doc and "ingress_error" not in doc, doc
    assert doc["direct_rps"] > 0 and doc["nginx_rps"] > 0 and doc["ingress_rps"] > 0
    assert doc["sse_streams_held"] == 50 and doc["sse_direct_held"] == 50
    assert any("ingress/nginx" in line for line in lines)
