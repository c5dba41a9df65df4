"""``meshgpu apply|submit|ps|logs|stop``."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgpu.cli._common import JsonOpt, UrlOpt, ago, client, err, fail, out, table
from meshgpu.cli._devenv import activity_text, attach_hook, connect_lines, wait_running
from meshgpu.client import APIError, Client, CodeTooLarge
from meshgpu.client.upload import UploadRefused, code_root, run_archive
from meshgpu.config import ConfigError
from meshgpu.config.loader import load_config_located
from meshgpu.config.render import plan_lines
from meshgpu.config.runs import BaseRunConfiguration
from meshgpu.config.support import check_config

FINISHED = {"done", "failed", "terminated"}


def _load(path: Path, fleets: bool = False) -> tuple[Any, str]:
    try:
        config, positions = load_config_located(path)
        # What no mesh can honour is refused here, before the code is archived and uploaded;
        # what depends on this mesh's members is checked by the node at submit.
        refused = check_config(config, positions, None)
        if refused:
            raise ConfigError(refused)
    except ConfigError as e:
        err.print(str(e), markup=False)
        raise typer.Exit(1) from None
    if fleets and config.type == "fleet":
        return config, path.read_text()
    if not isinstance(config, BaseRunConfiguration):
        raise fail(
            f"{path} is a {config.type} configuration; apply runs (task, service, dev-environment) here"
        )
    return config, path.read_text()


def _env_values(config: BaseRunConfiguration, pairs: list[str]) -> dict[str, str]:
    """Fill ``KEY`` sentinels from this shell's environment; ``-e K=V`` overrides."""
    values: dict[str, str] = {}
    missing = []
    for key, value in config.env.items():
        if value is None:
            if key in os.environ:
                values[key] = os.environ[key]
            else:
                missing.append(key)
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            if key not in os.environ:
                raise fail(f"-e {key}: not set in your environment; use -e {key}=VALUE")
            value = os.environ[key]
        values[key] = value
        if key in missing:
            missing.remove(key)
    if missing:
        raise fail(
            f"{', '.join(missing)} must be set in your environment (the configuration lists them without values)"
        )
    return values


def _submit(
    c: Client,
    config: BaseRunConfiguration,
    text: str,
    path: Path,
    name: str | None,
    env: list[str],
    gpu: str | None,
    args: list[str],
    code_dir: Path,
) -> dict[str, Any]:
    # A service's configuration file stays out of its code archive: editing only replicas or
    # scaling in it then changes no code, and the update applies without a redeploy.
    exclude = []
    try:
        # The repo (``repos``; the current directory without one) and the ``files`` mappings.
        root = code_root(config, path, code_dir)
        if getattr(config, "type", None) == "service" and root is not None:
            try:
                exclude.append(path.resolve().relative_to(root.resolve()).as_posix())
            except ValueError:
                pass  # the file lives outside the directory: not in the archive anyway
        upload = run_archive(config, path, code_dir, exclude=exclude)
    except (CodeTooLarge, UploadRefused) as e:
        raise fail(str(e)) from None
    sha = None
    if upload is not None:
        data, sha = upload
        c.upload_code(data, sha)
    body_env = _env_values(config, env)
    rid = uuid.uuid4().hex
    for attempt in range(3):  # the same request id: a retry never submits twice
        try:
            return c._request(  # noqa: SLF001 - one call site needs the extra fields
                "POST",
                "/api/v1/runs",
                json={
                    "config": text,
                    "filename": str(path),
                    "name": name,
                    "run_args": args,
                    "code_sha256": sha,
                    "request_id": rid,
                    "env": body_env,
                    "gpu": gpu,
                    "in_place": True,  # an active run differing only in priority is updated
                },
            ).json()
        except APIError as e:
            if e.status != 0 or attempt == 2:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def service_lines(run: dict[str, Any], base_url: str) -> list[str]:
    """Where a service answers: its path on the node the CLI talks to (any node serves it), its
    host-routed URL, and the OpenAI-compatible base URL of its model."""
    svc = run.get("service")
    if not svc:
        return []
    base = base_url.rstrip("/")
    lines = [f"service URL: {base}{svc['path']}"]
    if svc.get("url"):
        lines.append(f"service URL (host routing): {svc['url']}")
    if svc.get("model_base_path"):
        lines.append(f"model {svc['model']}: OpenAI base URL {base}{svc['model_base_path']}")
    if svc.get("auth"):
        lines.append("send the API token as Authorization: Bearer <token> (auth: true)")
    return lines


