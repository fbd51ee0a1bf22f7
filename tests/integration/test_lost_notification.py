"""A notification dropped on purpose is recovered at the deadline by one reconcile query.

Nexus runs in-process (real RabbitMQ, SQLite) with a manual clock; the agents are
played by the test: they take the ensure commands, "create" the regions, answer the
reconcile query truthfully, and never publish the notification.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from nexus.app import NexusApp
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, Disk, Saga, SagaLogEntry
from nexus.saga.clock import ManualClock
from nexus.sagas import disk_create
from nexus.settings import NexusSettings
from schemas.region import (
    Region,
    RegionEnsure,
    RegionFound,
    RegionGet,
    RegionInfo,
    RegionState,
)
from schemas.sled import AgentAnnounced, CrucibleAgentInfo
from schemas.topology import crucible_queue
from schemas.transport import Delivery, Transport

pytestmark = pytest.mark.integration


class SilentAgent:
    """Creates regions at once but drops every notification; answers queries."""

    def __init__(self, transport: Transport) -> None:
        self.agent_id = uuid.uuid4()
        self.transport = transport
        self.regions: dict[uuid.UUID, Region] = {}
        self.requests: Counter[str] = Counter()

    @property
    def queue(self) -> str:
        return crucible_queue(self.agent_id)

    async def on_command(self, delivery: Delivery) -> None:
        message = delivery.message
        self.requests[message.TYPE] += 1
        if isinstance(message, RegionEnsure):
            self.regions[message.payload.id] = Region(
                **message.payload.model_dump(),
                port_number=19000,
                state=RegionState.CREATED,
                generation=2,
            )
        elif isinstance(message, RegionGet):
            reply = RegionInfo(
                source=f"crucible/{self.agent_id}",
                payload=RegionFound(
                    agent_id=self.agent_id,
                    region=self.regions.get(message.payload.id),
                    region_id=message.payload.id,
                ),
                **message.caused(),
            )
            await self.transport.reply(delivery, reply)

    def announcement(self) -> AgentAnnounced:
        return AgentAnnounced(
            source=f"crucible/{self.agent_id}",
            payload=CrucibleAgentInfo(
                agent_id=self.agent_id,
                sled_id=uuid.uuid4(),
                queue=self.queue,
                capacity_bytes=1 << 40,
                free_bytes=1 << 40,
                regions=0,
            ),
        )


@pytest.fixture
async def nexus(vhost_url: str, tmp_path: Path) -> AsyncIterator[tuple[NexusApp, ManualClock]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
    await upgrade_async(url)
    clock = ManualClock()
    app = NexusApp(
        NexusSettings(replica_id="solo", database_url=url, amqp_url=vhost_url), clock=clock
    )
    await app.start(background=False)
    try:
        yield app, clock
    finally:
        await app.stop()


async def test_a_dropped_notification_is_recovered_by_one_reconcile_query(
    nexus: tuple[NexusApp, ManualClock], vhost_url: str
) -> None:
    app, clock = nexus
    assert app.executor is not None and app.sessions is not None and app.relay is not None
    async with Transport(vhost_url, name="silent-agents") as transport:
        agents = [SilentAgent(transport) for _ in range(3)]
        for agent in agents:
            await transport.declare_command_queue(agent.queue)
            await transport.consume(agent.queue, agent.on_command)
            await transport.publish_event(agent.announcement())

        async def announced() -> bool:
            return await dataset_count(app) == 3

        await until(announced)

        params = disk_create.Params(
            disk_id=uuid.uuid4(),
            project="test",
            name="lost",
            size_bytes=1 << 30,
            block_size=512,
            region_deadline_seconds=60,
        )
        saga_id = await app.executor.start(disk_create.DEFINITION, params)

        async def ensured() -> bool:
            return sum(a.requests["region.ensure.v1"] for a in agents) == 3

        await until(ensured)

        clock.advance(timedelta(seconds=59))
        await app.executor.sweep()
        assert sum(a.requests["region.get.v1"] for a in agents) == 0

        clock.advance(timedelta(seconds=2))
        await app.executor.sweep()
        for _ in range(3):
            clock.advance(timedelta(seconds=120))
            await app.executor.sweep()

        asked = [a.requests["region.get.v1"] for a in agents]
        assert asked == [1, 1, 1], "one query per region at its deadline, then no more"
        async with app.sessions() as session:
            saga = await session.get(Saga, saga_id)
            disk = await session.get(Disk, params.disk_id)
            resumes = (
                (
                    await session.execute(
                        select(SagaLogEntry).where(
                            SagaLogEntry.saga_id == saga_id, SagaLogEntry.event == "resumed"
                        )
                    )
                )
                .scalars()
                .all()
            )
        assert saga is not None and saga.state == "done", saga and saga.error
        assert disk is not None and disk.state == "detached"
        assert len(resumes) == 3
        assert all(r.data is not None and r.data["by_reconcile"] for r in resumes)


async def dataset_count(app: NexusApp) -> int:
    assert app.sessions is not None
    async with app.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Dataset)) or 0)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)
