"""Runs: submit (or update an active run in place: a run's priority, a service's configuration),
stop, change priority, look up."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshgpu.config.cron import next_start
from meshgpu.config.interpolation import references
from meshgpu.config.render import to_json
from meshgpu.config.resources import GPUSpec
from meshgpu.config.support import MeshCapabilities
from meshgpu.errors import Conflict, Invalid, NotFound, run_not_found
from meshgpu.ops.configs import parse_run_config_async
from meshgpu.state import (
    CodeRef,
    Result,
    RunRecord,
    SetInactivityDuration,
    SetRunPriority,
    StopRun,
    SubmitRun,
    UpdateService,
    encode,
)

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.runner.code import CodeStore
    from meshgpu.state import StateMachine

_ADJECTIVES = [
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lively",
    "merry",
    "nimble",
    "proud",
    "quick",
    "sharp",
    "swift",
    "witty",
]
_NOUNS = [
    "otter",
    "falcon",
    "lynx",
    "panda",
    "heron",
    "koala",
    "raven",
    "tiger",
    "whale",
    "zebra",
    "bison",
    "crane",
    "gecko",
    "llama",
    "moose",
]
_NAME_RNG = random.Random()  # seeded once from the OS (seeding per name cost 5% of a submit)
NOT_A_RUN = "submit a task, service or dev-environment; {type}s are applied with their own command"


class Submission(Protocol):
    """What a submission carries (the API's ``SubmitBody`` is one)."""

    config: str  # the configuration file's text (YAML)
    filename: str
    name: str | None
    run_args: list[str]
    code_sha256: str | None
    request_id: str  # idempotency key
    env: dict[str, str]
    gpu: str | None
    in_place: bool


class Runs:
    def __init__(
        self,
        state: StateMachine,
        proposer: Proposer,
        code: CodeStore,
        node_id: str,
        secrets: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.state, self.proposer, self.code, self.node_id = state, proposer, code, node_id
        # Checks that a project has the secrets a configuration names (``AccessOps.
        # check_references``); None: ``${{ secrets.X }}`` is refused (no secret store).
        self.secrets = secrets

    def get(self, name: str) -> RunRecord:
        run = self.state.runs.get(name)
        if run is None:
            raise run_not_found(name)
        return run

    async def submit(
        self, body: Submission, project: str = "main", user: str = "admin"
    ) -> tuple[RunRecord, list[str] | None]:
        """Submit a run; returns it and, when an active run was updated in place instead, what
        changed (``["priority"]``, or a service's changed fields: ``[]`` when the service was
        applied unchanged); None for a new run."""
        # Parsed, and every field checked against what this mesh's members can do (a field it
        # cannot honour is refused at its line: config/support.py), in one worker-thread call.
        caps = MeshCapabilities.from_nodes(self.state.nodes.values())
        config = await parse_run_config_async(body.config, body.filename, NOT_A_RUN, caps)
        updates: dict[str, Any] = {}
        if body.env:
            updates["env"] = {**config.env, **body.env}
        if body.gpu:
            try:
                gpu = GPUSpec.model_validate(body.gpu)
            except ValueError as e:
                raise Invalid("invalid --gpu", str(e), "invalid_gpu") from None
            updates["resources"] = config.resources.model_copy(update={"gpu": gpu})
        if updates:
            config = config.model_copy(update=updates)
        missing = [k for k, v in config.env.items() if v is None]
        if missing:
            raise Invalid(
                "environment variables without values",
                f"{', '.join(missing)}: export them where you run meshgpu apply (the CLI passes them on) "
                "or write KEY=VALUE",
                "missing_env",
            )
        names = [
            r.name
            for text in config.env.values()
            if text
            for r in references(text)
            if r.namespace == "secrets"
        ]
        names += self._check_registry_auth(config)
        if names:
            if self.secrets is None:
                raise Invalid(
                    "secrets are not available",
                    "this node has no secret store; pass the value through the environment",
                    "no_secrets",
                )
            self.secrets(project, names)
        chosen = body.name or config.name
        if chosen:
            current = self.state.runs.get(chosen)
            if current is not None and current.project != project:
                raise Conflict(
                    "run not submitted",
                    f"the run name {chosen!r} is taken (names are unique in the mesh); "
                    "choose another",
                    "name_in_use",
                )
        code = None
        if body.code_sha256:
            if not self.code.has(body.code_sha256):
                raise Invalid(
                    "unknown code archive",
                    "upload it first (POST /api/v1/code) to the node you submit to",
                    "unknown_code",
                )
            code = CodeRef(
                sha256=body.code_sha256,
                size=self.code.path(body.code_sha256).stat().st_size,
                node_id=self.node_id,
                holders=self.code.holders(body.code_sha256),
            )
        config_json = to_json(config)
        if body.in_place and chosen:
            current = self.state.runs.get(chosen)
            if (
                current is not None
                and current.spec.service is not None
                and config_json.get("type") == "service"
                and not current.status.is_finished()
                and current.termination_reason is None
            ):
                return await self._update_service(chosen, config_json, body.run_args, code)
            updated = await self._update_in_place(chosen, config_json, body.run_args)
            if updated is not None:
                return updated
        for attempt in range(5):
            name = chosen or self._generate_name()
            # A generated name can collide with a concurrent submission: pick another. The
            # request id stays tied to the client's id, so a client retry still matches.
            rid = body.request_id if attempt == 0 else f"{body.request_id}/{attempt}"
            now = time.time()
            cmd = SubmitRun(
                at=now,
                request_id=rid,
                run_id=uuid.uuid4().hex,
                run_name=name,
                project=project,
                user=user,
                config=config_json,
                run_args=body.run_args,
                code=code,
                # A scheduled run waits for its first start (dstack's ``next_triggered_at``).
                next_triggered_at=next_start(config.schedule.cron, now)
                if config.schedule
                else None,
            )
            result = await self.proposer.propose(encode(cmd), request_id=rid.encode())
            if result.code == "duplicate":  # this request was applied before: find its run
                name = self.state.requests.get(rid)
                result = (
                    Result(True, name)
                    if name is not None
                    else Result(
                        False,
                        error="this request id was already used by a submission that was "
                        "refused; submit again with a new request id",
                        code="request_id_used",
                    )
                )
            if result.ok or chosen or result.code != "name_in_use":
                break
        if not result.ok:
            kind = Conflict if result.code == "name_in_use" else Invalid
            raise kind("run not submitted", result.error or "", result.code or "")
        return self.state.runs[result.value], None

    @staticmethod
    def _check_registry_auth(config: Any) -> list[str]:
        """``registry_auth`` references: the secrets it names (resolved on the job's host at
        start); ``env.*`` are refused (dstack resolves them in its CLI; meshgpu's sends the
        file as written), rather than pulling with the reference's text as a password."""
        auth = config.registry_auth
        if auth is None:
            return []
        names: list[str] = []
        for field in ("username", "password"):
            refs = references(getattr(auth, field))
            names += [r.name for r in refs if r.namespace == "secrets"]
            refs = [r for r in refs if r.namespace != "secrets"]
            if refs:
                raise Invalid(
                    "references in registry_auth are not resolved",
                    f"registry_auth.{field}: ${{{{ {refs[0]} }}}} would be sent as written; "
                    "write the value",
                    "unresolved_reference",
                )
        return names

    async def _update_service(
        self, name: str, config: dict[str, Any], run_args: list[str], code: CodeRef | None
    ) -> tuple[RunRecord, list[str]]:
        """An active service applied again: updated in place (``UpdateService``): new replica
        ranges, scaling or priority apply at once; any other change (a new code archive
        included) rolls out as a new deployment, replica by replica."""
        cmd = UpdateService(
            at=time.time(), run_name=name, config=config, run_args=run_args, code=code
        )
        result = await self.proposer.propose(encode(cmd))
        if not result.ok:
            kind = NotFound if result.code == "not_found" else Conflict
            raise kind("service not updated", result.error or "", result.code or "")
        return self.state.runs[name], list(result.value["changed"])

    async def _update_in_place(
        self, name: str, config: dict[str, Any], run_args: list[str]
    ) -> tuple[RunRecord, list[str]] | None:
        """dstack's in-place update: an active run whose configuration differs from ``config``
        only in ``priority`` (any run) or ``inactivity_duration`` (a dev environment) takes the
        new values rather than a new submission; returns it and what changed. None when the
        run is not such a run (a name in use is then refused as ever). The working directory is
        not compared: the configuration file usually lives in it."""
        run = self.state.runs.get(name)
        if run is None or run.status.is_finished() or run.termination_reason is not None:
            return None
        fields = (
            ("priority", "inactivity_duration")
            if run.spec.type == "dev-environment"
            else ("priority",)
        )
        current = run.config
        if run.run_args != run_args or {k: v for k, v in config.items() if k not in fields} != {
            k: v for k, v in current.items() if k not in fields
        }:
            return None
        changed = [f for f in fields if config.get(f) != current.get(f)]
        if not changed:
            return None
        if "inactivity_duration" in changed:
            cmd = SetInactivityDuration(
                at=time.time(), run_name=name, inactivity_duration=config.get("inactivity_duration")
            )
            result = await self.proposer.propose(encode(cmd))
            if not result.ok:
                kind = NotFound if result.code == "not_found" else Conflict
                raise kind("inactivity_duration not changed", result.error or "", result.code or "")
        if "priority" in changed:
            await self.set_priority(name, int(config.get("priority") or 0))
        return self.state.runs[name], changed

    def _generate_name(self) -> str:
        rng = _NAME_RNG
        for _ in range(100):
            name = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randint(1, 9999)}"
            if name not in self.state.runs:
                return name
        return f"run-{uuid.uuid4().hex[:8]}"

    async def stop(self, name: str, abort: bool, by: str = "") -> RunRecord:
        self.get(name)
        cmd = StopRun(at=time.time(), run_name=name, abort=abort, by=by)
        await self.proposer.propose(encode(cmd))
        return self.state.runs[name]

    async def set_priority(self, name: str, priority: int) -> RunRecord:
        self.get(name)
        cmd = SetRunPriority(at=time.time(), run_name=name, priority=priority)
        result = await self.proposer.propose(encode(cmd))
        if not result.ok:
            kind = NotFound if result.code == "not_found" else Conflict
            raise kind("priority not changed", result.error or "", result.code or "")
        return self.state.runs[name]
