"""Backend fleets' controller, on the leader (``terms.leader_controllers``): keeps each fleet
between ``nodes.min`` and ``nodes.max`` instances bought from its backends
(``meshgpu/fleets/backends.py``):

* **grow**: a waiting job no active host could run (``fits_no_host``) and that the fleet may
  serve gets an instance: the cheapest offer meeting the job's resources and the fleet's
  filters (``spot_policy``, ``max_price``, ``regions``, ``instance_types``, ``backends``); the
  fleet keeps ``nodes.min`` the same way, and buys ``nodes.target`` at first
  (``Fleet.target_left``). Its why-pending says "provisioning on fleet X". A job is served by
  one fleet only; a multi-node gang that keeps to one cluster grows one ``placement: cluster``
  fleet by all the instances it lacks, or none (``_gang_wants``).
* **cluster** (``placement: cluster``, more than one node): instances labelled
  ``cluster=<fleet>``, bought only from backends with ``cluster_placement``, into the fleet's
  placement group, pinned to the first instance's backend, region and zone (``_pinned``).
* **create** (state ``pending``): the record is in Raft *before* the cloud call, the instance
  tagged with the cluster id and the record's id; before every call the backend is asked
  (``list``) whether an instance with that tag exists -- a leader that died during the call
  left it, and it is adopted, not bought again. A capacity error tries the next offer; a
  timeout or another error backs off (the record stays ``pending``).
* ``provisioning``: the instance boots the agent from its user data (the agent file and a
  single-use join token) and joins -> ``idle``/``busy``.
* **shrink**: an instance idle past ``idle_duration`` while the fleet is above ``nodes.min``
  -> ``terminating``: drained, out of Raft, released at the cloud, forgotten.
* **reconcile** (once per term and backend): a cloud instance tagged with this cluster whose
  record is gone is an orphan and is terminated.
"""

from __future__ import annotations

import logging
import secrets as _secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives import serialization

from consensus.core import ProposalDropped
from consensus.node import NotLeader, Timeout
from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.fleets.backends import (
    TAG_CLUSTER,
    TAG_FLEET,
    TAG_INSTANCE,
    Backend,
    BackendError,
    BackendUnavailable,
    Bootstrap,
    CapacityError,
    InstanceRef,
    Offer,
    Requirements,
    filter_offers,
    load,
)
from meshgpu.state.cluster import NodeUnreachable, RemoveMember, encode_cluster
from meshgpu.state.codec import encode
from meshgpu.state.commands import SetPendingReasons
from meshgpu.state.fleets import (
    TARGET_REASON,
    AddFleetInstance,
    ForgetFleetInstance,
    UpdateFleetInstance,
)

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState
    from meshgpu.state.fleets import Fleet, FleetInstance

log = logging.getLogger(__name__)

CLOUD_TIMEOUT_S = 60.0  # one cloud call
JOIN_TIMEOUT_S = 600.0  # from the create call to the agent registered
TOKEN_TTL_S = 1800.0
DEFAULT_IDLE_S = 3 * 86400  # dstack's default idle_duration for backend fleets
MAX_CANDIDATES = 10
DRAIN_TIMEOUT_S = 60.0
GONE = ("terminated", "shutting-down", "stopped", "stopping")


def backoff_s(attempts: int) -> float:
    return float(min(120, 2 ** max(1, attempts)))


def is_backend_fleet(f: Fleet) -> bool:
    return not f.spec.get("ssh_config")


def nodes_range(spec: dict[str, Any]) -> tuple[int, int | None]:
    n = spec.get("nodes") or {}
    return int(n.get("min") or 0), (None if n.get("max") is None else int(n["max"]))


def cluster_of_many(spec: dict[str, Any]) -> bool:
    """``placement: cluster`` on a fleet that may have more than one instance: its instances
    are bought from backends that place them together (``Backend.cluster_placement``)."""
    _, hi = nodes_range(spec)
    return spec.get("placement") == "cluster" and (hi is None or hi > 1)


def idle_s(spec: dict[str, Any]) -> float | None:
    v = spec.get("idle_duration")
    if v is None:
        return DEFAULT_IDLE_S
    return None if int(v) < 0 else float(v)