def _probe_marks(probes: list[str]) -> str:
    marks = {"failing": "×", "probing": "~", "ready": "✓"}
    return "".join(marks.get(p, "?") for p in probes)


def _run_exit_code(run: dict[str, Any]) -> int:
    if run["status"] == "done":
        return 0
    codes = [j["exit_code"] for j in run["jobs"] if j.get("exit_code")]
    return codes[0] if codes and 0 < codes[0] < 256 else 1


def apply(
    file: Annotated[Path, typer.Option("-f", "--file", help="Configuration file")] = Path(
        ".dstack.yml"
    ),
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Do not ask for confirmation")] = False,
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Submit and exit")] = False,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Run name")] = None,
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE (repeatable)")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="Override resources.gpu, e.g. H100:2")
    ] = None,
    args: Annotated[list[str] | None, typer.Argument(help="After --: ${{ run.args }}")] = None,
    url: UrlOpt = None,
) -> None:
    """Plan, confirm, run, stream the output; exit with the run's status. An SSH fleet
    (type: fleet with ssh_config) is recorded and its hosts brought in."""
    config, text = _load(file, fleets=True)
    if config.type == "fleet":
        from meshgpu.cli._fleets import apply_fleet

        apply_fleet(config, text, file, url, wait=not detach)
        return
    table(["", ""], [[k, v] for k, v in plan_lines(config)], title=f"Plan for {file}")
    if not yes and not typer.confirm("Submit the run?", default=True):
        raise typer.Exit(1)
    with client(url) as c:
        run = _submit(c, config, text, file, name, env or [], gpu, args or [], Path.cwd())
        updated = run.get("updated_in_place")
        if updated is not None and run.get("type") == "service":
            deployment = (run.get("service") or {}).get("deployment_num", 0)
            out.print(
                f"service [bold]{run['name']}[/] is active: updated in place "
                f"(changed: {', '.join(updated) or 'nothing'}; deployment {deployment})"
            )
        elif updated == ["priority"]:
            out.print(
                f"run [bold]{run['name']}[/] is active and differs only in priority: "
                f"updated it in place to priority {run['priority']}"
            )
        elif updated:
            out.print(
                f"run [bold]{run['name']}[/] is active: updated in place "
                f"(changed: {', '.join(updated)})"
            )
        else:
            out.print(f"submitted [bold]{run['name']}[/]")
        for line in service_lines(run, c.url):
            out.print(line)
        if run.get("schedule") and run.get("status") == "pending":
            # It starts at each cron time and waits again after each: nothing to follow now.
            out.print(
                f"{run['name']} is scheduled ({'; '.join(run['schedule'])}, UTC, day of week "
                f"0 = Monday): {next_start_text(run.get('next_triggered_at'))}; "
                f"meshgpu ps / meshgpu logs {run['name']} once it has started"
            )
            return
        if detach:
            return
        if run.get("type") == "dev-environment":
            code = _attach_dev_environment(c, run["name"])
        else:
            code = _attach(c, run["name"])
    raise typer.Exit(code)


def _attach_dev_environment(c: Client, name: str) -> int:
    """dstack's ``apply`` of a dev environment: wait until it runs, print how to open it (the
    IDE link, ``ssh RUN``), then attach (``meshgpu attach``: SSH config, port forwards, logs)
    -- or, in a build without it, follow its output as for any run."""
    try:
        run = wait_running(c, name, err.print)
    except KeyboardInterrupt:
        err.print(f"\ndetached; {name} keeps starting (meshgpu ps)")
        return 130
    except APIError as e:
        raise fail(str(e)) from None
    if (run.get("jobs") or [{}])[0].get("status") == "running":
        for line in connect_lines(run):
            out.print(line, markup=False)
        attach = attach_hook()
        if attach is not None:
            return attach(c, name)
        err.print(f"(run meshgpu attach {name} in another shell to write the SSH host entry)")
    return _attach(c, name)


