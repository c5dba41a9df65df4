"""``offer``: where a request would fit now (``meshgpu offer``)."""

from __future__ import annotations

from meshgpu.config.spec import compile_run
from meshgpu.scheduler import offer
from tests.scheduler._world import host, resources, schedule, submit, task, world


def test_idle_hosts_first_in_the_order_the_scheduler_would_pick() -> None:
    sm = world(
        host("n1", 8),
        host("n2", 8),
        host("n3", 8),
        host("t4", 4, name="T4", mem_gb=16),
        submit("a", task("H100:8"), at=1),
        submit("b", task("H100:4"), at=2),
    )
    schedule(sm)
    assert [j.node_id for j in sm.jobs.values()] == ["n1", "n2"]  # best fit, in node order
    offers = offer(sm, resources("H100:2"))
    # n2's 4 free GPUs fit 2 most tightly; then n3; n1 is full; the T4 host can never run it.
    assert [(o.node, o.availability) for o in offers] == [
        ("n2", "idle"),
        ("n3", "idle"),
        ("n1", "busy"),
    ]
    n2, n3, n1 = offers
    assert n2.gpu_indices == (4, 5) and n2.free_gpus == 4  # the free NUMA node
    assert n3.free_gpus == 8 and n3.gpus == "8xH100:80GB"
    assert n1.gpu_indices == () and n1.free_gpus == 0


def test_after_queue_counts_what_waiting_runs_would_take_and_hold() -> None:
    sm = world(host("n1", 8), host("n2", 8), submit("hog", task("H100:6"), at=0))
    schedule(sm, now=0)
    sm.apply_command(submit("head", task("H100:8", nodes=2), at=1))  # blocked: holds n1 and n2
    now = offer(sm, resources("H100:2"), now=5)
    assert {o.node for o in now if o.availability == "idle"} == {"n1", "n2"}
    queued = offer(sm, resources("H100:2"), now=5, after_queue=True)
    assert all(o.availability == "busy" for o in queued)
    assert {o.reserved_for for o in queued} == {"head"}
    # Asking leaves no trace in the scheduler's index.
    assert offer(sm, resources("H100:2"), now=5) == now


def test_blocks_and_filters_in_offers() -> None:
    sm = world(
        host("b", 8, blocks=4, labels={"fleet": "x"}),
        host("c", 8, labels={"fleet": "y"}),
    )
    [o] = offer(sm, resources("H100:4"), spec=compile_run({"fleets": ["x"]}))
    assert (o.node, o.blocks, o.free_blocks, o.total_blocks) == ("b", 2, 4, 4)
    assert len(o.gpu_indices) == 4
    [g] = offer(sm, resources("H100:8"), nodes=2, spec=compile_run({"fleets": ["y"]}))
    assert g.node == "c" and g.blocks is None