def requirements(
    spec: dict[str, Any], resources: dict[str, Any] | None, placement: Any
) -> Requirements:
    """What an instance of the fleet must have for a job of ``resources`` (the fleet's own
    ``resources`` when None) under the run's ``placement``."""
    from meshgpu.config.resources import ResourcesSpec

    given = resources or spec.get("resources")
    res = ResourcesSpec.model_validate(given or {})
    g = res.gpu
    policy = spec.get("spot_policy") or (placement.spot_policy if placement else None)
    spot = {"spot": True, "auto": None}.get(policy or "on-demand", False)
    prices = [p for p in (spec.get("max_price"), placement.max_price if placement else None) if p]
    regions = tuple(spec.get("regions") or (placement.regions if placement else None) or ())
    types = tuple(
        spec.get("instance_types") or (placement.instance_types if placement else None) or ()
    )
    if not given:  # nodes.min of a fleet without resources: any offer of its filters
        return Requirements(
            spot=spot,
            max_price=min(prices) if prices else None,
            regions=regions,
            instance_types=types,
        )
    return Requirements(
        gpu_count=int(g.count.min or 0),
        gpu_count_max=g.count.max,
        gpu_names=tuple(g.name or ()),
        gpu_memory_gb=float(g.memory.min or 0) if g.memory else 0.0,
        cpus=int(res.cpu.count.min or 0),
        memory_gb=float(res.memory.min or 0),
        disk_gb=float(res.disk.size.min or 0),
        spot=spot,
        max_price=min(prices) if prices else None,
        regions=regions,
        instance_types=types,
        gpu_memory_gb_max=_max(g.memory) if g.memory else None,
        cpus_max=_max(res.cpu.count),
        memory_gb_max=_max(res.memory),
        disk_gb_max=_max(res.disk.size),
    )


def _max(rng: Any) -> Any:
    return None if rng is None or rng.max is None else rng.max