def _attach(c: Client, name: str) -> int:
    interrupted = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted += 1
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        try:
            last = None
            streamed = None  # the submission of job 0 whose output was shown
            while True:
                run = c.run(name)
                first = run["jobs"][0] if run["jobs"] else {}
                if run["status"] in FINISHED and first.get("job_id") == streamed:
                    break
                if run["status"] in FINISHED or run["status"] == "running":
                    # Its output, and again after each resubmission (retry) until it ends.
                    if streamed is not None:
                        sub = first.get("submission_num")
                        err.print(f"{name}: retrying (submission {sub})")
                    streamed = first.get("job_id")
                    for chunk in c.logs(name, follow=True):
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                    while True:  # until it ends or is resubmitted
                        run = c.run(name)
                        if run["status"] in FINISHED or run["jobs"][0]["job_id"] != streamed:
                            break
                        time.sleep(0.1)
                    continue
                why = first.get("why_pending") or ""
                status = run.get("status_message") or run["status"]
                if (status, why) != last:
                    err.print(f"{name}: {status}" + (f" ({why})" if why else ""))
                    last = (status, why)
                time.sleep(0.2)
            reason = f" ({run['termination_reason']})" if run["termination_reason"] else ""
            err.print(f"{name}: {run['status']}{reason}")
            return _run_exit_code(run)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL if interrupted > 1 else on_sigint)
            try:
                stop = typer.confirm(f"\nStop the run {name} before detaching?", default=True)
            except (KeyboardInterrupt, typer.Abort):
                c.stop(name, abort=True)
                err.print(f"{name}: aborted")
                return 130
            if stop:
                c.stop(name)
                err.print(f"{name}: stopping")
            else:
                err.print(f"detached; {name} keeps running (meshgpu logs -f {name})")
            return 130
    except APIError as e:
        raise fail(str(e)) from None
    finally:
        signal.signal(signal.SIGINT, old)


def submit(
    file: Annotated[Path, typer.Option("-f", "--file", help="Configuration file")] = Path(
        ".dstack.yml"
    ),
    name: Annotated[str | None, typer.Option("--name", "-n", help="Run name")] = None,
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE (repeatable)")
    ] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Override resources.gpu")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="After --: ${{ run.args }}")] = None,
    url: UrlOpt = None,
) -> None:
    """Submit without asking or attaching; prints the run name."""
    config, text = _load(file)
    with client(url) as c:
        run = _submit(c, config, text, file, name, env or [], gpu, args or [], Path.cwd())
    if run.get("updated_in_place"):
        err.print(f"{run['name']}: active; updated in place to priority {run['priority']}")
    print(run["name"])


PS_DEFAULT = 100  # active runs ps shows without -n/-a (dstack: one page of 100)


def _ps_runs(c: Client, all: bool, last: int | None) -> tuple[list[dict[str, Any]], bool]:
    """What ``ps`` lists (newest first), and whether there is more than it shows. As dstack:
    the active runs (the last ``PS_DEFAULT``), or the last finished one when none is active;
    ``-n N``: the last N runs, finished or not; ``-a``: every run (page after page)."""
    if last is not None:
        return c.runs(all=True, limit=last), False
    if all:
        return c.runs(all=True), False
    page = c.runs_page(all=False, limit=PS_DEFAULT)
    if page["runs"]:
        return page["runs"], bool(page["next_cursor"])
    return c.runs_page(all=True, limit=1)["runs"], False


def next_start_text(at: float | None) -> str:
    """A waiting scheduled run's next start, as ``ps`` shows it (cron times are UTC)."""
    if at is None:
        return "waiting for its schedule"
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    secs = max(0, int(at - time.time()))
    left = f"{secs // 60}m" if secs < 3600 else f"{secs // 3600}h{secs % 3600 // 60:02d}m"
    if secs >= 86400:
        left = f"{secs // 86400}d{secs % 86400 // 3600}h"
    return f"next start {when:%Y-%m-%d %H:%M} UTC (in {left})"


