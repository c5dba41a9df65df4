"""Top-level ``meshgpu`` command; each command group lives in its own module."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from meshgpu.cli import (
    _access,
    _agent,
    _attach,
    _cluster,
    _config,
    _fleets,
    _metrics,
    _offer,
    _runs,
)

app = typer.Typer(
    name="meshgpu",
    help="meshgpu: a peer-to-peer GPU orchestrator that reads dstack configurations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(_config.app, name="config")
app.add_typer(_cluster.token_app, name="token")
app.add_typer(_fleets.app, name="fleet")
app.add_typer(_fleets.backend_app, name="backend")
app.add_typer(_access.user_app, name="user")
app.add_typer(_access.project_app, name="project")
app.add_typer(_access.secret_app, name="secret")
app.command()(_access.audit)
app.command()(_agent.agent)
app.command(context_settings={"allow_interspersed_args": False})(_runs.apply)
app.command(context_settings={"allow_interspersed_args": False})(_runs.submit)
app.command()(_runs.ps)
app.command()(_runs.logs)
app.command()(_runs.stop)
app.command()(_attach.attach)
app.command("ssh-proxy")(_attach.ssh_proxy)
app.command()(_cluster.nodes)
app.command()(_cluster.status)
app.command()(_offer.offer)
app.command()(_metrics.metrics)


@app.command()
def version() -> None:
    """The version of meshgpu (a host that runs another one cannot join the mesh)."""
    import meshgpu

    print(meshgpu.__version__)


@app.callback()
def _options(
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            help="The project commands act in (or MESHGPU_PROJECT; the profile's project = ...)",
        ),
    ] = None,
) -> None:
    if project:
        os.environ["MESHGPU_PROJECT"] = project


def main() -> None:
    app()
