"""The composition root: builds the real adapters from settings and runs the agent.

Start-up order matters: the state database is opened and unfinished work resumed
*before* the broker is reached, so a broker outage at start delays notifications (they
wait in the outbox) but not the file work. Commands are consumed only once the relay
runs and the start-up announcement is queued.

The relay and the announcer run under one :class:`schemas.tasks.Tasks`: a pass that
fails is logged and run again after a backoff. Region work that fails on an error that
is not transient ends the agent (it resumes the work at its next start). The health
file is touched only while the relay and the announcer complete their passes, the
broker connection is up and nothing has been failing on a transient error for long.

Shutdown (``stop`` set, by SIGTERM or SIGINT): background work stops at a safe point (it
resumes at the next start), the outbox gets a few seconds to drain, the connection
closes (unacked commands go back to the queue), and the store closes once no handler is
left using it.

Waits use ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can
swallow a cancellation that arrives as its inner wait completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from crucible_agent.metrics import REFRESH_SECONDS, CrucibleMetrics
from crucible_agent.service import Faults, RegionService
from crucible_agent.settings import CrucibleSettings
from crucible_agent.space import SpaceReserve
from crucible_agent.store import AgentStore
from schemas.health import report_health
from schemas.metrics import MetricsServer, Refresh, serve_metrics
from schemas.outbox import OutboxRelay
from schemas.tasks import Tasks
from schemas.topology import crucible_queue
from schemas.transport import Transport

log = logging.getLogger(__name__)

CONNECT_RETRY_SECONDS = 1.0
DRAIN_SECONDS = 5.0
HANDLERS_SECONDS = 10.0
COMMAND_PREFETCH = 16
HEALTH_SECONDS = 5.0
# How much longer than ``announce_seconds`` an announcer's pass may take.
ANNOUNCE_GRACE_SECONDS = 15.0
# A command or region work failing on a transient error for this long: the agent cannot
# do its work.
STUCK_SECONDS = 30.0


@dataclass
class Agent:
    settings: CrucibleSettings
    store: AgentStore
    transport: Transport
    relay: OutboxRelay
    service: RegionService
    tasks: Tasks
    metrics: CrucibleMetrics


async def build(
    settings: CrucibleSettings,
    *,
    store_class: type[AgentStore] = AgentStore,
    service_class: type[RegionService] = RegionService,
) -> Agent:
    """The agent's parts from its settings; the benchmark's long poll passes subclasses
    of the store and the service that watch for changes (bench/longpoll.py)."""
    reserve = SpaceReserve(settings.space_reserve_path, settings.space_reserve_bytes)
    store = await store_class.open(settings.database_path, reserve=reserve)
    metrics = CrucibleMetrics(str(settings.agent_id))
    transport = Transport(
        settings.amqp_url,
        name=f"crucible-agent/{settings.agent_id}",
        metrics=metrics.messages,
    )
    relay = OutboxRelay(store, transport)
    service = service_class(
        agent_id=settings.agent_id,
        sled_id=settings.sled_id,
        capacity_bytes=settings.capacity_bytes,
        coalesce_seconds=settings.announce_coalesce_seconds,
        store=store,
        files=settings.region_files(),
        relay=relay,
        replier=transport,
        faults=Faults(
            delay=settings.delay,
            clone_delay=settings.clone_extra_delay,
            clone_seconds_per_gib=settings.clone_seconds_per_gib,
            fail_fraction=settings.fail_fraction,
            crash_mid_create_fraction=settings.crash_mid_create_fraction,
            destroy_fail_fraction=settings.destroy_fail_fraction,
        ),
        rng=random.Random(settings.seed),
        reserve=reserve,
        workers=settings.workers,
    )
    metrics.watch(store, lambda: len(service.taken()))
    return Agent(settings, store, transport, relay, service, Tasks(), metrics)


async def run(settings: CrucibleSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set; raises if a part of the agent failed."""
    await serve(await build(settings), stop)


