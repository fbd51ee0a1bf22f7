"""A robust broker connection that fails over between the nodes of a RabbitMQ cluster.

The addresses come from a broker setting (:func:`schemas.brokers.broker_urls`). The
connection goes to the first that accepts it; when it is lost, each reconnection attempt
goes to the next address after the one it lost or could not reach, round the list, and
aio-pika's robust connection restores what it had (channels, the exchanges and queues it
declared, bindings, consumers) on the new node, as it does after a broker restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aio_pika
from aio_pika import RobustConnection
from aio_pika.connection import make_url
from pamqp.common import FieldTable
from yarl import URL

from schemas.brokers import address

log = logging.getLogger(__name__)

# Between two reconnection attempts (aio-pika's default is 5 s, for one address). The
# next attempt goes to another node, which is likely up: no reason to wait long.
RECONNECT_SECONDS = 1.0

# The coroutine of aio-pika's RobustConnection that makes each (re)connection attempt:
# FailoverConnection points it at the next address first. A private name, so the
# version of aio-pika is pinned in pyproject.toml and a unit test checks it is there.
ATTEMPT = "_RobustConnection__connect_transport"


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection over several addresses: every reconnection attempt
    goes to the address after the one it lost or failed to reach."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        addresses: Sequence[URL],
        **kwargs: Any,
    ) -> None:
        if not hasattr(RobustConnection, ATTEMPT):
            raise RuntimeError(
                f"aio-pika {aio_pika.__version__} has no RobustConnection.{ATTEMPT}, which "
                "fail-over between broker nodes relies on; use the version pyproject.toml pins"
            )
        super().__init__(url, loop, **kwargs)
        self.addresses = tuple(addresses)
        self._index = self.addresses.index(url)
        self._attempts = 0

    # The name of the coroutine it replaces: aio-pika calls it as self.__connect_transport().
    async def _RobustConnection__connect_transport(self) -> None:
        if self._attempts:
            self._index = (self._index + 1) % len(self.addresses)
            self.url = self.addresses[self._index]
            log.info("connecting to the broker node at %s", address(str(self.url)))
        self._attempts += 1
        attempt: Callable[[], Coroutine[Any, Any, None]] = getattr(super(), ATTEMPT)
        await attempt()


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    timeout: float,
    heartbeat: int | None,
) -> RobustConnection:
    """A robust connection to the first of ``urls`` that accepts one, failing over to the
    others later (:class:`FailoverConnection`); the last error if none does."""
    properties: FieldTable = {"connection_name": name}
    if len(urls) == 1:
        return await aio_pika.connect_robust(
            urls[0], client_properties=properties, timeout=timeout, heartbeat=heartbeat
        )
    # What connect_robust does with a heartbeat, for each address alike.
    addresses = [make_url(url, heartbeat=heartbeat) for url in urls]
    failure: Exception | None = None
    for url in addresses:
        connection = FailoverConnection(
            url,
            addresses=addresses,
            client_properties=properties,
            reconnect_interval=RECONNECT_SECONDS,
        )
        try:
            await connection.connect(timeout=timeout)
        except Exception as error:
            log.warning("broker node at %s: %r; trying the next", address(str(url)), error)
            await connection.close()
            failure = error
            continue
        return connection
    assert failure is not None, "there is at least one address"
    raise failure