def ps(
    all: Annotated[
        bool, typer.Option("-a", "--all", help="Every run, finished ones too (all pages)")
    ] = False,
    last: Annotated[
        int | None,
        typer.Option("-n", "--last", min=1, help="The last N runs, finished or not"),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Jobs, placement, why pending")
    ] = False,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Refresh every 2 s")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
) -> None:
    """Runs and their jobs, newest first: the active ones (or the last finished one if none is
    active); -n N for the last N runs, -a for every run."""
    with client(url) as c:
        while True:
            runs, more = _ps_runs(c, all, last)
            if as_json:
                json.dump(runs, sys.stdout, indent=2)
                sys.stdout.write("\n")
                return
            rows = []
            for r in runs:
                first = r["jobs"][0] if r["jobs"] else {}
                gpus = ",".join(str(g) for g in first.get("gpus", []))
                where = f"{first.get('node') or '-'}" + (f" gpu {gpus}" if gpus else "")
                problem = r["termination_reason"] or first.get("why_pending") or ""
                if r.get("schedule") and r["status"] == "pending":
                    problem = next_start_text(r.get("next_triggered_at"))
                status = r.get("status_message") or r["status"]
                svc = r.get("service")
                if svc and not problem:
                    rps = f", {svc['rps']:.1f} req/s" if svc.get("rps") is not None else ""
                    problem = f"{svc['ready_replicas']}/{svc['replicas']} replicas ready{rps}"
                rows.append([r["name"], r["type"], where, status, ago(r["submitted_at"]), problem])
                if verbose:
                    for j in r["jobs"]:
                        jg = ",".join(str(g) for g in j["gpus"])
                        sub = j.get("submission_num") or 0
                        label = f"  job {j['job_num']}"
                        if svc:
                            label = f"  replica {j['replica_num']}"
                            if j.get("status") == "running":
                                ready = "ready" if j.get("ready") else "not ready"
                                marks = _probe_marks(j.get("probes") or [])
                                j = {**j, "status": f"running, {ready} {marks}".rstrip()}
                        rows.append(
                            [
                                label + (f" (submission {sub})" if sub else ""),
                                j["group"] or "",
                                f"{j['node'] or '-'} {jg}",
                                j["status"],
                                "",
                                j["why_pending"]
                                or j["termination_reason"]
                                or (f"exit {j['exit_code']}" if j["exit_code"] is not None else "")
                                or activity_text(j, r),
                            ]
                        )
                        where_ = sandbox_text(j)
                        if where_:
                            rows.append(["", "", "", "", "", where_])
            table(["NAME", "TYPE", "NODE/GPUS", "STATUS", "SUBMITTED", "REASON"], rows)
            if more:
                err.print(f"the last {len(runs)} shown; -n N or -a for more")
            if not watch:
                return
            time.sleep(2)
            if out.is_terminal:
                out.clear()


def logs(
    run: Annotated[str, typer.Argument(help="Run name")],
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep streaming until the job ends")
    ] = False,
    job: Annotated[int, typer.Option("--job", help="Job number (multi-node runs)")] = 0,
    url: UrlOpt = None,
) -> None:
    """A job's output."""
    with client(url) as c:
        try:
            for chunk in c.logs(run, job=job, follow=follow):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def stop(
    run: Annotated[str, typer.Argument(help="Run name")],
    abort: Annotated[
        bool, typer.Option("-x", "--abort", help="Kill at once, no graceful stop")
    ] = False,
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Do not ask for confirmation")] = False,
    url: UrlOpt = None,
) -> None:
    """Stop a run (SIGTERM, then SIGKILL after stop_duration), or abort it (-x)."""
    if not yes and not typer.confirm(
        f"{'Abort' if abort else 'Stop'} the run {run}?", default=True
    ):
        raise typer.Exit(1)
    with client(url) as c:
        r = c.stop(run, abort=abort)
    out.print(f"{r['name']}: {r['status']}")


def sandbox_text(job: dict) -> str:
    """``ps -v``'s line on where a job runs on its host: its OS user, cgroup limits and
    working directory (whichever its host reported)."""
    parts = []
    if job.get("user"):
        parts.append(f"user {job['user']}")
    if job.get("limits"):
        parts.append(job["limits"])
    if job.get("working_dir"):
        parts.append(f"in {job['working_dir']}")
    return "; ".join(parts)
