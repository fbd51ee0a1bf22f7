"""The composition root: the real store, transport, relay and agent, run until told to stop.

Order of a start: the database first (recover the VMMs and apply the restart rule
even when the broker is down), then the broker (retried until it answers), then the
outbox relay, the agent's timers and heartbeats, and last the command consumer.

The relay and the heartbeats run under one :class:`schemas.tasks.Tasks`: a pass that
fails is logged and run again after a backoff. The health file is touched only while
both complete their passes, the broker connection is up and nothing has been failing
on a transient error for long.
Order of a stop: a bounded wait for the outbox to drain, then everything is cancelled,
the connection closed and the database closed. Whatever is still unsent stays in the
outbox and leaves at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from schemas.health import report_health
from schemas.metrics import Refresh, serve_metrics
from schemas.outbox import OutboxRelay
from schemas.tasks import Tasks
from schemas.topology import sled_queue
from schemas.transport import Transport
from sled_agent.metrics import REFRESH_SECONDS, SledMetrics
from sled_agent.service import SledAgent
from sled_agent.settings import SledSettings
from sled_agent.store import SledStore

log = logging.getLogger(__name__)

CONNECT_RETRY_SECONDS = 1.0
DRAIN_SECONDS = 2.0
HEALTH_SECONDS = 5.0
# How much longer than ``heartbeat_seconds`` a heartbeat's pass may take (a publish may
# wait 10 s for its confirm).
HEARTBEAT_GRACE_SECONDS = 15.0
# A command or a timed transition failing on a transient error for this long: the agent
# cannot do its work.
STUCK_SECONDS = 30.0


@dataclass
class Sled:
    """The parts of a sled agent, built from its settings; nothing connected yet."""

    settings: SledSettings
    store: SledStore
    transport: Transport
    relay: OutboxRelay
    agent: SledAgent
    tasks: Tasks
    metrics: SledMetrics


def build(settings: SledSettings) -> Sled:
    store = SledStore(settings.database_path)
    metrics = SledMetrics(str(settings.sled_id))
    transport = Transport(
        settings.amqp_url, name=f"sled-agent/{settings.sled_id}", metrics=metrics.messages
    )
    relay = OutboxRelay(store, transport)
    agent = SledAgent(settings, store, transport, relay)
    metrics.watch(agent, store)
    return Sled(settings, store, transport, relay, agent, Tasks(), metrics)


async def serve(settings: SledSettings, shutdown: asyncio.Event) -> None:
    """Run the sled agent until ``shutdown`` is set; raise if a part of it failed."""
    await run(build(settings), shutdown)


async def run(sled: Sled, shutdown: asyncio.Event) -> None:
    """Run ``sled`` (from :func:`build`) until ``shutdown`` is set; raise if a part of it
    failed."""
    settings, store, transport, relay, agent, tasks = (
        sled.settings,
        sled.store,
        sled.transport,
        sled.relay,
        sled.agent,
        sled.tasks,
    )
    await store.open()
    try:
        await agent.recover()
        if not await _connect(transport, shutdown):
            return
        queue = sled_queue(settings.sled_id)
        await transport.ensure_topology(queue)
        workers = [
            tasks.run("outbox-relay", relay.run_pass, window=relay.pass_window),
            tasks.run(
                "heartbeats",
                agent.heartbeat,
                window=settings.heartbeat_seconds + HEARTBEAT_GRACE_SECONDS,
            ),
            asyncio.create_task(agent.run(), name="sled-agent"),
        ]
        tasks.watch("broker", lambda: transport.health_problem(stuck_after=STUCK_SECONDS))
        tasks.watch("timed work", lambda: agent.work_problem(stuck_after=STUCK_SECONDS))
        metrics_server = None
        try:
            await transport.consume(queue, agent.handle)
            metrics_server = await serve_metrics(
                sled.metrics.registry,
                host=settings.metrics_host,
                port=settings.metrics_port,
                address_file=settings.metrics_address_file,
                refresh=Refresh(sled.metrics.read, REFRESH_SECONDS),
            )
            if settings.health_file is not None:
                # Never ends by itself: it is cancelled with the other workers.
                workers.append(
                    asyncio.create_task(_report_health(settings.health_file, tasks), name="health")
                )
            log.info("sled %s serving on %s", settings.sled_id, queue)
            stop = asyncio.create_task(shutdown.wait(), name="shutdown")
            await asyncio.wait([stop, *workers], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            log.info("sled %s stopping", settings.sled_id)
            for worker in workers:
                if worker.done():
                    # A worker only ends by failing (a supervised loop: by being
                    # cancelled): let its exception end the process.
                    if worker.cancelled():
                        raise RuntimeError(f"{worker.get_name()} was cancelled")
                    worker.result()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    await relay.wait_drained()
        finally:
            if metrics_server is not None:
                await metrics_server.stop()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await transport.close()
    finally:
        await store.close()
    log.info("sled %s stopped", settings.sled_id)


async def _connect(transport: Transport, shutdown: asyncio.Event) -> bool:
    """Connect, retrying while the broker is unreachable; False if told to stop first."""
    while not shutdown.is_set():
        try:
            await transport.connect(timeout=5.0)
        except (ConnectionError, TimeoutError, aio_pika.exceptions.AMQPError) as error:
            log.warning("broker unreachable, retrying in %.0fs: %r", CONNECT_RETRY_SECONDS, error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONNECT_RETRY_SECONDS):
                    await shutdown.wait()
        else:
            return True
    return False


async def _report_health(path: Path, tasks: Tasks) -> None:
    """``sled-agent health`` reads the age of ``path``; touched while all is well."""
    await report_health(path, tasks.problems, HEALTH_SECONDS)
