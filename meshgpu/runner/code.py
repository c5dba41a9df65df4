"""Uploaded working directories on this host, and how they travel between hosts.

An archive is content-addressed: ``<sha256>.tar.gz`` in the code directory. Only the node that
accepted an upload has it at first, but a run's jobs may be placed anywhere, and that node may
die. So:

- the accepting node **pushes** the archive to a few other members before it acknowledges the
  upload (best effort, bounded in time), and the run's ``CodeRef`` names them as holders;
- a host that must start a job whose archive it lacks **fetches** it before the launch: from the
  accepting node first, then the holders, then any other member (a member that has it answers,
  the others say 404), retrying with backoff for a bounded time. The SHA-256 is checked before
  anything is stored; concurrent jobs of one run on one host fetch once.

Archives travel over the mutual-TLS peer port (``meshgpu/peer``: a ``CodeLink`` given to the
store), so no API token is needed between members.

Every archive is written atomically (a temporary file, fsync, rename), so an archive's path that
exists always holds the complete, verified archive. An upload (``put``) is first walked through,
in a worker thread, with the limits that unpacking applies (``check_archive``): one that expands
too far, or holds an unsafe entry, is refused then, not when a job first unpacks it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from consensus.storage import FULL_ERRNOS, StorageFull, free_bytes
from meshgpu.client.archive import ArchiveLimits, check_archive
from meshgpu.datadir import open_private, private_dir
from meshgpu.state import CodeRef, NodeRecord

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class CodeDigestError(ValueError):
    """An archive's bytes do not hash to the SHA-256 it was sent under."""


class CodeFetchError(RuntimeError):
    """No member could supply a run's code archive in time; the message names who was asked."""


@dataclass(frozen=True, slots=True)
class Source:
    """A member that may hold an archive, as the fetcher and the pusher address it."""

    node_id: str
    name: str
    api_url: str


def valid_sha256(sha: str) -> bool:
    """A lower-case hex SHA-256 (anything else must never become a file name)."""
    return bool(_SHA256.fullmatch(sha))


def fetch_sources(ref: CodeRef, nodes: Mapping[str, NodeRecord], me: str) -> list[Source]:
    """Where to look for ``ref``'s archive, best first: the node that accepted the upload, the
    holders it pushed to, then every other member. Hosts the mesh has declared dead come last
    (they cost a connection timeout each, but they may be back)."""
    ranked = [ref.node_id, *ref.holders, *nodes]
    seen: set[str] = {me}
    alive: list[Source] = []
    dead: list[Source] = []
    for node_id in ranked:
        node = nodes.get(node_id)
        if node_id in seen or node is None or not node.api_url:
            continue
        seen.add(node_id)
        (dead if node.status == "dead" else alive).append(
            Source(node_id, node.name, node.api_url.rstrip("/"))
        )
    return alive + dead


