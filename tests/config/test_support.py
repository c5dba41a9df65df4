"""The rule (``meshgpu/config/support.py``): every field of every run type is honoured or refused
at its line, and the table says which, for every field the models have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshgpu.config import ConfigError
from meshgpu.config.loader import load_config_located, parse_config_located
from meshgpu.config.render import to_json
from meshgpu.config.runs import BaseRunConfiguration
from meshgpu.config.spec import (
    DSTACK_BASE_IMAGE,
    DSTACK_DEVEL_IMAGE,
    DSTACK_DIND_IMAGE,
    compile_run,
)
from meshgpu.config.support import (
    FIELDS,
    Honoured,
    MeshCapabilities,
    Part,
    Refused,
    all_field_keys,
    check_config,
    check_support,
)
from meshgpu.runner.container import container_argv
from meshgpu.state import StateMachine
from tests._paths import CORPUS
from tests.scheduler._world import host, world

ROOT = Path(__file__).resolve().parents[2]
NO_RUNTIME = MeshCapabilities(container_runtime=False)
EVERYTHING = MeshCapabilities(container_runtime=True, network_volumes=True)


def issues(text: str, caps: MeshCapabilities | None, file: str = "f.yml") -> list[str]:
    config, positions = parse_config_located(text, file)
    return [str(i) for i in check_config(config, positions, caps)]


# --- (a) every field has an entry ------------------------------------------------------------


def test_every_field_of_every_run_type_has_an_entry() -> None:
    missing = sorted(all_field_keys() - set(FIELDS))
    assert not missing, f"fields with no entry in meshgpu/config/support.py FIELDS: {missing}"
    stale = sorted(set(FIELDS) - all_field_keys())
    assert not stale, f"entries for fields the models do not have: {stale}"


def test_a_part_belongs_to_an_entry_that_decides() -> None:
    for key, entry in FIELDS.items():
        if isinstance(entry, Part):
            assert isinstance(FIELDS[entry.of], Honoured | Refused), key
            assert key.startswith(entry.of + "."), key


def test_every_pointer_names_a_file_that_exists() -> None:
    """Where an entry says a field is honoured (code, and the test that proves it) exists."""
    for key, entry in FIELDS.items():
        text = entry.where if isinstance(entry, Honoured) else getattr(entry, "otherwise", None)
        for ref in re.findall(r"(?:meshgpu|tests)/[\w/]+(?:\.py)?", text or ""):
            assert (ROOT / ref).exists(), f"{key}: {ref} does not exist"


# --- (b) every refusal, at its line ----------------------------------------------------------

SERVICE = "type: service\nport: 8000\ncommands: [serve]\n"
TASK = "type: task\ncommands: [train]\n"

# key -> (configuration, capabilities it is refused with, where, what the reason says)
REFUSALS: dict[str, tuple[str, MeshCapabilities | None, str, str]] = {
    "image": (
        "type: task\nimage: ubuntu\n",
        NO_RUNTIME,
        "f.yml:2:1: image",
        "image needs a container runtime; no member has one",
    ),
    "docker": (
        TASK + "docker: true\n",
        NO_RUNTIME,
        "f.yml:3:1: docker",
        "docker: true (Docker-in-Docker) needs a container runtime; no member has one",
    ),
    "privileged": (
        TASK + "privileged: true\n",
        NO_RUNTIME,
        "f.yml:3:1: privileged",
        "privileged needs a container runtime; no member has one",
    ),
    "entrypoint": (
        "type: task\nentrypoint: /bin/run\ncommands: [x]\n",
        NO_RUNTIME,
        "f.yml:2:1: entrypoint",
        "entrypoint needs a container runtime; no member has one",
    ),
    "registry_auth": (
        "type: task\nimage: private/x\nregistry_auth:\n  username: u\n  password: p\n",
        NO_RUNTIME,
        "f.yml:3:1: registry_auth",
        "registry_auth (an image pull) needs a container runtime",
    ),
    "user": (
        TASK + "user: 'app user'\n",
        None,
        "f.yml:3:1: user",
        "user 'app user' cannot exist: write a user name or a uid",
    ),
    "home_dir": (TASK + "home_dir: /root\n", None, "f.yml:3:1: home_dir", "set HOME in env"),
    "setup": (
        TASK + "setup:\n  - pip install x\n",
        None,
        "f.yml:3:1: setup",
        "dstack runs it only in dev environments: put these commands first in commands",
    ),
    "dstack": (
        TASK + "dstack: true\n",
        None,
        "f.yml:3:1: dstack",
        "meshgpu does not speak dstack's API, so a dstack client in the job would fail",
    ),
    "volumes[].name": (
        TASK + "volumes:\n  - name: data\n    path: /data\n",
        EVERYTHING.__class__(container_runtime=True),
        "f.yml:4:5: volumes[0].name",
        "named volume 'data': network volumes are refused until a backend provides them",
    ),
    "gateway": (
        SERVICE + "gateway: team/gw\n",
        None,
        "f.yml:4:1: gateway",
        "gateway team/gw: meshgpu has no gateways; the ingress on every node serves services",
    ),
    "model.chat_template": (
        SERVICE + "model:\n  name: m\n  chat_template: '{{x}}'\n",
        None,
        "f.yml:6:3: model.chat_template",
        "chat_template is for format: tgi",
    ),
    "model.eos_token": (
        SERVICE + "model:\n  name: m\n  eos_token: '</s>'\n",
        None,
        "f.yml:6:3: model.eos_token",
        "eos_token is for format: tgi",
    ),
    "groups[].router": (
        "type: service\nport: 8000\nreplicas:\n  - count: 1\n    commands: [r]\n"
        "    router:\n      type: sglang\n  - count: 2\n    commands: [w]\n",
        None,
        "f.yml:6:5: replicas[0].router",
        "router (type: sglang) is not supported: meshgpu's ingress sends the service's traffic "
        "to every replica of every group",
    ),
}
# A replica group's image/docker/privileged (the rest are honoured: tests/config/test_group_fields.py)
for _key, _value, _what in (
    ("image", "x", "image (of a replica group)"),
    ("docker", "true", "docker: true (of a replica group)"),
    ("privileged", "true", "privileged (of a replica group)"),
):
    REFUSALS[f"groups[].{_key}"] = (
        f"type: service\nport: 8000\ncommands: [s]\nreplicas:\n  - count: 1\n    {_key}: {_value}\n",
        NO_RUNTIME,
        f"f.yml:6:5: replicas[0].{_key}",
        f"{_what} needs a container runtime; no member has one",
    )


def test_every_refusal_has_an_example() -> None:
    refused = {k for k, e in FIELDS.items() if isinstance(e, Refused)}
    assert refused == set(REFUSALS)


@pytest.mark.parametrize("key", sorted(REFUSALS))
def test_a_refused_field_is_refused_at_its_line_with_its_reason(key: str) -> None:
    text, caps, where, reason = REFUSALS[key]
    found = issues(text, caps)
    # One issue for the field (registry_auth comes with the image it is for, refused too).
    [issue] = [i for i in found if i.startswith(where + ": ")] or [found]
    assert reason in issue
    assert len(found) == (2 if key == "registry_auth" else 1), found
    entry = FIELDS[key]
    assert isinstance(entry, Refused)
    if caps is not None:
        # Refused because of what this mesh lacks: not offline, and not on a mesh that has it.
        assert issues(text, None) == []
        assert issues(text, EVERYTHING) == []


def test_a_refused_field_is_refused_through_parsing_too() -> None:
    """Refusals of a file are reported together, in file order, each at its own line."""
    text = TASK + "dstack: true\nhome_dir: /root\nimage: x\n"
    assert [i.split(": ")[0] for i in issues(text, NO_RUNTIME)] == [
        "f.yml:3:1",
        "f.yml:4:1",
        "f.yml:5:1",
    ]


def test_values_that_ask_nothing_impossible_are_honoured() -> None:
    for text in (
        SERVICE + "gateway: false\n",
        SERVICE + "gateway: true\n",
        SERVICE + "https: false\n",
        SERVICE + "https: auto\n",
        TASK + "dstack: false\n",
        TASK + "setup: []\n",
        "type: dev-environment\nide: vscode\nsetup: [echo legacy]\nversion: 1.90.0\n",
        TASK + "creation_policy: reuse-or-create\nidle_duration: 1h\ntags: {team: a}\n"
        "backend_options: {aws: {x: 1}}\n",
        TASK
        + "volumes:\n  - /data:/data\n  - instance_path: /x\n    path: /y\n    optional: true\n",
        TASK + "registry_auth: {username: u, password: p}\n",  # no image: nothing to pull
        "type: service\nport: '80:8000'\ncommands: [s]\n",
        TASK + "user: nobody\n",
        TASK + "user: 1000:1000\n",
        TASK + "user: app:staff\n",
    ):
        assert issues(text, NO_RUNTIME) == [], text


@pytest.mark.parametrize("user", ["a:b:c", "x y", ":1", "4294967295", "1000:-1"])
def test_a_user_that_cannot_exist_is_refused(user: str) -> None:
    [issue] = issues(TASK + f"user: '{user}'\n", None)
    assert "cannot exist" in issue


def test_capabilities_come_from_the_members() -> None:
    assert MeshCapabilities.from_nodes([]) == MeshCapabilities()
    sm: StateMachine = world(host("a", 0), host("b", 0, runtime="/usr/bin/docker"))
    assert MeshCapabilities.from_nodes(sm.nodes.values()).container_runtime is True
    sm = world(host("a", 0))
    assert MeshCapabilities.from_nodes(sm.nodes.values()).container_runtime is False


def test_check_support_works_without_positions() -> None:
    config, _ = parse_config_located(TASK + "dstack: true\n")
    assert isinstance(config, BaseRunConfiguration)
    [issue] = check_support(config, None, None, file="x.yml")
    assert (issue.file, issue.line, issue.path) == ("x.yml", None, "dstack")


# --- (c) the effect of fields honoured here --------------------------------------------------


def _spec(text: str):  # type: ignore[no-untyped-def]
    config, _ = parse_config_located(text)
    return compile_run(to_json(config))


def test_docker_runs_in_dstacks_dind_image_privileged_with_its_daemon_first() -> None:
    spec = _spec(TASK + "docker: true\n")
    assert spec.image == DSTACK_DIND_IMAGE and spec.privileged and spec.placement.image
    assert spec.jobs[0].commands == ("start-dockerd", "train")


def test_privileged_and_entrypoint_without_image_run_in_dstacks_base_image() -> None:
    spec = _spec(TASK + "privileged: true\n")
    assert (spec.image, spec.privileged, spec.placement.image) == (DSTACK_BASE_IMAGE, True, True)
    assert spec.shell == "bash"  # dstack's images run commands with bash
    assert _spec(TASK + "privileged: true\nnvcc: true\n").image == DSTACK_DEVEL_IMAGE
    spec = _spec("type: task\nentrypoint: python -u\ncommands: [train.py]\n")
    assert spec.image == DSTACK_BASE_IMAGE and spec.entrypoint == "python -u"
    assert _spec(TASK).image is None and not _spec(TASK).placement.image


def test_entrypoint_takes_the_commands_as_its_arguments() -> None:
    """dstack: ``shlex.split(entrypoint) + commands``, no shell in between."""
    argv = container_argv(
        "docker",
        job_id="j",
        image="img",
        commands=["train.py", "--epochs 3"],
        env={},
        work_dir="/w",
        entrypoint="python -u",
    )
    at = argv.index("--entrypoint")
    assert argv[at + 1] == "python"
    assert argv[argv.index("img") :] == ["img", "-u", "train.py", "--epochs 3"]


def test_a_task_groups_ports_are_held_on_its_hosts() -> None:
    spec = _spec(
        "type: task\ngroups:\n  - name: a\n    commands: [x]\n    ports: [8080]\n"
        "  - name: b\n    commands: [y]\n    ports: ['*:9000']\n"
    )
    assert spec.host_ports == (8080, 9000)


# Honoured fields proven elsewhere (the entries' pointers name the tests): placement filters in
# tests/scheduler, probes/ingress/autoscaling in tests/services, retry and stop_criteria in
# tests/state/test_run_policies.py, startup_order in tests/runner/test_startup_order.py,
# autostop in tests/devenv/test_autostop.py; python/nvcc/repos/files/working_dir (ENV),
# volumes/user/shm_size (SANDBOX), schedule/spot_policy/max_price/registry_auth (SCHED) in
# their own per-field tests.

# --- (d) the dstack corpus -------------------------------------------------------------------

# What no mesh can honour (``meshgpu config validate``, offline), per corpus file.
CORPUS_REFUSED = {
    "dev-environment--mkdocs__docs__concepts__dev-environments--9aa2c79beb.yml": {"dstack"},
    "service--mkdocs__docs__concepts__exports--9d820e19c1.yml": {"gateway"},
    "service--mkdocs__docs__concepts__services--0356c1c459.yml": {"replicas[0].router"},
    "service--mkdocs__docs__concepts__services--8bbc99d10f.yml": {"dstack"},
    # Their groups' image/python/nvcc/docker are honoured; the router is not (support.py).
    "service--mkdocs__docs__examples__inference__dynamo--8b04de1170.yml": {"replicas[0].router"},
    "service--mkdocs__docs__examples__inference__vllm--ed21972eed.yml": {"replicas[0].router"},
    "task--mkdocs__docs__concepts__tasks--b64df5307d.yml": {"dstack"},
}
# And at apply on a mesh with a container runtime but no network volumes, besides those.
CORPUS_NAMED_VOLUMES = {
    "dev-environment--mkdocs__docs__concepts__volumes--da3cc71484.yml",
    "task--mkdocs__docs__guides__migration__slurm--3495c38796.yml",
    "task--mkdocs__docs__guides__migration__slurm--e9a5ca085b.yml",
    "task--mkdocs__docs__guides__migration__slurm--fbcb72d6f7.yml",
}


def _corpus_refusals(caps: MeshCapabilities | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((CORPUS / "valid").glob("*.yml")):
        try:
            config, positions = load_config_located(path)
        except ConfigError as e:  # the schema layer keeps every valid file
            pytest.fail(f"{path.name} no longer parses: {e}")
        found = check_config(config, positions, caps)
        for issue in found:
            assert issue.line is not None and issue.file == str(path)
        if found:
            out[path.name] = {i.path for i in found}
    return out


def test_the_corpus_parses_and_only_what_no_mesh_can_honour_is_refused_offline() -> None:
    assert _corpus_refusals(None) == CORPUS_REFUSED


def test_the_corpus_on_a_mesh_with_a_container_runtime() -> None:
    got = _corpus_refusals(MeshCapabilities(container_runtime=True))
    assert set(got) == set(CORPUS_REFUSED) | CORPUS_NAMED_VOLUMES
    for name in CORPUS_NAMED_VOLUMES:
        assert got[name] == {"volumes[0].name"}


# The corpus's multi-node cluster fleets: honoured on a mesh with a backend that places
# instances together (aws, local), refused at apply, at the placement line, on one whose only
# backend cannot (config/support.py BACKEND_FLEET_FIELDS["placement"]).
CORPUS_CLUSTER_FLEETS = {
    "fleet--examples__misc__ray__README--6ca30636d4.yml",
    "fleet--examples__misc__spark__README--bc35ef4a23.yml",
    "fleet--mkdocs__docs__examples__clusters__crusoe--790495ed35.yml",
    "fleet--mkdocs__docs__examples__clusters__crusoe--e9d80004d7.yml",
    "fleet--mkdocs__docs__examples__clusters__lambda--87ebfd0b8e.yml",
    "fleet--mkdocs__docs__examples__clusters__nebius--62c61fe2c3.yml",
    "fleet--mkdocs__docs__examples__clusters__nebius--7af708a7bb.yml",
}


def test_the_corpus_cluster_fleets_depend_on_the_backends_at_apply() -> None:
    # the backends they name (gcp, crusoe, kubernetes, nebius), configured under those names:
    # with plugins that place instances together, and with plugins that cannot
    named = ("crusoe", "gcp", "kubernetes", "nebius")
    can = MeshCapabilities(container_runtime=True, backends=tuple((n, n, True) for n in named))
    got = _corpus_refusals(can)
    assert set(got) == set(CORPUS_REFUSED) | CORPUS_NAMED_VOLUMES
    cannot = MeshCapabilities(container_runtime=True, backends=tuple((n, n, False) for n in named))
    got = _corpus_refusals(cannot)
    assert set(got) == set(CORPUS_REFUSED) | CORPUS_NAMED_VOLUMES | CORPUS_CLUSTER_FLEETS
    for name in CORPUS_CLUSTER_FLEETS:
        assert got[name] == {"placement"}
