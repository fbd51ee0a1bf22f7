"""The composition root: the real store, transport, relay and agent, run until told to stop.

Order of a start: the database first (recover the instances and apply the restart rule
even when the broker is down), then the broker (retried until it answers), then the
outbox relay, the agent's timers and heartbeats, and last the command consumer.
Order of a stop: a bounded wait for the outbox to drain, then everything is cancelled,
the connection closed and the database closed. Whatever is still unsent stays in the
outbox and leaves at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aio_pika

from schemas.health import report_health
from schemas.outbox import OutboxRelay
from schemas.topology import sled_queue
from schemas.transport import Transport
from sled_agent.service import SledAgent
from sled_agent.settings import SledSettings
from sled_agent.store import SledStore

log = logging.getLogger(__name__)

CONNECT_RETRY_SECONDS = 1.0
DRAIN_SECONDS = 2.0
HEALTH_SECONDS = 5.0


async def serve(settings: SledSettings, shutdown: asyncio.Event) -> None:
    """Run the sled agent until ``shutdown`` is set; raise if a part of it failed."""
    store = SledStore(settings.database_path)
    transport = Transport(settings.amqp_url, name=f"sled-agent/{settings.sled_id}")
    relay = OutboxRelay(store, transport)
    agent = SledAgent(settings, store, transport, relay)
    await store.open()
    try:
        await agent.recover()
        if not await _connect(transport, shutdown):
            return
        queue = sled_queue(settings.sled_id)
        await transport.ensure_topology(queue)
        workers = [
            asyncio.create_task(relay.run(), name="outbox-relay"),
            asyncio.create_task(agent.run(), name="sled-agent"),
        ]
        try:
            await transport.consume(queue, agent.handle)
            if settings.health_file is not None:
                # Never ends by itself: it is cancelled with the other workers.
                workers.append(
                    asyncio.create_task(
                        _report_health(settings.health_file, transport), name="health"
                    )
                )
            log.info("sled %s serving on %s", settings.sled_id, queue)
            stop = asyncio.create_task(shutdown.wait(), name="shutdown")
            await asyncio.wait([stop, *workers], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            log.info("sled %s stopping", settings.sled_id)
            for worker in workers:
                if worker.done():
                    # A worker only ends by failing: let its exception end the process.
                    worker.result()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    await relay.wait_drained()
        finally:
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


async def _report_health(path: Path, transport: Transport) -> None:
    """``sled-agent health`` reads the age of ``path``; touched while the broker is up."""
    await report_health(path, transport, HEALTH_SECONDS)
