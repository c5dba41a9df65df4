"""Top-level ``meshgpu`` command; each command group lives in its own module."""

from __future__ import annotations

import typer

from meshgpu.cli import _agent, _attach, _cluster, _config, _fleets, _metrics, _offer, _runs

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


def main() -> None:
    app()
