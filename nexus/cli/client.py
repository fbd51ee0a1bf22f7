"""Talking to Nexus: requests on ``nexus.api`` and the progress events of what they start."""

from __future__ import annotations

import re
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from schemas import api
from schemas.base import Envelope
from schemas.redact import describe, redact_url
from schemas.topology import NEXUS_API_QUEUE

if TYPE_CHECKING:
    # aio-pika and every message model come with it: imported when a command connects,
    # so that `nexusctl --help` starts without them.
    from schemas.transport import Handler

ReplyT = TypeVar("ReplyT", bound=Envelope)
OtherT = TypeVar("OtherT", bound=Envelope)

# Everything a --wait follows: saga steps, and Nexus's view of disks and instances.
PROGRESS_KEYS = ("saga.*", "disk.*", "nexus.instance.*")


class ApiFailure(Exception):
    """Nexus answered with an error; ``code`` is stable, the message is for people."""

    def __init__(self, code: api.ErrorCode, message: str) -> None:
        super().__init__(f"{message} ({code.value})")
        self.code = code


class Unreachable(Exception):
    """No broker, or no Nexus replica behind it."""


def cli_source() -> str:
    """``cli/<hostname>``, with whatever a message source may not hold replaced."""
    host = re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())[:100] or "unknown"
    return f"cli/{host}"


class NexusClient:
    """One broker connection for one command: requests, and subscriptions to progress."""

    def __init__(self, amqp_url: str, *, timeout: float) -> None:
        self._amqp_url = amqp_url
        self.timeout = timeout
        self.source = cli_source()
        from schemas.transport import Transport

        self._transport = Transport(amqp_url, name=f"nexusctl {self.source}")

    async def __aenter__(self) -> NexusClient:
        try:
            await self._transport.connect(timeout=self.timeout)
        except Exception as error:
            raise Unreachable(
                f"cannot reach RabbitMQ at {redact_url(self._amqp_url)} ({describe(error)}); "
                "is the stack running (nexusctl dev run-all) and NEXUS_AMQP_URL right?"
            ) from error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._transport.close()

    @overload
    async def call(self, request: Envelope, expected: type[ReplyT], /) -> ReplyT: ...

    @overload
    async def call(
        self, request: Envelope, expected: type[ReplyT], other: type[OtherT], /
    ) -> ReplyT | OtherT: ...

    async def call(self, request: Envelope, *expected: type[Any]) -> Any:
        """The reply to ``request``, one of the ``expected`` types; ApiFailure on an error."""
        from schemas.transport import PublishFailed, RequestTimedOut

        try:
            reply = await self._transport.request(
                request, routing_key=NEXUS_API_QUEUE, timeout=self.timeout
            )
        except RequestTimedOut as error:
            raise Unreachable(
                f"no Nexus replica answered within {self.timeout:g}s; is Nexus running?"
            ) from error
        except PublishFailed as error:
            # The broker returns a request nobody has declared the API queue for.
            reason = describe(error.__cause__ or error)
            raise Unreachable(
                f"could not send {request.TYPE} to Nexus ({reason}); "
                "has a Nexus replica ever connected to this broker?"
            ) from error
        if isinstance(reply, api.ApiError):
            raise ApiFailure(reply.payload.code, reply.payload.message)
        if not isinstance(reply, expected):
            raise ApiFailure(
                api.ErrorCode.INTERNAL, f"Nexus answered {request.TYPE} with {reply.TYPE}"
            )
        return reply

    async def subscribe(self, handler: Handler) -> None:
        """Deliver every progress event to ``handler``; call it before the request it follows."""
        try:
            await self._transport.subscribe(PROGRESS_KEYS, handler)
        except Exception as error:
            raise Unreachable(
                "cannot watch progress events: no Nexus has set up this broker yet "
                f"({type(error).__name__})"
            ) from error
