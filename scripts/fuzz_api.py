"""scripts/fuzz_api.py: schemathesis against every operation of a live agent's /openapi.json.

One agent (``meshgpu.testing.AgentProcess``: fake GPUs, a temporary data dir) is started the
way the tests start one; its URL, token and cluster CA come from where the tests take them (the
client profile it writes and its ``tls/ca.crt``; plain http needs no CA). schemathesis then runs
a bounded number of cases per operation with the checks the API promises:

- ``not_a_server_error``: no 5xx, whatever is sent;
- ``status_code_conformance``: every status answered is documented for the operation;
- ``content_type_conformance``: every answer has a documented media type (errors are
  ``application/problem+json``, logs ``text/plain``, archives ``application/gzip``);
- ``response_schema_conformance``: every JSON answer matches its documented schema;
- ``unsupported_method`` / ``allow_header_conformance``: a method a path does not take is 405
  with an ``Allow`` header naming those it does.

Exits non-zero on any failure; schemathesis's own summary is printed as it comes. Arguments
after ``--`` go to ``schemathesis run`` (e.g. ``-- --max-examples 50``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.client import Client, make_archive  # noqa: E402
from meshgpu.client.http import Profile  # noqa: E402
from meshgpu.testing import AgentProcess  # noqa: E402

SEED_RUN = "type: task\ncommands:\n  - echo hello\nresources:\n  gpu: 1\n"
# Configurations submissions and offers take half of the time (random text is refused before it
# gets far): runs that end at once, fit, wait, or never fit.
CONFIGS = [
    SEED_RUN,
    "type: task\ncommands: ['true']\nresources:\n  gpu: H100:2\n",
    "type: task\nnodes: 2\ncommands: ['true']\nresources:\n  gpu: 8\n",
    "type: service\nport: 8000\ncommands: ['true']\nreplicas: 2\n",
    "type: dev-environment\nide: vscode\n",
    "type: fleet\nnodes: 1\n",
]

HOOKS = Path(__file__).with_name("fuzz_api_hooks.py")
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
]


def ca_file(agent: AgentProcess) -> Path | None:
    """What to trust: the cluster CA the agent's API certificate chains to (None: plain http)."""
    return agent.data / "tls" / "ca.crt" if agent.url.startswith("https://") else None


def seed(agent: AgentProcess, root: Path) -> Path:
    """Things for path parameters to name half of the time (else random names, mostly 404): a
    finished run (its logs end, so a followed log does too) and a code archive. Returns a
    schemathesis config file binding them."""
    ca = ca_file(agent)
    profile = Profile(agent.url, agent.token, ca=ca.read_text() if ca else None)
    work = root / "code"
    work.mkdir()
    (work / "train.py").write_text("print('hello')\n")
    with Client(profile) as c:
        data, sha = make_archive(work)
        c.upload_code(data, sha)
        c.submit(SEED_RUN, name="fuzz-done", code_sha256=sha)
        deadline = time.monotonic() + 60
        while c.run("fuzz-done")["status"] != "done":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the seed run did not finish: {c.run('fuzz-done')}")
            time.sleep(0.1)
    config = root / "schemathesis.toml"
    config.write_text(
        f"""
[dictionaries.runs]
values = ["fuzz-done"]

[dictionaries.archives]
values = ["{sha}"]

[dictionaries.configs]
values = {json.dumps(CONFIGS)}

[parameters]
"path.name" = {{ dictionary = "runs", probability = 0.5 }}
"path.sha" = {{ dictionary = "archives", probability = 0.5 }}
"body.config" = {{ dictionary = "configs", probability = 0.5 }}
"""
    )
    return config


def schemathesis_args(agent: AgentProcess, config: Path, args: argparse.Namespace) -> list[str]:
    """``schemathesis run`` for ``agent``: the schema, the token, what to trust (its cluster CA
    over https), the checks and the bounds."""
    argv = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{agent.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {agent.token}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        args.phases,
        "--max-examples",
        str(args.max_examples),
        "--seed",
        str(args.seed),
        "--workers",
        str(args.workers),
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
    ]
    ca = ca_file(agent)
    if ca is not None:
        argv += ["--tls-verify", str(ca)]
    if args.report:
        argv += ["--report", "junit", "--report-junit-path", str(Path(args.report).resolve())]
    return argv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    p.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    p.add_argument("--seed", type=int, default=1)
    # One: hypothesis parses lambdas with ast.parse, which CPython 3.11 can fail at in threads
    # ("AST constructor recursion depth mismatch").
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report", help="write a JUnit XML report here")
    p.add_argument("extra", nargs="*", help="after --: more schemathesis run arguments")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as tmp:
        agent = AgentProcess(Path(tmp), "fuzz", fake_gpus="8xH100:80GB")
        agent.start()
        try:
            argv = schemathesis_args(agent, seed(agent, Path(tmp)), args) + args.extra
            env = dict(os.environ) | {"SCHEMATHESIS_HOOKS": str(HOOKS)}
            # In the temporary directory: schemathesis keeps a cache of crashes where it runs.
            rc = subprocess.run(argv, env=env, cwd=tmp, check=False).returncode
            if rc != 0:
                print(f"\n--- the agent's log ---\n{agent.log_tail()}", file=sys.stderr)
            return rc
        finally:
            agent.stop()
            agent.kill_jobs()


if __name__ == "__main__":
    sys.exit(main())
