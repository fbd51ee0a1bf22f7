"""Chaos with node loss: the books balance when a node of a replicated server is lost.

The classic chaos test (``test_chaos.py``) stops and kills single servers; here the
servers are replicated and a node of one is lost while the workload runs (issue #17):

- **the database primary**: 3 Nexus replicas on a PostgreSQL of 3 nodes under Patroni
  (synchronous standby; Nexus on a multi-host address with
  ``target_session_attrs=read-write``). The primary's machine is lost (Patroni and
  postmaster SIGKILLed at once) while disk creates, deletes and instance lifecycles run;
  Patroni promotes the standby; the lost node starts again later and rejoins.

No service is SIGKILLed between the node faults: each run is about its fault. The
audit is the classic one (``settle_and_check``): 0 operations lost, ``nexusctl doctor``
exit 0, the dead-letter queue empty, no request answered with Nexus's own error; and
the report gives the wake overhead during the failovers and outside them.

Short by default (``--chaos-operations``, 36 disk creates); the long run and its
figures: RELIABILITY.md, "Node loss".
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus.db.migrate import upgrade_async
from tests.chaos.driver import Fault, FaultPlan
from tests.chaos.machine import MountFailed
from tests.chaos.rack import Rack, RackSettings, build_rack, unprovision
from tests.chaos.test_chaos import assert_books_balance, run_chaos
from tests.harness.servers import PatroniPostgres, RabbitMQServer

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

# Three replicas, as Omicron runs Nexus (NEXUS_REDUNDANCY); a region deadline longer
# than a failover (~10 s: Patroni's ttl), so most waits are woken by their event.
SETTINGS = RackSettings(nexus_replicas=3, region_deadline_seconds=20.0)


@pytest.fixture
async def ha_rack(
    restartable_rabbitmq: RabbitMQServer,
    ha_postgres: PatroniPostgres,
    tmp_path: Path,
    chaos_seed: int,
) -> AsyncIterator[Rack]:
    database_url = ha_postgres.create_database()
    await upgrade_async(database_url)
    built = build_rack(
        restartable_rabbitmq, ha_postgres, database_url, tmp_path / "rack", chaos_seed, SETTINGS
    )
    try:
        try:
            built.mount_disks()
        except MountFailed as exc:
            pytest.fail(str(exc), pytrace=False)
        built.start_all()
        await built.wait_until_ready()
        yield built
    finally:
        await built.stop_all()
        built.unmount_disks()
        for node in ha_postgres.nodes:
            if node.log_path.exists():
                shutil.copyfile(node.log_path, built.logs_dir / f"{node.name}.log")
        unprovision(built)


async def test_the_books_balance_when_the_database_primary_is_lost(
    ha_rack: Rack,
    chaos_seed: int,
    chaos_operations: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = FaultPlan(forced=frozenset({Fault.DB_PRIMARY_KILL}), process_kills=False, chances={})
    run = await run_chaos(ha_rack, plan, chaos_seed, chaos_operations, capsys)
    assert_books_balance(ha_rack, run)
    assert len(run.driver.failovers) == 1
    wakes = run.report["wake_ms"]
    assert isinstance(wakes, dict) and wakes["outside_failovers"] is not None