def push_targets(nodes: Mapping[str, NodeRecord], me: str) -> list[Source]:
    """Active members to copy a fresh upload to, in the order to try them: other failure zones
    (the ``zone`` label) first, so one zone's loss leaves a copy; random within that, so uploads
    spread over the mesh."""
    zone = nodes[me].labels.get("zone") if me in nodes else None
    peers = [n for n in nodes.values() if n.node_id != me and n.status == "active" and n.api_url]
    random.shuffle(peers)
    peers.sort(key=lambda n: zone is not None and n.labels.get("zone") == zone)
    return [Source(n.node_id, n.name, (n.api_url or "").rstrip("/")) for n in peers]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.part")
    try:
        with os.fdopen(open_private(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CodeUnavailable(Exception):
    """This member cannot supply or take the archive (it lacks it, refused, is unreachable, or
    sent bad bytes); the message says which."""


class CodeLink(Protocol):
    """How archives travel between members (``meshgpu.peer.client.PeerCodeLink``)."""

    async def fetch(self, src: Source, sha: str, cap: int, timeout: float) -> bytes:
        """The archive from ``src``: at most ``cap`` bytes. Raises ``CodeUnavailable``."""
        ...

    async def push(self, src: Source, sha: str, data: bytes, timeout: float) -> None:
        """Store a copy on ``src``. Raises ``CodeUnavailable``."""
        ...


class _NoLink:
    async def fetch(self, src: Source, sha: str, cap: int, timeout: float) -> bytes:
        raise CodeUnavailable("no link to other members")

    async def push(self, src: Source, sha: str, data: bytes, timeout: float) -> None:
        raise CodeUnavailable("no link to other members")


class CodeStore:
    """This host's code archives: stored, served, pushed to peers and fetched from them.

    ``link`` carries archives to and from other members (none: this host keeps its own only).
    ``fetch_for_s`` bounds how long a fetch keeps retrying before the job fails;
    ``push_for_s`` how long an upload waits for its copies. ``archive_limits``: how far an
    archive may expand (default: scaled from ``limit``), checked at upload and at unpacking.
    ``min_free`` bytes of the disk are kept free: an upload that would leave less is refused.
    """

    def __init__(
        self,
        directory: Path,
        link: CodeLink | None = None,
        *,
        limit: int,
        fetch_for_s: float = 120.0,
        push_for_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.5, 5.0),
        archive_limits: ArchiveLimits | None = None,
        min_free: int = 0,
    ) -> None:
        self.directory = directory
        self.archive_limits = archive_limits or ArchiveLimits.for_upload_limit(limit)
        # Archives checked at once (each a worker thread inflating up to the limits): a burst
        # of uploads queues here rather than taking every core.
        self._checking = trio.CapacityLimiter(2)
        self.min_free = min_free
        private_dir(directory)
        self.link: CodeLink = link if link is not None else _NoLink()
        self.limit = limit
        self.fetch_for_s = fetch_for_s
        self.push_for_s = push_for_s
        self.backoff_s = backoff_s
        self._locks: dict[str, trio.Lock] = {}
        self._holders: dict[str, list[str]] = {}

    def path(self, sha: str) -> Path:
        if not valid_sha256(sha):
            raise ValueError(f"not a SHA-256: {sha!r}")
        return self.directory / f"{sha}.tar.gz"

    def has(self, sha: str) -> bool:
        return valid_sha256(sha) and self.path(sha).exists()

    def collect(self, referenced: set[str], min_age_s: float = 3600.0) -> int:
        """Delete archives no run refers to any more (their runs were pruned), once they are
        ``min_age_s`` old (a fresh upload waits for its submission). Returns how many went."""
        gone = 0
        now = time.time()
        for f in self.directory.glob("*.tar.gz"):
            sha = f.name.removesuffix(".tar.gz")
            try:
                if sha not in referenced and now - f.stat().st_mtime > min_age_s:
                    f.unlink()
                    self._holders.pop(sha, None)
                    gone += 1
            except OSError:
                continue
        return gone

    def holders(self, sha: str) -> list[str]:
        """The members this node pushed ``sha`` to (since it started)."""
        return list(self._holders.get(sha, ()))

    async def put(self, data: bytes, claimed: str | None = None) -> str:
        """Store ``data`` under its SHA-256 (refused if it is not ``claimed``); returns it.
        ``ArchiveRefused`` for an archive that unpacking would refuse (checked in a worker
        thread), ``StorageFull`` when the disk cannot take it."""
        sha = hashlib.sha256(data).hexdigest()
        if claimed and claimed != sha:
            raise CodeDigestError(f"sha256 {sha} != {claimed}")
        path = self.path(sha)
        if not path.exists():
            await trio.to_thread.run_sync(
                check_archive, data, self.archive_limits, limiter=self._checking
            )
            await trio.to_thread.run_sync(self._write, path, data)
        return sha

    def _write(self, path: Path, data: bytes) -> None:
        free = free_bytes(self.directory)
        if free - len(data) < self.min_free:
            raise StorageFull(
                f"{self.directory} has {free / 2**20:.1f} MiB free: storing a "
                f"{len(data) / 2**20:.1f} MiB archive would leave less than the "
                f"{self.min_free / 2**20:.0f} MiB this node keeps in reserve; free space on this "
                "host or upload to another member"
            )
        try:
            _write_atomic(path, data)
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise StorageFull(f"cannot store the archive in {self.directory}: {e}") from e
            raise

    # -- push: the accepting node copies a fresh upload to other members ------------------------
    async def push(
        self, sha: str, data: bytes, targets: Sequence[Source], copies: int
    ) -> list[str]:
        """Copy the archive to ``copies`` of ``targets`` (the next target stands in for one that
        fails), all at once, within ``push_for_s``. Best effort: returns the node ids that
        confirmed, also remembered as this archive's holders."""
        confirmed: list[str] = []
        if copies <= 0 or not targets:
            return confirmed
        queue = iter(targets)

        async def worker() -> None:
            for target in queue:  # one shared iterator: each target is tried by one worker
                try:
                    await self.link.push(target, sha, data, self.push_for_s)
                except CodeUnavailable as e:
                    log.warning("code=%s push to %s failed: %s", sha[:12], target.name, e)
                    continue
                confirmed.append(target.node_id)
                return

        with trio.move_on_after(self.push_for_s):
            async with trio.open_nursery() as nursery:
                for _ in range(min(copies, len(targets))):
                    nursery.start_soon(worker)
        if len(confirmed) < min(copies, len(targets)):
            log.warning(
                "code=%s copied to %d of %d other member(s): its runs depend on fewer hosts",
                sha[:12],
                len(confirmed),
                min(copies, len(targets)),
            )
        self._holders[sha] = sorted({*self._holders.get(sha, ()), *confirmed})
        return list(confirmed)

    # -- fetch: a host about to run a job gets the archive it lacks -----------------------------
    async def fetch(
        self, sha: str, size: int | None, sources: Callable[[], Iterable[Source]]
    ) -> Path:
        """The archive's path, fetched first if this host lacks it. ``sources`` is asked again
        on every round (the mesh changes while a fetch waits). Raises ``CodeFetchError`` once
        ``fetch_for_s`` has passed without a verified copy."""
        path = self.path(sha)
        lock = self._locks.setdefault(sha, trio.Lock())
        try:
            async with lock:  # concurrent jobs of one run: the first fetches, the rest find it
                if path.exists():
                    return path
                await self._fetch(sha, size, sources)
                return path
        finally:
            if not lock.statistics().tasks_waiting and self._locks.get(sha) is lock:
                del self._locks[sha]

    async def _fetch(
        self, sha: str, size: int | None, sources: Callable[[], Iterable[Source]]
    ) -> None:
        delay, max_delay = self.backoff_s
        errors: dict[str, str] = {}
        current: str | None = None
        with trio.move_on_after(self.fetch_for_s):
            while True:
                for src in sources():
                    current = src.name
                    try:
                        await self._fetch_from(src, sha, size)
                    except CodeUnavailable as e:
                        errors[src.name] = str(e) or type(e).__name__
                        continue
                    log.info("code=%s fetched from %s", sha[:12], src.name)
                    return
                current = None
                log.info("code=%s not fetched yet (%s); retrying", sha[:12], errors)
                await trio.sleep(delay)
                delay = min(delay * 2, max_delay)
        if current is not None:
            errors.setdefault(current, "timed out")
        tried = "; ".join(f"{name}: {why}" for name, why in errors.items()) or "no member to ask"
        raise CodeFetchError(
            f"the code archive {sha[:12]} could not be fetched within {self.fetch_for_s:g}s "
            f"from {', '.join(errors) or 'any member'} ({tried})"
        )

    async def _fetch_from(self, src: Source, sha: str, size: int | None) -> None:
        cap = min(size, self.limit) if size is not None else self.limit
        data = await self.link.fetch(src, sha, cap, 30.0)
        if len(data) > cap:
            raise CodeUnavailable(f"sent more than the archive's {cap} bytes")
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise CodeUnavailable(f"sent bytes whose SHA-256 is {got[:12]}, refused")
        await trio.to_thread.run_sync(_write_atomic, self.path(sha), data)
