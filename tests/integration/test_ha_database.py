"""A database that survives its primary: PostgreSQL under Patroni, with a synchronous
standby (``nexus.devstack.patroni``), and Nexus on a multi-host address that connects to
whichever node accepts writes (``target_session_attrs=read-write``).

- Under load (disk creates in flight, sagas parked on their regions, 2 Nexus replicas
  and 3 crucible agents as real processes), the primary's machine is lost: Patroni and
  PostgreSQL SIGKILLed together. Patroni promotes the synchronous standby once the
  leader key expires; every transaction in flight fails and runs again on the new
  primary; every disk create started ends ``done``; no write acknowledged before the
  kill is missing; ``nexusctl doctor`` exits 0; the killed node rejoins as a standby.
  The failover time and the wake overhead during and outside it are printed
  (``-s``) and recorded in RELIABILITY.md.
- A pooled connection that finds its server read-only is dropped, and the error is
  transient.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from nexus.cli.timeline import wakes
from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from schemas import api
from schemas.topology import DEAD_LETTER_QUEUE
from schemas.transient import is_transient
from schemas.transport import Transport
from tests.harness.servers import PatroniPostgres
from tests.integration.test_dependency_outages import datasets, health_command, queue_depth, until
from tests.processes import BIN, ApiClient, crucible, nexus

pytestmark = pytest.mark.integration

# Regions take seconds, so that sagas are parked on them when the primary dies and their
# notifications arrive while no node accepts writes.
CREATE_DELAY = "uniform:1,4"
# Disk creates requested before the kill (parked at the kill) and during the failover.
DISKS_BEFORE = 8
DISKS_DURING = 8
# A create requested while no node accepts writes is answered once one does (Nexus's
# consumer retries the request in place): past the failover (the leader key's ttl, 10 s)
# and the retry backoff's cap (5 s).
REQUEST_TIMEOUT = 60.0
# From the new primary to every saga done, with room for two shared cores.
RECOVERY_SECONDS = 90.0
FAST = {"lease_seconds": "2", "sweep_seconds": "0.2"}


@dataclass
class WriteProbe:
    """Commits one row every ``interval`` through the multi-host address, recording which
    commits were acknowledged and when, so that the test can tell when a new primary
    accepted writes and whether any acknowledged write went missing."""

    url: str
    interval: float = 0.05
    acknowledged: list[tuple[int, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        engine = create_engine(self.url)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("CREATE TABLE probe (id integer PRIMARY KEY)"))
            number = 0
            while not stop.is_set():
                number += 1
                try:
                    async with engine.begin() as connection:
                        await connection.execute(
                            text("INSERT INTO probe (id) VALUES (:id)"), {"id": number}
                        )
                    self.acknowledged.append((number, time.monotonic()))
                except Exception as error:
                    assert is_transient(error), f"a failover error not seen as transient: {error!r}"
                    self.failures.append(type(error).__name__)
                await asyncio.sleep(self.interval)
        finally:
            await engine.dispose()

    def first_after(self, moment: float) -> float | None:
        return next((at for _, at in self.acknowledged if at > moment), None)

    async def missing(self) -> list[int]:
        """Acknowledged writes the (new) primary does not have."""
        engine = create_engine(self.url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(text("SELECT id FROM probe"))
                present = {row[0] for row in rows}
        finally:
            await engine.dispose()
        return [number for number, _ in self.acknowledged if number not in present]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values), 1),
    }


async def test_disk_creates_ride_through_the_primary_killed_and_the_standby_promoted(
    ha_postgres: PatroniPostgres, vhost_url: str, tmp_path: Path
) -> None:
    database_url = ha_postgres.create_database()
    probe = WriteProbe(ha_postgres.create_database())
    await upgrade_async(database_url)
    agents = [crucible(vhost_url, tmp_path, create_delay=CREATE_DELAY) for _ in range(3)]
    replicas = [
        nexus(
            name,
            database_url=database_url,
            amqp_url=vhost_url,
            workdir=tmp_path,
            health_file=str(tmp_path / f"{name}.health"),
            **FAST,
        )
        for name in ("replica-a", "replica-b")
    ]
    stop_probe = asyncio.Event()
    probing: asyncio.Task[None] | None = None
    accepted: list[api.Accepted] = []
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        client = ApiClient(transport)
        for agent in agents:
            agent.service.start()
        for replica in replicas:
            replica.start()
        try:
            for replica in replicas:
                health_file = tmp_path / f"{replica.name.split()[-1]}.health"

                async def healthy(health_file: Path = health_file) -> bool:
                    return (await health_command("nexus", health_file, 3))[0] == 0

                await until(healthy, 60, f"{replica.name} is healthy")

            async def announced() -> bool:
                return await datasets(database_url) == 3

            await until(announced, 30, "the three agents are known")
            probing = asyncio.create_task(probe.run(stop_probe))

            async def create(name: str) -> None:
                request = api.DiskCreate(
                    source="cli/test",
                    payload=api.DiskCreateRequest(project="test", name=name, size_bytes=1 << 30),
                )
                reply = await client.request(request, timeout=REQUEST_TIMEOUT)
                assert isinstance(reply, api.AcceptedReply), reply
                accepted.append(reply.payload)

            await asyncio.gather(*(create(f"before-{index}") for index in range(DISKS_BEFORE)))
            for disk in accepted:
                await client.saga_in(disk.saga_id, {"waiting"}, timeout=30)
            assert probe.acknowledged, "the probe wrote before the kill"

            old_primary = ha_postgres.primary()
            assert old_primary is not None
            killed_at = time.monotonic()
            killed_wall = datetime.now(UTC)
            killed = await asyncio.to_thread(old_primary.crash)
            # Writes acknowledged until now were committed by the old primary (and are
            # on its synchronous standby); the next one is the new primary's.
            gone_at = time.monotonic()
            # Creates requested while no node accepts writes, one every 0.5 s.
            during: list[asyncio.Task[None]] = []
            for index in range(DISKS_DURING):
                during.append(asyncio.create_task(create(f"during-{index}")))
                await asyncio.sleep(0.5)
            new_primary = await asyncio.to_thread(
                ha_postgres.wait_for_primary, 60, other_than=old_primary.name
            )
            promoted_after = time.monotonic() - killed_at

            async def writes_accepted() -> bool:
                return probe.first_after(gone_at) is not None

            await until(writes_accepted, 60, "the new primary accepts the probe's writes")
            first_write = probe.first_after(gone_at)
            assert first_write is not None
            failover_seconds = first_write - killed_at
            failover_ended_wall = datetime.now(UTC)
            await asyncio.gather(*during)

            views = []
            for disk in accepted:
                views.append(
                    await client.saga_in(
                        disk.saga_id, {"done", "undone", "stuck"}, timeout=RECOVERY_SECONDS
                    )
                )
            stop_probe.set()
            await probing
            missing = await probe.missing()

            # The lost machine comes back: its Patroni rewinds it and it follows the
            # new primary as a standby.
            old_primary.start()
            await asyncio.to_thread(ha_postgres.wait_until_replicated, 120)
            members = {m["name"]: m["role"] for m in ha_postgres.members()}

            doctor = await asyncio.create_subprocess_exec(
                str(BIN / "nexusctl"),
                "doctor",
                "--amqp-url",
                vhost_url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            doctor_output = (await doctor.communicate())[0].decode(errors="replace")
            disks = await client.request(
                api.DiskList(source="cli/test", payload=api.ProjectFilter(project="test"))
            )
            dead_letters = await queue_depth(vhost_url, DEAD_LETTER_QUEUE)
            running = [replica.running for replica in replicas]
        finally:
            stop_probe.set()
            if probing is not None:
                await asyncio.gather(probing, return_exceptions=True)
            for replica in replicas:
                await replica.stop()
            for agent in agents:
                await agent.service.stop()

    logs = "\n".join(replica.log_text()[-3000:] for replica in replicas)
    assert new_primary.name != old_primary.name
    assert len(accepted) == DISKS_BEFORE + DISKS_DURING, "every create was answered"
    states = {view.state for view in views}
    assert states == {"done"}, (
        [(v.id, v.state, v.error) for v in views if v.state != "done"],
        logs,
    )
    assert isinstance(disks, api.DiskListReply), disks
    names = {disk.name: disk.state.value for disk in disks.payload}
    assert len(names) == DISKS_BEFORE + DISKS_DURING
    assert set(names.values()) == {"detached"}, names
    assert missing == [], f"acknowledged writes lost in the failover: {missing[:20]}"
    assert doctor.returncode == 0, doctor_output
    assert dead_letters == 0
    assert all(running), logs
    assert replicas[0].exits == [0] and replicas[1].exits == [0], logs
    assert members[old_primary.name] in ("replica", "sync_standby"), members
    assert members[new_primary.name] == "leader", members

    overhead_during: list[float] = []
    overhead_outside: list[float] = []
    for view in views:
        for wake in wakes(view):
            if wake.overhead_ms is None or wake.ready_at_agent is None:
                continue
            in_failover = killed_wall <= wake.ready_at_agent <= failover_ended_wall
            (overhead_during if in_failover else overhead_outside).append(wake.overhead_ms)
    figures = {
        "killed": killed,
        "postmaster_gone_after_s": round(gone_at - killed_at, 2),
        "promoted_after_s": round(promoted_after, 2),
        "failover_s": round(failover_seconds, 2),
        "probe_writes_acknowledged": len(probe.acknowledged),
        "probe_writes_failed": len(probe.failures),
        "probe_failure_kinds": sorted(set(probe.failures)),
        "acknowledged_writes_lost": len(missing),
        "disk_creates": len(accepted),
        "wake_overhead_region_ready_during_failover": summary(overhead_during),
        "wake_overhead_region_ready_outside_failover": summary(overhead_outside),
        "members_after": members,
    }
    print("HA-DATABASE FIGURES " + json.dumps(figures))
    assert overhead_during, "regions became ready while no node accepted writes"


async def test_a_connection_that_finds_its_server_read_only_is_dropped_as_transient(
    ha_postgres: PatroniPostgres,
) -> None:
    """A write on a standby (what a connection to a demoted primary meets): the error is
    transient, and the engine invalidates the connection instead of handing it out
    again, so the next attempt connects afresh."""
    database_url = ha_postgres.create_database()
    standby = next(
        node for node in ha_postgres.nodes if node is not ha_postgres.primary() and node.running
    )
    direct = (
        make_url(database_url)
        .difference_update_query(["host", "target_session_attrs"])
        .set(host="127.0.0.1", port=standby.pg_port)
    )
    engine = create_engine(direct)

    async def replayed() -> bool:
        # A standby has the database once it replayed its creation, moments later.
        try:
            async with engine.connect():
                return True
        except DBAPIError:
            return False

    try:
        await until(replayed, 30, "the standby has the new database")
        async with engine.connect() as connection:
            pid_before = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            with pytest.raises(DBAPIError) as raised:
                await connection.execute(text("CREATE TABLE t (id integer)"))
        assert is_transient(raised.value)
        assert raised.value.connection_invalidated
        async with engine.connect() as connection:
            pid_after = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert pid_after != pid_before, "a new connection, not the one that met a standby"
    finally:
        await engine.dispose()
