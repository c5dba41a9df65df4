"""Real processes under a nemesis: 3 and 5 KV members on 127.0.0.1 with mutual TLS, clients
writing and reading through random members while members are SIGKILLed and restarted,
SIGSTOPped and continued, and partitioned at the transport (a leader cut from the majority among
them). Every history must be linearizable, no acknowledged write may be lost, and every member's
state must converge after healing. Bounded: a fixed number of nemesis steps of fixed length."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from consensus.check import KeyValueModel, Recorder, Verdict, check
from consensus.kv.harness import LocalCluster

KEYS = ["a", "b", "c"]


async def client_loop(
    cluster: LocalCluster,
    rec: Recorder,
    cid: int,
    rng: random.Random,
    stop: trio.Event,
    acked: dict[str, list[int]],
) -> None:
    counter = 0
    while not stop.is_set():
        nid = rng.choice(cluster.ids)
        m = cluster.members[nid]
        if not m.alive or m.stopped:
            await trio.sleep(0.01)
            continue
        key = rng.choice(KEYS)
        roll = rng.random()
        c = m.client()
        if roll < 0.45:
            counter += 1
            value = cid * 1_000_000 + counter
            call = rec.invoke(cid, ("put", key, value))
            try:
                with trio.move_on_after(3) as scope:
                    resp = await c.put(key, value, rid=os.urandom(16), timeout=2.0)
                if scope.cancelled_caught or not resp["ok"]:
                    # Unknown outcome unless the node says it never proposed (dropped).
                    rec.fail(call) if (
                        not scope.cancelled_caught and resp.get("error") == "dropped"
                    ) else rec.info(call)
                else:
                    rec.ok(call)
                    acked.setdefault(key, []).append(value)
            except (OSError, trio.BrokenResourceError):
                rec.info(call)
        elif roll < 0.6:
            expected = rng.choice([None, *acked.get(key, [])[-3:]])
            counter += 1
            value = cid * 1_000_000 + counter
            call = rec.invoke(cid, ("cas", key, expected, value))
            try:
                with trio.move_on_after(3) as scope:
                    resp = await c.cas(key, expected, value, rid=os.urandom(16), timeout=2.0)
                if scope.cancelled_caught or not resp["ok"]:
                    rec.fail(call) if (
                        not scope.cancelled_caught and resp.get("error") == "dropped"
                    ) else rec.info(call)
                else:
                    rec.ok(call, resp["value"] if resp["value"] is False else True)
            except (OSError, trio.BrokenResourceError):
                rec.info(call)
        else:
            call = rec.invoke(cid, ("get", key))
            try:
                with trio.move_on_after(3) as scope:
                    resp = await c.get(key, timeout=2.0)
                if scope.cancelled_caught or not resp["ok"]:
                    rec.fail(call)  # a read that did not answer had no effect
                else:
                    rec.ok(call, resp["value"])
            except (OSError, trio.BrokenResourceError):
                rec.fail(call)
        await c.aclose()


async def nemesis(
    cluster: LocalCluster, rng: random.Random, steps: int, step_s: float
) -> list[str]:
    done = []
    # Every kind of fault once per schedule, in a seeded order.
    schedule = rng.sample(["kill", "pause", "partition-leader", "partition-random"], 4)
    for kind in schedule[:steps]:
        await trio.sleep(step_s)
        done.append(kind)
        if kind == "kill":
            victim = cluster.members[rng.choice(cluster.ids)]
            victim.kill()
            await trio.sleep(step_s)
            await victim.start()
        elif kind == "pause":
            victim = cluster.members[rng.choice(cluster.ids)]
            victim.pause()
            await trio.sleep(step_s)
            victim.resume()
        elif kind == "partition-leader":
            leader = await cluster.leader(timeout=30)
            await cluster.partition([leader])  # the leader alone: cut from the majority
            await trio.sleep(step_s)
            await cluster.heal()
        else:
            minority = rng.sample(cluster.ids, (len(cluster.ids) - 1) // 2)
            await cluster.partition(minority)
            await trio.sleep(step_s)
            await cluster.heal()
    return done


async def converged(cluster: LocalCluster, timeout: float = 30) -> list[dict]:
    with trio.fail_after(timeout):
        while True:
            sts = [await cluster.status(i) for i in cluster.ids]
            if all(sts) and len({(s["digest"], s["applied"]) for s in sts}) == 1:
                return sts
            await trio.sleep(0.2)


@pytest.mark.parametrize(("size", "seed"), [(3, 1), (5, 2)])
async def test_nemesis_linearizable_and_convergent(tmp_path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(tmp_path, size, tick_ms=50, election_tick=10)
    rec = Recorder(clock=trio.current_time)
    acked: dict[str, list[int]] = {}
    try:
        await cluster.start()
        await cluster.leader()
        stop = trio.Event()
        async with trio.open_nursery() as n:
            for cid in range(5):
                n.start_soon(
                    client_loop, cluster, rec, cid, random.Random(seed * 100 + cid), stop, acked
                )
            kinds = await nemesis(cluster, rng, steps=4, step_s=1.5 if size == 3 else 1.2)
            await cluster.heal()
            for m in cluster.members.values():
                if m.stopped:
                    m.resume()
            await trio.sleep(1.0)
            stop.set()
        # Final reads through every member see the same, latest values.
        final = {}
        for key in KEYS:
            for nid in cluster.ids:
                c = cluster.members[nid].client()
                call = rec.invoke("final", ("get", key))
                with trio.fail_after(20):
                    while True:
                        resp = await c.get(key, timeout=5)
                        if resp["ok"]:
                            break
                rec.ok(call, resp["value"])
                final.setdefault(key, set()).add(resp["value"])
                await c.aclose()
        sts = await converged(cluster)
    finally:
        cluster.shutdown()
    history = rec.history()
    counts = {o: sum(1 for op in history if op.outcome.name == o) for o in ("OK", "FAIL", "INFO")}
    print(f"nemesis={kinds} ops={counts}")
    result = check(history, KeyValueModel(), timeout=60)
    assert result.verdict is Verdict.LINEARIZABLE, result.report()
    assert all(len(v) == 1 for v in final.values()), final
    oks = sum(1 for op in history if op.outcome.name == "OK" and op.input[0] != "get")
    assert oks > 20, f"too few acknowledged writes to mean anything ({oks}); nemesis: {kinds}"
    # No acknowledged write is lost: every key's final value is an acknowledged or unknown write,
    # and the logs converged (one digest, one applied index on every member).
    assert len({s["digest"] for s in sts}) == 1
