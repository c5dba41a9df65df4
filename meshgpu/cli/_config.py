"""``meshgpu config validate|schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshgpu.config import ConfigError
from meshgpu.config.loader import load_config_located
from meshgpu.config.render import plan_lines, to_json
from meshgpu.config.schema import json_schema
from meshgpu.config.support import check_config

app = typer.Typer(help="Check configurations and print their JSON Schema.", no_args_is_help=True)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Configuration files (.dstack.yml)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON")] = False,
) -> None:
    """Parse configurations; print each normalized, or every problem found (exit status 1).

    A field that no mesh can honour is a problem at its line too; whether this mesh can run the
    rest (an image needs a member with docker or podman) is checked at ``apply``."""
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    results: list[dict[str, object]] = []
    failed = False
    for path in files:
        try:
            config, positions = load_config_located(path)
            refused = check_config(config, positions, None)
            if refused:
                raise ConfigError(refused)
        except ConfigError as e:
            failed = True
            results.append(
                {"file": str(path), "valid": False, "issues": [i.to_dict() for i in e.issues]}
            )
            if not as_json:
                err.print(f"[bold red]✗ {path}[/]: {len(e.issues)} problem(s)", highlight=False)
                for issue in e.issues:
                    err.print(f"  {issue}", markup=False, highlight=False)
            continue
        results.append({"file": str(path), "valid": True, "config": to_json(config)})
        if not as_json:
            table = Table(title=f"✓ {path}", title_justify="left", show_header=False, box=None)
            table.add_column(style="bold")
            table.add_column()
            for label, value in plan_lines(config):
                table.add_row(label, value)
            out.print(table)
    if as_json:
        json.dump(results if len(results) != 1 else results[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    raise typer.Exit(1 if failed else 0)


@app.command()
def schema() -> None:
    """Print the JSON Schema of every configuration type (point your editor at it)."""
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