async def serve(agent: Agent, stop: asyncio.Event) -> None:
    """Run ``agent`` (from :func:`build`) until ``stop`` is set; raises if a part failed."""
    settings, tasks = agent.settings, agent.tasks
    log.info(
        "crucible agent %s starting: %s, capacity %d bytes",
        settings.agent_id,
        settings.data_dir,
        settings.capacity_bytes,
    )
    await agent.service.resume()
    relay_task: asyncio.Task[None] | None = None
    announce_task: asyncio.Task[None] | None = None
    health_task: asyncio.Task[None] | None = None
    metrics_server: MetricsServer | None = None
    failed_task = asyncio.create_task(agent.service.failed(), name="region-work")
    try:
        if not await _connect(agent.transport, stop):
            return
        queue = crucible_queue(settings.agent_id)
        await agent.transport.ensure_topology(queue)
        relay_task = tasks.run("outbox-relay", agent.relay.run_pass, window=agent.relay.pass_window)
        await agent.transport.consume(queue, agent.service.handle, prefetch=COMMAND_PREFETCH)
        announce_task = tasks.run(
            "announcer",
            functools.partial(_announce_after, agent.service, settings.announce_seconds, stop),
            window=settings.announce_seconds + ANNOUNCE_GRACE_SECONDS,
            until=stop,
        )
        _watch(tasks, agent)
        metrics_server = await serve_metrics(
            agent.metrics.registry,
            host=settings.metrics_host,
            port=settings.metrics_port,
            address_file=settings.metrics_address_file,
            refresh=Refresh(agent.metrics.read, REFRESH_SECONDS),
        )
        if settings.health_file is not None:
            health_task = asyncio.create_task(
                _report_health(settings.health_file, tasks), name="health"
            )
        log.info("consuming %s", queue)
        await _until_stopped_or_failed(stop, relay_task, announce_task, failed_task)
        log.info("stopping")
    finally:
        if metrics_server is not None:
            await metrics_server.stop()
        if health_task is not None:
            # A stopping agent is no longer healthy: the file ages from here on.
            health_task.cancel()
            await asyncio.gather(health_task, return_exceptions=True)
        failed_task.cancel()
        await asyncio.gather(failed_task, return_exceptions=True)
        await _shut_down(agent, stop, relay_task, announce_task)


async def _connect(transport: Transport, stop: asyncio.Event) -> bool:
    """Connect, retrying while the broker is unreachable; False if stopped meanwhile."""
    while not stop.is_set():
        try:
            await transport.connect(timeout=10.0)
            return True
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as error:
            log.warning("broker unreachable, retrying in %.0fs: %r", CONNECT_RETRY_SECONDS, error)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_RETRY_SECONDS):
                await stop.wait()
    return False


def _watch(tasks: Tasks, agent: Agent) -> None:
    """What the agent's health depends on besides its tasks: the broker connection and
    its consumer, and region work that keeps failing on a transient error."""
    tasks.watch("broker", lambda: agent.transport.health_problem(stuck_after=STUCK_SECONDS))
    tasks.watch("region work", lambda: agent.service.work_problem(stuck_after=STUCK_SECONDS))


async def _announce_after(service: RegionService, seconds: float, stop: asyncio.Event) -> None:
    """One pass of the announcer: ``seconds`` (or until stopped), then an announcement."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    if not stop.is_set():
        await service.announce()


async def _report_health(path: Path, tasks: Tasks) -> None:
    """``crucible-agent health`` reads the age of ``path``; touched while all is well."""
    await report_health(path, tasks.problems, HEALTH_SECONDS)


async def _until_stopped_or_failed(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        return
    for task in done:
        # Before a stop these only end by failing (supervised loops: by being
        # cancelled); the process must not run on without them.
        if task.cancelled():
            raise RuntimeError(f"{task.get_name()} was cancelled")
        task.result()
        raise RuntimeError(f"{task.get_name()} ended unexpectedly")


async def _shut_down(
    agent: Agent,
    stop: asyncio.Event,
    relay_task: asyncio.Task[None] | None,
    announce_task: asyncio.Task[None] | None,
) -> None:
    # Also when a part failed: the announcer and the background work end on this.
    stop.set()
    await agent.service.stop()
    if announce_task is not None:
        await asyncio.gather(announce_task, return_exceptions=True)
    if relay_task is not None and not relay_task.done():
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await agent.relay.wait_drained()
        except TimeoutError:
            log.warning("outbox not drained in %.0fs; it is sent at the next start", DRAIN_SECONDS)
    await agent.transport.close()
    try:
        async with asyncio.timeout(HANDLERS_SECONDS):
            await agent.service.wait_idle()
    except TimeoutError:
        log.warning("a command handler did not finish; its command is redelivered")
    if relay_task is not None:
        # The relay only ends by cancellation; a failure it ended with was raised already.
        relay_task.cancel()
        await asyncio.gather(relay_task, return_exceptions=True)
    await agent.store.close()
    log.info("stopped")
