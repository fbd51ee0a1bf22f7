"""A RabbitMQ cluster loses a node: the control plane goes on, on the nodes left.

A real 3-node cluster on this machine (``PrivateRabbitMQCluster``: three
``rabbitmq-server`` processes joined with ``rabbitmqctl join_cluster``), loaded once with
the control plane's definitions (least-privilege users, quorum queues), and the real
processes as a deployment runs them: two Nexus replicas, three crucible agents and a
sled agent, each given every node's address, its list starting at the node that leads
``nexus.events``, so that every one of them is connected there. That node is SIGKILLed
while disk-create sagas are parked on their regions and the agents are still creating
them (their notifications in flight): every client reconnects to a surviving node, the
sagas resume exactly once each and finish, nothing is dead-lettered, ``nexusctl doctor``
(given the dead node first) finds the books balanced. The node then restarts and
rejoins, and its quorum queue members with it. Then the node the clients moved to is
stopped cleanly, as a rolling restart does, under two more parked sagas: the clients
move on to the last node of their list, and those sagas finish too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, Disk, Region, Saga, SagaLogEntry
from nexus.devstack.access import Access, provision
from nexus.devstack.servers import RabbitMQNode
from schemas.brokers import broker_urls, rotated
from schemas.identity import CLI_USER, NEXUS_USER, crucible_user, sled_user
from schemas.topology import DEAD_LETTER_QUEUE, NEXUS_EVENTS_QUEUE
from schemas.transport import Transport
from tests.harness.servers import PrivateRabbitMQCluster
from tests.processes import BIN, ApiClient, Service, crucible, nexus, sled

pytestmark = pytest.mark.integration

DISKS = 4
REGIONS = 3 * DISKS
# Three Erlang VMs and six services on two shared cores: generous, but bounded.
READY_SECONDS = 90.0
RECOVERY_SECONDS = 120.0
WAIT_NODES = ("region_0", "region_1", "region_2")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.2)


def starting_at(urls: list[str], node: RabbitMQNode) -> str:
    """Every node's URL, the list rotated to begin at ``node``'s."""
    return rotated(",".join(urls), next(i for i, url in enumerate(urls) if f":{node.port}/" in url))


def cluster_node_at(cluster: PrivateRabbitMQCluster, url: str) -> RabbitMQNode:
    return next(node for node in cluster.nodes if f":{node.port}/" in url)


def queues(cluster: PrivateRabbitMQCluster, vhost: str) -> dict[str, dict[str, Any]]:
    listed = cluster.rabbitmqctl(
        "list_queues", "-p", vhost, "name", "type", "durable", "leader", "members", "online",
        "messages", "--formatter", "json",
    )  # fmt: skip
    return {queue["name"]: queue for queue in json.loads(listed)}


def connections(cluster: PrivateRabbitMQCluster, vhost: str) -> dict[str, list[int]]:
    """Each client connection's name, and the AMQP ports (nodes) it is connected to."""
    listed = cluster.rabbitmqctl(
        "list_connections", "-p", vhost, "client_properties", "port", "--formatter", "json"
    )
    found: dict[str, list[int]] = {}
    for connection in json.loads(listed):
        properties = {entry[0]: entry[2] for entry in connection["client_properties"]}
        found.setdefault(str(properties.get("connection_name")), []).append(connection["port"])
    return found


