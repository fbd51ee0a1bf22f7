"""Prometheus metrics every process shares: the message path, and serving ``/metrics``.

Each process (a Nexus replica, a crucible agent, a sled agent) keeps its metrics in a
``CollectorRegistry`` of its own, never prometheus_client's global one, so that tests and
benchmarks that run several apps in one process do not mix their figures. It serves the
registry over HTTP when its settings give a metrics port (``*_METRICS_PORT``; 0 picks a
free one, which the process logs and writes to ``*_METRICS_ADDRESS_FILE``).

The hot path only observes in memory (a counter increment, a histogram bucket):
nothing here queries a database or the broker per message. Figures that live in a
database (objects by state, outbox depth) are read at scrape time through a
:class:`Refresh`, at most once per its interval however often Prometheus scrapes.

Times that cross processes (a command's relay time: the envelope's ``occurred_at``,
written by the sender's clock, to the receiver's clock when it arrives) are only as
good as the two clocks agree; on one machine they are one clock. A negative difference
(the receiver's clock behind) is counted as 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from schemas.base import Envelope, utcnow
from schemas.tasks import Throttle

log = logging.getLogger(__name__)

# Bucket bounds in seconds. Latencies of the event path: a millisecond to tens of seconds
# (a command that sat in an outbox through a broker outage lands in the last ones).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# How long a request for /metrics may take to arrive, and its headers at most.
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 16 * 1024
# How long a scrape waits for the figures of a database before it serves the last ones
# (under Prometheus's default scrape timeout, 10 s, and compose's, 4 s).
READ_TIMEOUT_SECONDS = 2.0
# How often a read that keeps failing (the database is down) is logged again.
READ_FAILURE_LOG_SECONDS = 60.0


def new_registry(service: str, instance: str) -> CollectorRegistry:
    """A registry of this process's own, with the process's CPU, memory and file
    descriptors (``process_*``), the Python version, and who the process is."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info(
        "eventplane_service", "Which service this process is, and its id.", registry=registry
    ).info({"service": service, "id": instance})
    return registry


def seconds_between(earlier: datetime, later: datetime) -> float:
    """``later - earlier`` in seconds, 0 when clocks disagree so far that it is negative."""
    return max(0.0, (later - earlier).total_seconds())


class MessageMetrics:
    """What the transport sees of the messages a process consumes.

    ``eventplane_command_relay_seconds``: a command's ``occurred_at`` (when its sender
    made it: for Nexus, in the saga node that parked on it, before the node's transaction
    committed and the outbox relay published it) to its first delivery here, by type.
    At an agent this is the command relay time (node parked -> command received).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.relay = Histogram(
            "eventplane_command_relay_seconds",
            "From a command's occurred_at (made by its sender, e.g. a saga node) to its "
            "first delivery to this process's consumer.",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.handled = Counter(
            "eventplane_messages_handled_total",
            "Messages consumed, by type and outcome: ok (acked after the handler), "
            "requeued (the handler failed), dead_lettered (refused).",
            ["type", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "eventplane_dead_letters_total",
            "Messages this process dead-lettered, by reason.",
            ["reason"],
            registry=registry,
        )
        self.redeliveries = Counter(
            "eventplane_redeliveries_total",
            "Messages delivered here again (the broker's redelivered flag), by type.",
            ["type"],
            registry=registry,
        )

    def received(self, message: Envelope, redelivered: bool) -> None:
        """A message arrived; its relay time counts only at its first delivery."""
        if redelivered:
            self.redeliveries.labels(message.TYPE).inc()
        elif message.IS_COMMAND:
            self.relay.labels(message.TYPE).observe(seconds_between(message.occurred_at, utcnow()))

    def outcome(self, message_type: str, outcome: str) -> None:
        self.handled.labels(message_type, outcome).inc()

    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()


class Refresh:
    """Runs ``read`` (a database query for gauges) at most once per ``interval`` seconds.

    Called before every scrape: a scrape within ``interval`` of the last read serves
    what that read found, and concurrent scrapes share one read. A read that fails or
    takes longer than ``timeout`` (the database is down) is logged, at most once a
    minute, and the previous figures are served.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[None]],
        interval: float,
        *,
        timeout: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        self._read = read
        self._interval = interval
        self._timeout = timeout
        self._last: float | None = None
        self._lock = asyncio.Lock()
        self._throttle = Throttle(READ_FAILURE_LOG_SECONDS)

    async def __call__(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < self._interval:
                return
            try:
                async with asyncio.timeout(self._timeout):
                    await self._read()
            except Exception as error:  # a scrape shows the last figures, never fails
                if self._throttle("read"):
                    log.warning("serving the last figures for /metrics: %r", error)
            self._last = time.monotonic()


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on asyncio: the registry in Prometheus's text format.

    A few lines of asyncio rather than prometheus_client's threaded WSGI server: the
    scrape runs on the service's own event loop, so :class:`Refresh` can await the
    service's database without a second loop or thread.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int, address_file: Path | None = None) -> str:
        """Listen on ``host:port`` (0: a free port); returns and logs the URL, and writes
        it to ``address_file`` if one is given."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        url = self.url
        if address_file is not None:
            write_address_file(address_file, url)
        log.info("serving metrics at %s", url, extra={"metrics_url": url})
        return url

    @property
    def url(self) -> str:
        assert self.address is not None, "not started"
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = await self._answer(head)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sent no complete request gets nothing
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > MAX_REQUEST_BYTES:
            return "431 Request Header Fields Too Large", b"", "text/plain"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request_line) < 2 or request_line[0] != "GET":
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        path = request_line[1].split("?", 1)[0]
        if path not in {"/metrics", "/"}:
            return "404 Not Found", b"GET /metrics\n", "text/plain"
        if self._refresh is not None:
            await self._refresh()
        return "200 OK", generate_latest(self._registry), CONTENT_TYPE_LATEST


def write_address_file(path: Path, url: str) -> None:
    """``url`` and a newline in ``path``, replaced whole (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(url + "\n")
    os.replace(partial, path)


async def serve_metrics(
    registry: CollectorRegistry,
    *,
    host: str,
    port: int | None,
    address_file: Path | None,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> MetricsServer | None:
    """A started :class:`MetricsServer`, or None when ``port`` is None (metrics off)."""
    if port is None:
        return None
    server = MetricsServer(registry, refresh)
    await server.start(host, port, address_file)
    return server
