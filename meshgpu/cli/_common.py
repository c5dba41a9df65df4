"""Shared CLI plumbing: the client from flags/profile, output that suits a terminal or a pipe,
and user errors shown without a traceback."""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshgpu.client import APIError, Client, load_profile

UrlOpt = Annotated[str | None, typer.Option("--url", help="Any node's API URL (or MESHGPU_URL)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]

# No emoji codes: a user's text such as gpu=H100:x:y must print as written, not as an emoji.
out = Console(soft_wrap=True, highlight=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    # Messages quote what users wrote (fleets: [prod]): never read them as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    return typer.Exit(code)


def positive_duration(option: str, text: str, example: str) -> int:
    """Seconds of a duration option (``12h``, ``7d``), or a clear error naming ``option``."""
    from meshgpu.config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise fail(f"{option}: {e} (write e.g. {example})") from None
    if not isinstance(seconds, int) or seconds <= 0:
        raise fail(f"{option} must be a positive duration such as {example}, not {text!r}")
    return seconds


@contextlib.contextmanager
def client(url: str | None) -> Iterator[Client]:
    try:
        with Client(load_profile(url)) as c:
            yield c
    except APIError as e:
        raise fail(str(e)) from None


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """A rich table on a terminal; tab-free aligned plain text when piped."""
    if out.is_terminal:
        t = Table(title=title, title_justify="left", box=None, header_style="bold")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        out.print(t)
        return
    cells = [columns] + [[str(x) for x in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        sys.stdout.write(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0, int(dt.datetime.now().timestamp() - ts))
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    if secs < 86400:
        return f"{secs // 3600}h ago"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