class Books:
    """What Nexus's database says, read by the test on its own engine."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)
        self.sessions = create_sessionmaker(self.engine)

    async def count(self, model: Any, *where: Any) -> int:
        async with self.sessions() as session:
            statement = select(func.count()).select_from(model).where(*where)
            return int(await session.scalar(statement) or 0)

    async def saga_states(self, saga_ids: list[uuid.UUID]) -> Counter[str]:
        async with self.sessions() as session:
            rows = await session.scalars(select(Saga.state).where(Saga.id.in_(saga_ids)))
            return Counter(str(state) for state in rows)

    async def log(self, saga_id: uuid.UUID) -> Counter[tuple[str, str]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(SagaLogEntry.node_name, SagaLogEntry.event).where(
                    SagaLogEntry.saga_id == saga_id
                )
            )
            return Counter((node, str(event)) for node, event in rows)


async def test_the_leader_of_nexus_events_killed_under_parked_sagas(
    rabbitmq_cluster: PrivateRabbitMQCluster, tmp_path: Path
) -> None:
    cluster = rabbitmq_cluster
    crucible_ids = [uuid.uuid4() for _ in range(3)]
    sled_id = uuid.uuid4()
    access = Access.generate(
        f"cluster-{uuid.uuid4().hex[:8]}", crucible_agents=crucible_ids, sleds=[sled_id]
    )
    # Definitions once, through one node: users, grants and queues are the cluster's.
    provision(access, cluster.rabbitmqctl)
    vhost = access.vhost
    names = sorted(node.name for node in cluster.nodes)
    declared = queues(cluster, vhost)
    assert len(declared) == 2 + 1 + len(crucible_ids) + 1, declared  # nexus, DLQ, agents
    for queue in declared.values():
        assert (queue["type"], queue["durable"]) == ("quorum", True), queue
        assert sorted(queue["members"]) == names, queue

    leader = cluster.node_named(declared[NEXUS_EVENTS_QUEUE]["leader"])
    survivors = [node for node in cluster.nodes if node is not leader]
    urls = cluster.urls
    # Every service's list begins at the leader: all of them must fail over, to the
    # next node of the list (then, when that one stops, to the last).
    via_leader = starting_at(urls, leader)
    _, second, third = [cluster_node_at(cluster, url) for url in broker_urls(via_leader)]
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
    await upgrade_async(database_url)
    replicas = [
        nexus(
            f"replica-{name}",
            database_url=database_url,
            amqp_url=access.url(via_leader, NEXUS_USER),
            workdir=tmp_path,
        )
        for name in ("a", "b")
    ]
    agents = [
        crucible(
            access.url(via_leader, crucible_user(agent_id)),
            tmp_path,
            agent_id=agent_id,
            create_delay="uniform:1,3",
        )
        for agent_id in crucible_ids
    ]
    sled_agent = sled(access.url(via_leader, sled_user(sled_id)), tmp_path, sled_id=sled_id)
    services: list[Service] = [
        *replicas,
        *(agent.service for agent in agents),
        sled_agent.service,
    ]
    clients = {f"nexus/replica-{name}" for name in ("a", "b")}
    clients |= {f"crucible-agent/{agent_id}" for agent_id in crucible_ids}
    clients |= {f"sled-agent/{sled_id}"}
    books = Books(database_url)
    # The test's own client is on the node that is never stopped, and so watches the
    # failovers rather than going through one itself.
    observer_url = access.url(starting_at(urls, third), CLI_USER)
    async with Transport(observer_url, name="test-observer") as transport:
        api = ApiClient(transport)
        for service in services:
            service.start()
        try:

            async def ready() -> bool:
                if await books.count(Dataset) < len(crucible_ids):
                    return False
                return clients <= set(connections(cluster, vhost))

            await until(ready, READY_SECONDS, "every agent known, every client connected")
            before = connections(cluster, vhost)
            assert {name: before[name] for name in clients} == {
                name: [leader.port] for name in clients
            }, before

            accepted = [await api.create_disk(f"disk-{index}") for index in range(DISKS)]
            saga_ids = [reply.saga_id for reply in accepted]
            for saga_id in saga_ids:
                await api.saga_in(saga_id, {"waiting"})

            async def first_regions_created() -> bool:
                return await books.count(Region, Region.state == "created") > 0

            await until(first_regions_created, READY_SECONDS, "the first regions created")
            leader.kill()
            killed_at = time.monotonic()
            created_at_kill = await books.count(Region, Region.state == "created")
            parked_at_kill = (await books.saga_states(saga_ids))["waiting"]
            assert created_at_kill < REGIONS, "every region was created before the kill"
            assert parked_at_kill > 0, "no saga was parked at the kill"

            # Every client reconnects, to a node that is still there.
            async def reconnected() -> bool:
                return all(
                    "reconnected to the broker node at" in service.log_text()
                    for service in services
                )

            await until(reconnected, RECOVERY_SECONDS, "every client reconnected")
            after = connections(cluster, vhost)
            survivor_ports = {node.port for node in survivors}
            for name in clients:
                assert len(after.get(name, [])) == 1, (name, after)
                assert after[name][0] in survivor_ports, (name, after)
            for service in services:
                ports = re.findall(
                    r"reconnected to the broker node at 127\.0\.0\.1:(\d+)", service.log_text()
                )
                assert ports and int(ports[-1]) in survivor_ports, (service.name, ports)

            async def all_done() -> bool:
                states = await books.saga_states(saga_ids)
                assert not set(states) - {"waiting", "running", "done"}, states
                return states["done"] == DISKS

            await until(all_done, RECOVERY_SECONDS, "every saga done")
            recovered_in = time.monotonic() - killed_at

            # The quorum queues elected leaders among the survivors.
            left = queues(cluster, vhost)
            assert left[NEXUS_EVENTS_QUEUE]["leader"] in {node.name for node in survivors}
            assert sorted(left[NEXUS_EVENTS_QUEUE]["online"]) == sorted(
                node.name for node in survivors
            )

            # nexusctl, given the dead node first, connects to a live one; the books
            # balance: every disk has its three regions, each held once by its agent.
            doctor = await asyncio.to_thread(
                subprocess.run,
                [str(BIN / "nexusctl"), "doctor"],
                env={**os.environ, "NEXUS_AMQP_URL": access.url(via_leader, CLI_USER)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert doctor.returncode == 0, doctor.stdout + doctor.stderr

            # The node comes back and rejoins, its queue members with it.
            leader.start()
            await asyncio.to_thread(cluster.await_running, cluster.nodes)

            async def member_back() -> bool:
                online = queues(cluster, vhost)[NEXUS_EVENTS_QUEUE]["online"]
                return sorted(online) == names

            await until(member_back, RECOVERY_SECONDS, "the restarted node's member online")
            # A second failover, from a node stopped cleanly (a rolling restart): the
            # clients, all on the second node of their list by now, move to the third.
            more = [await api.create_disk(f"after-{index}") for index in range(2)]
            for reply in more:
                await api.saga_in(reply.saga_id, {"waiting"})
            second.stop()

            async def on_third() -> bool:
                now = connections(cluster, vhost)
                return all(now.get(name) == [third.port] for name in clients)

            await until(on_third, RECOVERY_SECONDS, "every client on the third node")
            for reply in more:
                view = await api.saga_in(reply.saga_id, {"done", "undone", "stuck"}, 60)
                assert view.state == "done", view.error
            second.start()
            await asyncio.to_thread(cluster.await_running, cluster.nodes)
        finally:
            for service in services:
                await service.stop()
    for service in services:
        assert service.exits == [0], (service.name, service.log_text()[-3000:])

    # Each saga resumed each of its region waits exactly once, and ran nothing twice.
    for saga_id in saga_ids:
        log = await books.log(saga_id)
        for node in WAIT_NODES:
            assert log[(node, "resumed")] == 1, (saga_id, node, log)
        succeeded = {node: n for (node, event), n in log.items() if event == "succeeded"}
        assert all(n == 1 for n in succeeded.values()), (saga_id, log)
        assert not [key for key in log if key[1] in {"failed", "undo_started"}], log
    assert await books.count(Disk, Disk.state == "detached") == DISKS + 2
    assert await books.count(Region, Region.state == "created") == 3 * (DISKS + 2)
    dead_letters = queues(cluster, vhost)[DEAD_LETTER_QUEUE]["messages"]
    assert dead_letters == 0, "messages were dead-lettered"
    await books.engine.dispose()
    print(f"recovered in {recovered_in:.1f}s; {created_at_kill}/{REGIONS} regions at the kill")
