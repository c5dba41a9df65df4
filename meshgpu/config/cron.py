"""dstack's ``schedule: {cron: ...}`` (reference/dstack-semantics.md §1.2): when a scheduled run
starts next.

dstack reads each expression with APScheduler's ``CronTrigger.from_crontab``: UTC, five POSIX
fields (minute hour day month day-of-week), month names ``jan``..``dec``, and -- unlike POSIX
cron -- **day-of-week 0 = Monday** … 6 = Sunday (names ``mon``..``sun``), with the day of month
and the day of week both required to match when both are given (POSIX cron takes either).
meshgpu computes the times with ``croniter``, whose day-of-week counts from Sunday, so the
day-of-week field is translated first (``translate_dow``: every number, name, range, list and
step to the list of croniter days it means) and croniter runs with ``day_or=False``.

Pure functions: the leader's schedule controller (``meshgpu/control/schedules.py``) and the
submitting node compute a time with them and carry it in a Raft command; the state machine never
calls them (its members could run different croniter versions)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache

from croniter import croniter

# dstack's numbering: the position in this tuple is the day's number.
DOW_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PART = re.compile(r"^(?P<base>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>\d+))?$")
EXAMPLE = "e.g. '0 8 * * mon-fri' (8:00 UTC, Monday to Friday)"


class CronError(ValueError):
    """An expression meshgpu (like dstack) cannot read; the message says what to write."""


def _day(token: str, expr: str) -> int:
    if token.isdigit():
        n = int(token)
        if n > 6:
            raise CronError(
                f"day of week {n} in {expr!r}: days count 0 = Monday to 6 = Sunday (as in dstack);"
                " or write mon..sun"
            )
        return n
    if token in DOW_NAMES:
        return DOW_NAMES.index(token)
    raise CronError(f"unknown day of week {token!r} in {expr!r}: use 0-6 (0 = Monday) or mon..sun")


def dow_days(field: str, expr: str = "") -> frozenset[int]:
    """The days (dstack's numbers, 0 = Monday) a day-of-week field means."""
    expr = expr or field
    days: set[int] = set()
    for part in field.lower().split(","):
        m = _PART.match(part)
        if m is None:
            raise CronError(
                f"cannot read day of week {part!r} in {expr!r}: use numbers 0-6 (0 = Monday), "
                "names mon..sun, ranges (mon-fri), lists (mon,wed) and steps (*/2)"
            )
        base, step = m.group("base"), m.group("step")
        if base == "*":
            low, high = 0, 6
        elif "-" in base:
            first, last = base.split("-")
            low, high = _day(first, expr), _day(last, expr)
            if low > high:
                raise CronError(
                    f"day-of-week range {base!r} in {expr!r} runs backwards (0 = Monday … "
                    "6 = Sunday): split it, e.g. 'sat,sun,mon' or '5-6,0'"
                )
        else:
            low = _day(base, expr)
            high = 6 if step else low  # ``n/step``: from n to the end of the week
        if step is not None and int(step) < 1:
            raise CronError(f"step 0 in {expr!r}: a step is 1 or more")
        days.update(range(low, high + 1, int(step or 1)))
    return frozenset(days)


def translate_dow(field: str, expr: str = "") -> str:
    """dstack's day-of-week field as croniter's (0 = Sunday): ``"0"`` (Monday) -> ``"1"``,
    ``"sun"`` -> ``"0"``, ``"mon-fri"`` -> ``"1,2,3,4,5"``, ``"*"`` stays ``"*"``."""
    if field == "*":
        return "*"
    return ",".join(str(c) for c in sorted((d + 1) % 7 for d in dow_days(field, expr)))


@lru_cache(maxsize=1024)
def to_croniter(expr: str) -> str:
    """The croniter expression for a dstack cron expression (checked: raises ``CronError``)."""
    fields = expr.split()
    if len(fields) != 5:
        raise CronError(
            f"invalid cron expression {expr!r}: use 5 fields (minute hour day month weekday), "
            + EXAMPLE
        )
    out = " ".join([*fields[:4], translate_dow(fields[4], expr)])
    try:
        croniter(out, datetime(2000, 1, 1, tzinfo=UTC), day_or=False)
    except (ValueError, KeyError) as e:  # croniter's errors are ValueErrors (and a KeyError)
        raise CronError(f"invalid cron expression {expr!r}: {e}; {EXAMPLE}") from None
    return out


def check(expr: str) -> None:
    """Raise ``CronError`` (a ``ValueError``) if ``expr`` is not a cron expression dstack reads."""
    to_croniter(expr)


def next_start(crons: Sequence[str], after: float) -> float:
    """The first time (epoch seconds, strictly after ``after``) any of ``crons`` fires."""
    if not crons:
        raise CronError("no cron expression")
    base = datetime.fromtimestamp(after, UTC)
    return min(float(croniter(to_croniter(c), base, day_or=False).get_next(float)) for c in crons)