class BackendFleetController:
    def __init__(
        self,
        node: Any,
        cluster: ClusterState,
        state: StateMachine,
        proposer: Proposer,
        create_token: Callable[..., Any],
        ca_key_path: Path,
        agent_file: Callable[[], Path],
        clock: Clock = SYSTEM_CLOCK,
        interval_s: float = 0.5,
        loader: Callable[..., Backend] = load,
    ) -> None:
        self.node, self.cluster, self.state, self.proposer = node, cluster, state, proposer
        self.create_token, self.ca_key_path, self.agent_file = (
            create_token,
            ca_key_path,
            agent_file,
        )
        self.clock, self.interval_s, self.loader = clock, interval_s, loader
        self.busy: set[str] = set()  # instance ids with a step in flight
        self.growing: set[str] = set()  # fleets with an offer search in flight
        self.claimed: dict[str, str] = {}  # job id -> the fleet whose offer search has it
        self.gang_notes: dict[str, str] = {}  # why-pending of gangs no fleet can hold
        self.backends: dict[str, tuple[str, Backend]] = {}
        self.reconciled: set[str] = set()
        self.reconcile_at: dict[str, float] = {}
        self.grow_at: dict[str, float] = {}  # fleet -> no new search before (backoff)
        self.notes: dict[str, str] = {}  # job id -> the reason this controller last set
        self.decide_ms: list[float] = []  # waiting job seen -> create call (scripts/bench)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    self.tick(nursery)
                except BackendError as e:
                    log.warning("backend fleets: %s", e)
                await self.clock.sleep(self.interval_s)

    def fleets(self) -> list[Fleet]:
        return [f for f in self.cluster.fleets.fleets.values() if is_backend_fleet(f)]

    def tick(self, nursery: trio.Nursery) -> None:
        now = self.clock.wall()
        fleets = self.fleets()
        for name in self._backends_in_use(fleets):
            if name not in self.reconciled and self.reconcile_at.get(name, 0) <= now:
                self.reconciled.add(name)
                nursery.start_soon(self._guard_reconcile, name)
        if any(b not in self.reconciled for b in self._backends_in_use(fleets)):
            pending_reconcile = True
        else:
            pending_reconcile = False
        for f in fleets:
            self._account(f, now, nursery)
            if (
                not f.deleting
                and f.name not in self.growing
                and not pending_reconcile
                and self.grow_at.get(f.name, 0) <= now
            ):
                wants = self._wants(f)
                if wants:
                    self.growing.add(f.name)
                    self.claimed.update({w[0]: f.name for w in wants if w[0]})
                    nursery.start_soon(self._guard_grow, f.name, wants)
            for inst in list(f.instances.values()):
                if inst.instance_id in self.busy:
                    continue
                if inst.state == "pending" and inst.retry_at <= now and not pending_reconcile:
                    self._start(nursery, f.name, inst.instance_id, self.create)
                elif inst.state == "provisioning":
                    self._start(nursery, f.name, inst.instance_id, self.wait_joined)
                elif inst.state == "terminating" and inst.retry_at <= now:
                    self._start(nursery, f.name, inst.instance_id, self.terminate)
        if self.gang_notes:
            notes, self.gang_notes = self.gang_notes, {}
            nursery.start_soon(self._guard_reasons, notes)

    def _start(self, nursery: trio.Nursery, fleet: str, iid: str, step: Any) -> None:
        self.busy.add(iid)

        async def go() -> None:
            try:
                await step(fleet, iid)
            except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
                log.info("fleet %s instance %s: deferred (%s)", fleet, iid, e)
            finally:
                self.busy.discard(iid)

        nursery.start_soon(go)

    def _backends_in_use(self, fleets: list[Fleet]) -> list[str]:
        names: set[str] = set()
        for f in fleets:
            names |= {i.backend for i in f.instances.values()} | set(self._fleet_backends(f))
        return sorted(n for n in names if n in self.cluster.fleets.backends)

    def _instance(self, fleet: str, iid: str) -> tuple[Fleet, FleetInstance] | None:
        f = self.cluster.fleets.fleets.get(fleet)
        i = f.instances.get(iid) if f else None
        return (f, i) if f is not None and i is not None else None

    async def _update(self, fleet: str, iid: str, **fields: Any) -> bool:
        cmd = UpdateFleetInstance(at=self.clock.wall(), name=fleet, instance_id=iid, **fields)
        return bool((await self.proposer.propose(encode_cluster(cmd))).ok)

    def backend(self, name: str) -> Backend:
        cfg = self.cluster.fleets.backends.get(name)
        if cfg is None:
            raise BackendError(f"no backend {name} (meshgpu backend ls)")
        key = f"{cfg.type}:{cfg.created_at}:{cfg.sealed[:32]}"
        hit = self.backends.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        secrets: dict[str, Any] = {}
        if cfg.sealed:
            import json

            from meshgpu.security import unseal

            try:
                ca_key = serialization.load_pem_private_key(
                    self.ca_key_path.read_bytes(), password=None
                )
                secrets = json.loads(unseal(bytes.fromhex(cfg.sealed), ca_key))  # type: ignore[arg-type]
            except (OSError, ValueError) as e:
                raise BackendError(
                    f"this leader cannot open backend {name}'s secrets: {e}"
                ) from None
        b = self.loader(cfg.type, name, cfg.config, secrets)
        self.backends[name] = (key, b)
        return b

    async def _cloud(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking backend call in a worker thread, with a deadline."""
        with trio.move_on_after(CLOUD_TIMEOUT_S) as scope:
            return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise BackendUnavailable(f"{what}: no answer within {CLOUD_TIMEOUT_S:g} s")
        raise AssertionError("unreachable")

    # -- growing -----------------------------------------------------------------------------

    def _served(self) -> dict[str, str]:
        """Waiting jobs an instance is already being bought for (in any fleet: a job is served
        by one fleet only), or that a fleet's offer search has claimed: job id -> fleet."""
        from meshgpu.state.records import JobStatus

        out = dict(self.claimed)
        for f in self.fleets():
            for i in f.instances.values():
                if not i.for_job or i.state == "terminating":
                    continue
                j = self.state.jobs.get(i.for_job)
                # joined but its job not placed yet (a gang waits for all its hosts): still its
                if i.state in ("pending", "provisioning") or (
                    j is not None and j.status == JobStatus.SUBMITTED and not j.node_id
                ):
                    out[i.for_job] = f.name
        return out

    def _wants(self, f: Fleet) -> list[tuple[str, dict[str, Any] | None, Any]]:
        """(for_job, resources, placement) of each instance to buy now ("" = the floor:
        ``nodes.target`` at first, ``nodes.min`` always)."""
        from meshgpu.scheduler.offer import fits_no_host
        from meshgpu.state.records import JobStatus

        lo, hi = nodes_range(f.spec)
        alive = [i for i in f.instances.values() if i.state != "terminating"]
        out: list[tuple[str, dict[str, Any] | None, Any]] = []
        for _ in range(max(0, lo - len(alive), f.target_left)):
            out.append(("", None, None))
        room = (hi - len(alive) - len(out)) if hi is not None else 1 << 30
        served = self._served()
        gangs: dict[tuple[str, int], list[Any]] = {}
        for j in self.state.jobs.values():
            if j.status != JobStatus.SUBMITTED or j.node_id:
                continue
            if j.not_before and j.not_before > self.clock.wall():
                continue
            run = self.state.runs.get(j.run_name)
            if run is None:
                continue
            placement = run.spec.placement
            if placement.fleets is not None and f.name not in placement.fleets:
                continue
            if placement.cluster and self._gang_size(j) > 1:
                gangs.setdefault((j.run_name, j.replica_num), []).append(j)
                continue
            if room <= 0 or j.job_id in served:
                continue
            if not fits_no_host(self.state, j.resources, spec=run.spec):
                continue
            out.append((j.job_id, j.resources, placement))
            room -= 1
        for jobs in gangs.values():
            got = self._gang_wants(f, jobs, served, room)
            out += got
            room -= len(got)
        return out

    def _gang_size(self, job: Any) -> int:
        return sum(
            1
            for j in self.state.jobs.values()
            if j.run_name == job.run_name
            and j.replica_num == job.replica_num
            and j.submission_num == job.submission_num
            and not j.status.is_finished()
        )

    def _gang_wants(
        self, f: Fleet, jobs: list[Any], served: dict[str, str], room: int
    ) -> list[tuple[str, dict[str, Any] | None, Any]]:
        """A multi-node gang that keeps to one cluster (``placement: cluster``, the default for
        multi-node runs) grows one cluster fleet by as many instances as its waiting jobs lack
        -- all of them in this fleet, or none (a gang never spreads over fleets)."""
        from meshgpu.scheduler.offer import fits_no_host

        if not cluster_of_many(f.spec):
            return []
        if any(served.get(j.job_id, f.name) != f.name for j in jobs):
            return []  # another fleet is buying for this gang
        run = self.state.runs[jobs[0].run_name]
        n = self._gang_size(jobs[0])
        if not fits_no_host(self.state, jobs[0].resources, spec=run.spec, nodes=n) and not any(
            j.why_pending for j in jobs
        ):
            return []  # hosts might take it: let the scheduler try first
        placement = run.spec.placement
        req = requirements(f.spec, jobs[0].resources, placement)
        # the fleet's idle instances bought for no waiting job (nodes.min, a finished run's)
        idle = sum(
            1
            for i in f.instances.values()
            if i.state == "idle"
            and i.for_job not in served
            and filter_offers([Offer.from_dict(i.offer)], replace(req, max_price=None))
        )
        unserved = [j for j in jobs if j.job_id not in served]
        buy = len(unserved) - idle
        if buy <= 0:
            return []
        if buy > room:
            why = (
                f"fleet {f.name}: the {n}-node gang needs {buy} more instance(s) in one cluster, "
                f"and nodes.max leaves room for {max(0, room)}"
            )
            self.gang_notes.update({j.job_id: why for j in jobs})
            return []
        return [(j.job_id, j.resources, placement) for j in unserved[:buy]]

    async def _guard_grow(self, fleet: str, wants: list[Any]) -> None:
        try:
            await self.grow(fleet, wants)
        except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
            log.info("fleet %s: growing deferred (%s)", fleet, e)
        except BackendError as e:
            log.warning("fleet %s: cannot grow: %s", fleet, e)
            self.grow_at[fleet] = self.clock.wall() + backoff_s(3)
        finally:
            self.growing.discard(fleet)
            for job_id in [j for j, name in self.claimed.items() if name == fleet]:
                del self.claimed[job_id]

    async def _guard_reasons(self, notes: dict[str, str]) -> None:
        try:
            await self._reasons(notes)
        except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
            log.info("backend fleets: reasons deferred (%s)", e)

    def _fleet_backends(self, f: Fleet) -> list[str]:
        allowed = f.spec.get("backends")
        out = []
        for name, cfg in sorted(self.cluster.fleets.backends.items()):
            if allowed and name not in allowed and cfg.type not in allowed:
                continue
            out.append(name)
        return out

    async def offers_for(self, f: Fleet, req: Requirements) -> tuple[list[Offer], list[str]]:
        """Every offer meeting ``req`` from the fleet's backends, cheapest first; and the
        backends that failed (with why)."""
        offers: list[Offer] = []
        failed = []
        for name in self._fleet_backends(f):
            try:
                b = self.backend(name)
                if cluster_of_many(f.spec) and not getattr(b, "cluster_placement", False):
                    failed.append(f"{name}: cannot place instances together (placement: cluster)")
                    continue
                offers += await self._cloud(f"{name}: offers", b.offers, req)
            except BackendError as e:
                failed.append(f"{name}: {e}")
        return self._pinned(f, filter_offers(offers, req), ""), failed

    def _pinned(self, f: Fleet, offers: list[Offer], iid: str) -> list[Offer]:
        """A cluster fleet's offers where its other instances are: the same backend, region
        and zone (the first instance's zone, kept for the fleet), the zone written into them."""
        if not cluster_of_many(f.spec):
            return offers
        for i in sorted(f.instances.values(), key=lambda i: i.num):
            if i.instance_id == iid or i.state == "terminating" or not i.offer:
                continue
            backend, region = i.backend, str(i.offer.get("region") or "")
            zone = str(i.ref.get("zone") or "") or str(i.offer.get("zone") or "")
            if i.state == "pending" and not zone:
                continue  # not created yet: no zone to keep
            return [
                replace(o, zone=zone or o.zone)
                for o in offers
                if o.backend == backend
                and o.region == region
                and (not zone or not o.zone or o.zone == zone)
            ]
        return offers

    async def grow(self, fleet: str, wants: list[tuple[str, Any, Any]]) -> None:
        t0 = self.clock.now()
        f = self.cluster.fleets.fleets.get(fleet)
        if f is None:
            return
        reasons: dict[str, str] = {}
        _, hi = nodes_range(f.spec)
        for job_id, resources, placement in wants:
            req = requirements(f.spec, resources, placement)
            offers, failed = await self.offers_for(f, req)
            if resources is not None and f.spec.get("resources"):
                # an instance for a job is still one of the fleet's: within its resources too
                offers = filter_offers(offers, requirements(f.spec, None, placement))
            if not offers:
                why = _no_offer_reason(fleet, req, failed, bool(self._fleet_backends(f)))
                if job_id:
                    reasons[job_id] = why
                else:
                    log.warning("%s", why)
                self.grow_at[fleet] = self.clock.wall() + backoff_s(2)
                continue
            iid = "i" + _secrets.token_hex(6)
            first = offers[0]
            floor = TARGET_REASON if f.target_left > 0 else "nodes.min"
            cmd = AddFleetInstance(
                at=self.clock.wall(),
                name=fleet,
                instance_id=iid,
                backend=first.backend,
                offer=first.to_dict(),
                reason=f"for job {job_id}" if job_id else floor,
                for_job=job_id,
                candidates=[o.to_dict() for o in offers[:MAX_CANDIDATES]],
                max_instances=hi,
                for_target=floor == TARGET_REASON and not job_id,
            )
            res = await self.proposer.propose(encode_cluster(cmd))
            if not res.ok:
                log.info("fleet %s: instance not added: %s", fleet, res.error)
                continue
            if job_id:
                n = self.cluster.fleets.fleets[fleet].instances[iid].num
                reasons[job_id] = (
                    f"provisioning on fleet {fleet} (instance {fleet}-{n}: {first.instance_type} "
                    f"in {first.region}, {'spot' if first.spot else 'on-demand'}, "
                    f"${first.price:g}/h)"
                )
            self.decide_ms.append((self.clock.now() - t0) * 1000)
        await self._reasons(reasons)

    async def _reasons(self, reasons: dict[str, str]) -> None:
        changed = {
            j: w
            for j, w in reasons.items()
            if j in self.state.jobs and self.state.jobs[j].why_pending != w
        }
        self.notes.update(reasons)
        if changed:
            await self.proposer.propose(
                encode(SetPendingReasons(at=self.clock.wall(), reasons=changed))
            )

    # -- creating ----------------------------------------------------------------------------

    def _tags(self, fleet: str, iid: str) -> dict[str, str]:
        """The fleet's ``tags`` (``config/support.py`` refuses the reserved keys) and the
        controller's own, which reconciliation finds instances by."""
        f = self.cluster.fleets.fleets.get(fleet)
        own = {str(k): str(v) for k, v in ((f.spec.get("tags") or {}) if f else {}).items()}
        return own | {TAG_CLUSTER: self.cluster.cluster_id, TAG_FLEET: fleet, TAG_INSTANCE: iid}

    def _lookup(self, iid: str) -> dict[str, str]:
        return {TAG_CLUSTER: self.cluster.cluster_id, TAG_INSTANCE: iid}

    async def _existing(self, backend: Backend, fleet: str, iid: str) -> InstanceRef | None:
        refs = await self._cloud("list", backend.list, self._lookup(iid))
        alive = [r for r in refs if r.state not in GONE]
        return alive[0] if alive else None

    async def create(self, fleet: str, iid: str) -> None:
        found = self._instance(fleet, iid)
        if found is None or found[1].state != "pending":
            return
        f, inst = found
        candidates = [Offer.from_dict(d) for d in (inst.candidates or [inst.offer])]
        start = next((k for k, o in enumerate(candidates) if o.to_dict() == inst.offer), 0)
        tried: list[str] = []
        # a cluster fleet: where its first instance went (it may have been created since)
        for offer in self._pinned(f, candidates[start:], iid):
            try:
                backend = self.backend(offer.backend)
                # A previous attempt (this leader's timed-out call, or a dead leader's) may
                # have created it: adopt, do not buy twice.
                ref = await self._existing(backend, fleet, iid)
                if ref is None:
                    token = await self.create_token(TOKEN_TTL_S)
                    from meshgpu.control.fleets import _token_id
                    from meshgpu.ops.backends import download_hash

                    # the agent file comes from the members, for this secret (ops/backends.py)
                    secret = _secrets.token_urlsafe(32)
                    ok = await self._update(
                        fleet,
                        iid,
                        token_id=_token_id(token),
                        offer=offer.to_dict(),
                        backend=offer.backend,
                        download_hash=download_hash(secret),
                        if_state="pending",
                    )
                    if not ok:
                        return
                    cfg = self.cluster.fleets.backends.get(offer.backend)
                    url = str(cfg.config.get("agent_url") or "") if cfg else ""
                    if not url:  # this node serves it too: have it ready (built once)
                        from meshgpu.fleets.pyz import BuildError

                        try:
                            await trio.to_thread.run_sync(self.agent_file)
                        except BuildError as e:
                            raise BackendError(f"no agent file to serve: {e}") from None
                    boot = self._bootstrap(f, inst, offer, token, url, secret)
                    ref = await self._cloud(
                        f"{offer.backend}: create {offer.instance_type}",
                        backend.create,
                        offer,
                        boot,
                    )
            except CapacityError as e:
                tried.append(f"{offer.instance_type}{' spot' if offer.spot else ''}: {e}")
                log.info("fleet %s instance %s: %s; trying the next offer", fleet, iid, e)
                continue
            except BackendError as e:
                attempts = inst.attempts + 1
                log.warning(
                    "fleet %s instance %s: %s (retry in %gs)", fleet, iid, e, backoff_s(attempts)
                )
                await self._update(
                    fleet,
                    iid,
                    reason=str(e),
                    attempts=attempts,
                    retry_at=self.clock.wall() + backoff_s(attempts),
                    if_state="pending",
                )
                return
            await self._update(
                fleet,
                iid,
                state="provisioning",
                ref=ref.to_dict(),
                reason="",
                attempts=0,
                offer=offer.to_dict(),
                backend=offer.backend,
                if_state="pending",
            )
            log.info(
                "fleet %s instance %s: created %s (%s in %s, $%g/h)",
                fleet,
                iid,
                ref.instance_id,
                offer.instance_type,
                offer.region,
                offer.price,
            )
            return
        why = (
            f"fleet {fleet}: no capacity: tried {len(tried)} of {len(candidates)} offers ("
            + "; ".join(tried)[:400]
            + ")"
        )
        log.warning("%s", why)
        await self.proposer.propose(
            encode_cluster(ForgetFleetInstance(at=self.clock.wall(), name=fleet, instance_id=iid))
        )
        self.grow_at[fleet] = self.clock.wall() + backoff_s(3)
        if inst.for_job:
            await self._reasons({inst.for_job: why})

    def _bootstrap(
        self, f: Fleet, inst: FleetInstance, offer: Offer, token: str, url: str, secret: str
    ) -> Bootstrap:
        """The instance's user data: the agent file from ``url`` (the backend's ``agent_url``)
        or else from the members with ``secret``, and the agent's arguments."""
        from meshgpu.fleets.userdata import Download, user_data

        labels = {
            "fleet": f.name,
            "instance": str(inst.num),
            "backend": offer.backend,
            "region": offer.region,
            "instance_type": offer.instance_type,
        }
        if f.spec.get("placement") == "cluster":
            labels["cluster"] = f.name
        members = [m.peer_address for m in self.cluster.members.values() if not m.removed]
        args = [
            "agent",
            "--data-dir",
            "data",
            "--name",
            f"{f.name}-{inst.num}",
            "--bind",
            "0.0.0.0",
            "--labels",
            ",".join(f"{k}={v}" for k, v in labels.items()),
            "--join",
            ",".join(members),
            "--no-mdns",
            "--price",
            f"{offer.price:g}",
        ]
        if offer.spot:
            args.append("--spot")
        blocks = f.spec.get("blocks", 1)
        if blocks not in (None, 1):
            args += ["--blocks", str(blocks)]
        env = {str(k): str(v) for k, v in (f.spec.get("env") or {}).items() if v is not None}
        env["MESHGPU_FLEET_ENV"] = ",".join(sorted(env))
        env["MESHGPU_JOIN_TOKEN"] = token
        return Bootstrap(
            name=f"{f.name}-{inst.num}",
            user_data=user_data(
                args,
                env,
                fleet=f.name,
                agent_url=url,
                download=Download(
                    urls=tuple(
                        m.api_url
                        for m in self.cluster.members.values()
                        if not m.removed and m.api_url
                    ),
                    secret=secret,
                    ca_pem=self.cluster.ca_cert_pem,
                ),
            ),
            tags=self._tags(f.name, inst.instance_id),
            placement_group=self.placement_group(f),
        )

    def placement_group(self, f: Fleet) -> str:
        """The fleet's placement group (``placement: cluster`` with more than one node): one
        name per cluster and fleet, within EC2's 255 characters."""
        if not cluster_of_many(f.spec):
            return ""
        return f"meshgpu-{self.cluster.cluster_id}-{f.name}"[:255]

    # -- joining -----------------------------------------------------------------------------

    async def wait_joined(self, fleet: str, iid: str) -> None:
        while True:
            found = self._instance(fleet, iid)
            if found is None or found[1].state != "provisioning":
                return
            inst = found[1]
            node_id = _joined_node(self.cluster, inst.token_id)
            if node_id and node_id in self.state.nodes:
                await self._update(
                    fleet,
                    iid,
                    state="idle",
                    node_id=node_id,
                    idle_since=self.clock.wall(),
                    if_state="provisioning",
                )
                log.info(
                    "fleet %s instance %s joined as %s (%.1f s after it was recorded)",
                    fleet,
                    iid,
                    node_id,
                    self.clock.wall() - inst.created_at,
                )
                return
            if self.clock.wall() - inst.updated_at > JOIN_TIMEOUT_S:
                await self._update(
                    fleet,
                    iid,
                    state="terminating",
                    reason=f"its agent did not join within {JOIN_TIMEOUT_S:g} s",
                )
                return
            await self.clock.sleep(0.2)

    # -- idle accounting ---------------------------------------------------------------------

    def _account(self, f: Fleet, now: float, nursery: trio.Nursery) -> None:
        lo, _ = nodes_range(f.spec)
        limit = idle_s(f.spec)
        alive = sum(1 for i in f.instances.values() if i.state != "terminating")
        for inst in f.instances.values():
            if inst.state not in ("idle", "busy") or inst.instance_id in self.busy:
                continue
            busy = any(
                j.node_id == inst.node_id and not j.status.is_finished()
                for j in self.state.jobs.values()
            )
            if busy and inst.state == "idle":
                self._start(nursery, f.name, inst.instance_id, self._set_state("busy"))
            elif not busy and inst.state == "busy":
                self._start(nursery, f.name, inst.instance_id, self._set_state("idle"))
            elif (
                not busy
                and inst.state == "idle"
                and limit is not None
                and alive > lo
                and now - inst.idle_since >= limit
            ):
                alive -= 1
                self._start(
                    nursery,
                    f.name,
                    inst.instance_id,
                    self._set_state("terminating", f"idle for {limit:g} s (idle_duration)"),
                )

    def _set_state(self, state: str, reason: str = "") -> Any:
        async def step(fleet: str, iid: str) -> None:
            fields: dict[str, Any] = {"state": state}
            if state == "idle":
                fields["idle_since"] = self.clock.wall()
            if reason:
                fields["reason"] = reason
            await self._update(fleet, iid, **fields)

        return step

    # -- terminating -------------------------------------------------------------------------

    async def terminate(self, fleet: str, iid: str) -> None:
        found = self._instance(fleet, iid)
        if found is None:
            return
        _, inst = found
        node_id = inst.node_id or _joined_node(self.cluster, inst.token_id)
        if node_id:
            await self._drain(node_id)
            m = self.cluster.member_by_node(node_id)
            if m is not None:
                st = self.node.status()
                if m.raft_id in st["voters"] or m.raft_id in st["learners"]:
                    await self.node.remove(m.raft_id)
                await self.proposer.propose(
                    encode_cluster(RemoveMember(at=self.clock.wall(), raft_id=m.raft_id))
                )
        try:
            backend = self.backend(inst.backend)
            refs = [InstanceRef.from_dict(inst.ref)] if inst.ref else []
            # a create that the cloud did though the answer was lost: find it by its tag
            refs += [
                r
                for r in await self._cloud("list", backend.list, self._lookup(iid))
                if r.state not in GONE and all(r.instance_id != x.instance_id for x in refs)
            ]
            for ref in refs:
                await self._cloud(f"terminate {ref.instance_id}", backend.terminate, ref)
        except BackendError as e:
            attempts = inst.attempts + 1
            log.warning("fleet %s instance %s: not terminated yet: %s", fleet, iid, e)
            await self._update(
                fleet,
                iid,
                reason=f"terminating: {e}",
                attempts=attempts,
                retry_at=self.clock.wall() + backoff_s(attempts),
            )
            return
        if node_id and node_id in self.state.nodes:
            await self.proposer.propose(
                encode_cluster(NodeUnreachable(at=self.clock.wall(), node_id=node_id))
            )
        await self.proposer.propose(
            encode_cluster(ForgetFleetInstance(at=self.clock.wall(), name=fleet, instance_id=iid))
        )
        log.info("fleet %s instance %s terminated (%s)", fleet, iid, inst.reason)

    async def _drain(self, node_id: str) -> None:
        from meshgpu.control.fleets import drain_node

        await drain_node(self.state, self.proposer, self.clock, node_id, DRAIN_TIMEOUT_S)

    # -- reconciling -------------------------------------------------------------------------

    async def _guard_reconcile(self, name: str) -> None:
        try:
            await self.reconcile(name)
        except BackendError as e:
            log.warning("backend %s: cannot reconcile yet: %s", name, e)
            self.reconciled.discard(name)
            self.reconcile_at[name] = self.clock.wall() + backoff_s(3)

    async def reconcile(self, name: str) -> None:
        """Terminate this cluster's instances at ``name`` that no record knows (orphans)."""
        backend = self.backend(name)
        refs = await self._cloud(
            f"{name}: list", backend.list, {TAG_CLUSTER: self.cluster.cluster_id}
        )
        known = {
            i.instance_id for f in self.cluster.fleets.fleets.values() for i in f.instances.values()
        }
        for ref in refs:
            if ref.state in GONE or ref.tags.get(TAG_INSTANCE) in known:
                continue
            log.warning(
                "backend %s: instance %s (tag %s) has no record: terminating the orphan",
                name,
                ref.instance_id,
                ref.tags.get(TAG_INSTANCE),
            )
            await self._cloud(f"terminate {ref.instance_id}", backend.terminate, ref)


def _joined_node(cluster: ClusterState, token_id: str) -> str:
    tok = cluster.tokens.get(token_id) if token_id else None
    used = tok.get("used_by", []) if tok else []
    return used[0] if used else ""


def _no_offer_reason(fleet: str, req: Requirements, failed: list[str], any_backend: bool) -> str:
    if not any_backend:
        return f"fleet {fleet} has no backend to provision from (meshgpu backend add ...)"
    want = []
    if req.gpu_count:
        want.append(f"{req.gpu_count}x{'/'.join(req.gpu_names) or 'GPU'}")
    if req.spot is not None:
        want.append("spot" if req.spot else "on-demand")
    if req.max_price is not None:
        want.append(f"at most ${req.max_price:g}/h (max_price)")
    if req.regions:
        want.append(f"in {', '.join(req.regions)}")
    extra = f"; failed: {'; '.join(failed)}" if failed else ""
    return f"fleet {fleet}: no offer meets {', '.join(want) or 'the request'}{extra}"
