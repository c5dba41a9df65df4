"""One command base, one codec and one registry for every entry of the Raft log.

Every state change is a ``Command``: a frozen pydantic model with a ``kind`` (its name on the
wire) and the proposer's ``at``, belonging to one *domain* of the replicated state (``jobs``:
nodes, runs and jobs in ``machine.py``; ``cluster``: identity, admission, members in
``cluster.py``). A subclass registers itself by being defined; ``decode`` reads any registered
command, ``encode`` writes one.

The wire form is the one every existing data dir's ``raft.db`` already holds, so old entries
decode unchanged: the command's JSON, prefixed by its domain's tag byte -- none for ``jobs``
(whose JSON starts with ``{``), ``C`` for ``cluster``. A new domain takes a new tag byte that is
not ``{``; a new command is a new ``kind`` (unknown kinds decode to an error that the applier
records as a refused entry, so a newer peer's command never stops an older applier).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# domain -> the byte(s) its entries start with. ``jobs`` has none: its entries predate domains.
DOMAIN_TAGS: dict[str, bytes] = {"jobs": b"", "cluster": b"C"}
_BY_TAG = {tag: domain for domain, tag in DOMAIN_TAGS.items() if tag}

REGISTRY: dict[str, type[Command]] = {}  # kind -> command class, every domain
_ADAPTERS: dict[str, TypeAdapter[Any]] = {}  # domain -> decoder of its commands (built lazily)


class UndecodableCommand(ValueError):
    """An entry this build cannot read (a newer peer's command, or a corrupted one)."""


class Command(BaseModel):
    """Base of every replicated command. Time enters through ``at`` (set by the proposer) and
    is never read inside ``apply``, so every member computes the same state."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    domain: ClassVar[str] = "jobs"
    at: float = Field(description="Proposer's wall clock, seconds since the epoch")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        if field is None or not isinstance(field.default, str):
            return  # an intermediate base (a domain's), not a command
        register(cls)


def register(cls: type[Command]) -> type[Command]:
    """Add a command class to the registry (done by defining a ``Command`` subclass)."""
    kind = cls.model_fields["kind"].default
    if cls.domain not in DOMAIN_TAGS:
        raise TypeError(f"{cls.__name__}: unknown domain {cls.domain!r}")
    other = REGISTRY.get(kind)
    if other is not None and other is not cls:
        raise TypeError(f"command kind {kind!r} is taken by {other.__name__}")
    REGISTRY[kind] = cls
    _ADAPTERS.pop(cls.domain, None)
    return cls


def commands_of(domain: str) -> list[type[Command]]:
    return [c for c in REGISTRY.values() if c.domain == domain]


def _adapter(domain: str) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(domain)
    if adapter is None:
        members = tuple(commands_of(domain))
        if not members:
            raise UndecodableCommand(f"no commands in domain {domain!r}")
        union: Any = Union[members] if len(members) > 1 else members[0]  # noqa: UP007
        if len(members) > 1:
            union = Annotated[union, Field(discriminator="kind")]
        adapter = _ADAPTERS[domain] = TypeAdapter(union)
    return adapter


def encode(cmd: Command) -> bytes:
    """The log entry for a command."""
    return DOMAIN_TAGS[cmd.domain] + cmd.model_dump_json().encode()


def decode(data: bytes) -> Any:
    """The command of a log entry (``UndecodableCommand``, a ``ValueError``, if it is none this
    build knows)."""
    domain = _BY_TAG.get(data[:1], "jobs")
    body = data[len(DOMAIN_TAGS[domain]) :]
    try:
        return _adapter(domain).validate_json(body)
    except ValueError as e:
        raise UndecodableCommand(str(e)) from None
