"""The demo ``nexusctl dev run-all --demo`` runs once the stack is up.

Several disks at once, then an instance with one of them attached, all followed by
their progress events; then each disk's timeline: when each region was ready at its
crucible agent, when the saga resumed, on which Nexus replica, and the gap between.
"""

from __future__ import annotations

import statistics
from collections import Counter

from nexus.cli.client import NexusClient
from nexus.cli.common import show_progress
from nexus.cli.console import say, show
from nexus.cli.progress import ProgressWatch, Target
from nexus.cli.saga import render_saga
from nexus.cli.timeline import wakes
from nexus.sagas.disk_create import REPLICAS
from schemas import api

PROJECT = "demo"
DISK_BYTES = 1 << 30
WAIT_SECONDS = 120.0


async def run_demo(client: NexusClient, disks: int = 4) -> bool:
    """True when every disk is ready and the instance runs."""
    watch = ProgressWatch()
    await client.subscribe(watch.handle)

    names = [f"demo-disk-{n}" for n in range(1, disks + 1)]
    say(
        f"\n== creating {disks} disks of 1 GiB at once "
        f"({REPLICAS} regions each, on {REPLICAS} sleds)"
    )
    targets = []
    for name in names:
        request = api.DiskCreate(
            source=client.source,
            payload=api.DiskCreateRequest(project=PROJECT, name=name, size_bytes=DISK_BYTES),
        )
        accepted = (await client.call(request, api.AcceptedReply)).payload
        targets.append(Target(accepted.saga_id, accepted.resource_id, name))
    finished = await watch.follow(targets, show_progress, WAIT_SECONDS)
    disks_ok = all(finished.get(target.saga_id) == "done" for target in targets)

    instance_ok = False
    if disks_ok:
        say(f"\n== creating instance demo-vm with {names[0]} attached")
        create_vm = api.InstanceCreate(
            source=client.source,
            payload=api.InstanceCreateRequest(
                project=PROJECT,
                name="demo-vm",
                ncpus=2,
                memory_bytes=2 << 30,
                disks=(names[0],),
            ),
        )
        accepted = (await client.call(create_vm, api.AcceptedReply)).payload
        vm = Target(accepted.saga_id, accepted.resource_id, "demo-vm")
        instance_ok = (await watch.follow([vm], show_progress, WAIT_SECONDS)).get(
            vm.saga_id
        ) == "done"

    overheads: list[float] = []
    replicas: Counter[str] = Counter()
    for target in targets:
        saga = (
            await client.call(
                api.SagaGet(source=client.source, payload=api.SagaRef(saga_id=target.saga_id)),
                api.SagaReply,
            )
        ).payload
        say(f"\n== {target.label}: disk {target.resource_id}")
        render_saga(saga)
        for wake in wakes(saga):
            replicas[wake.replica] += 1
            if wake.overhead_ms is not None and not wake.by_reconcile:
                overheads.append(wake.overhead_ms)

    listing = (
        await client.call(
            api.DiskList(source=client.source, payload=api.ProjectFilter(project=PROJECT)),
            api.DiskListReply,
        )
    ).payload
    say("\n== summary")
    show(
        "  disks: "
        + ", ".join(f"{disk.name} {disk.state.value}" for disk in listing if disk.name in names)
    )
    say(f"  instance demo-vm: {'running' if instance_ok else 'NOT running'}")
    if overheads:
        say(
            f"  {len(overheads)} regions woke their saga by notification: wake overhead "
            f"median {statistics.median(overheads):.1f} ms, max {max(overheads):.1f} ms"
        )
    say(
        "  resumed on: "
        + ", ".join(f"{replica} x{count}" for replica, count in sorted(replicas.items()))
    )
    return disks_ok and instance_ok
