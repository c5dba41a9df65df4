"""``schedule: {cron: ...}`` read as dstack reads it (APScheduler's crontab): UTC, day-of-week
0 = Monday, names, the day of month and of week both required; computed with croniter after the
day-of-week field is translated to its 0 = Sunday."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from meshgpu.config import ConfigError, parse_config
from meshgpu.config.cron import CronError, check, dow_days, next_start, to_croniter, translate_dow
from meshgpu.config.render import to_json
from meshgpu.config.spec import compile_run


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


WEDNESDAY = ts(2024, 1, 3, 12, 0)  # 2024-01-03 is a Wednesday


@pytest.mark.parametrize(
    ("field", "croniter_field"),
    [
        ("*", "*"),
        ("0", "1"),  # Monday
        ("6", "0"),  # Sunday
        ("mon", "1"),
        ("SUN", "0"),
        ("mon-fri", "1,2,3,4,5"),
        ("0-4", "1,2,3,4,5"),
        ("5-6", "0,6"),  # the weekend: Saturday and Sunday
        ("sat,sun", "0,6"),
        ("*/2", "0,1,3,5"),  # Mon, Wed, Fri, Sun
        ("1/3", "2,5"),  # Tue and Fri (from Tuesday, every third day)
        ("0-4/2", "1,3,5"),  # Mon, Wed, Fri
        ("sat,1/3", "2,5,6"),
    ],
)
def test_the_day_of_week_field_is_translated_to_croniters(field: str, croniter_field: str) -> None:
    assert translate_dow(field) == croniter_field


def test_day_0_is_a_monday_and_6_a_sunday() -> None:
    monday = when(next_start(["0 9 * * 0"], WEDNESDAY))
    assert monday == datetime(2024, 1, 8, 9, 0, tzinfo=UTC)
    assert monday.strftime("%A") == "Monday"
    assert when(next_start(["0 9 * * 6"], WEDNESDAY)).strftime("%A") == "Sunday"
    assert when(next_start(["0 9 * * sun"], WEDNESDAY)).strftime("%A") == "Sunday"
    assert dow_days("mon-fri") == frozenset(range(5))


def test_weekdays_from_a_friday_evening_go_to_monday_morning() -> None:
    friday_evening = ts(2024, 1, 5, 20, 0)
    assert when(next_start(["0 8 * * mon-fri"], friday_evening)) == datetime(
        2024, 1, 8, 8, 0, tzinfo=UTC
    )


def test_the_earliest_of_several_expressions_and_strictly_after() -> None:
    at = next_start(["0 8 * * mon-fri", "15 23 * * *"], WEDNESDAY)
    assert when(at) == datetime(2024, 1, 3, 23, 15, tzinfo=UTC)
    # Strictly after: a run that finished at its trigger time does not start again at once.
    assert next_start(["15 23 * * *"], at) == at + 86400


def test_day_of_month_and_day_of_week_must_both_match_as_in_dstack() -> None:
    # POSIX cron would fire on every Friday and every 13th; dstack (APScheduler) on Friday 13th.
    assert when(next_start(["0 0 13 * fri"], WEDNESDAY)) == datetime(2024, 9, 13, tzinfo=UTC)


def test_month_names_and_every_minute() -> None:
    assert when(next_start(["0 0 1 jul,dec *"], WEDNESDAY)) == datetime(2024, 7, 1, tzinfo=UTC)
    assert next_start(["* * * * *"], WEDNESDAY + 1) == WEDNESDAY + 60
    assert to_croniter("30 7 * JAN-MAR 0") == "30 7 * JAN-MAR 1"


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("0 9 * * 7", "0 = Monday to 6 = Sunday"),
        ("0 9 * * fri-mon", "runs backwards"),
        ("0 9 * * funday", "unknown day of week 'funday'"),
        ("0 9 * * L", "unknown day of week"),
        ("0 9 * *", "5 fields"),
        ("0 0 9 * * *", "5 fields"),
        ("61 * * * *", "out of range"),
        ("0 0 * foo *", "invalid cron expression"),
    ],
)
def test_what_dstack_cannot_read_is_refused_saying_what_to_write(expr: str, fragment: str) -> None:
    with pytest.raises(CronError, match=fragment):
        check(expr)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "f.yml")
    return [str(i) for i in info.value.issues]


def test_a_bad_expression_is_located_in_the_file() -> None:
    [out] = problems(
        """\
        type: task
        commands: [a]
        schedule:
          cron: ["0 8 * * mon-fri", "0 9 * * 7"]
        """
    )
    assert out.startswith("f.yml:4:") and "schedule.cron" in out and "0 = Monday" in out


def test_a_scheduled_service_cannot_scale_to_zero() -> None:
    [out] = problems(
        """\
        type: service
        commands: [serve]
        port: 8000
        replicas: 0..2
        scaling: {metric: rps, target: 10}
        schedule:
          cron: "0 8 * * *"
        """
    )
    assert out.startswith("f.yml:6:1: schedule:") and "cannot scale to zero" in out
    # from one replica up it may
    parse_config(
        "type: service\ncommands: [s]\nport: 80\nreplicas: 1..2\n"
        "scaling: {metric: rps, target: 10}\nschedule: {cron: '0 8 * * *'}\n"
    )


def test_the_spec_carries_the_expressions_and_the_registry_credentials() -> None:
    config = parse_config(
        "type: task\nimage: ghcr.io/me/x\ncommands: [a]\nschedule: {cron: '0 8 * * mon-fri'}\n"
        "registry_auth: {username: me, password: tok}\n"
    )
    spec = compile_run(to_json(config))
    assert spec.schedule == ("0 8 * * mon-fri",)
    assert spec.registry_auth == ("me", "tok")
    plain = compile_run(to_json(parse_config("type: task\ncommands: [a]\n")))
    assert plain.schedule == () and plain.registry_auth is None
