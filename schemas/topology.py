"""Names on the broker: exchanges, queues and how they are bound.

Why they are as they are: docs/design.md, "Broker topology".
"""

from __future__ import annotations

import re
import uuid
from typing import Final

COMMANDS_EXCHANGE: Final = "control.commands"  # direct: routing key = target queue
EVENTS_EXCHANGE: Final = "control.events"  # topic: region.<state>, instance.<state>, ...
DEAD_LETTER_EXCHANGE: Final = "control.dead-letters"  # fanout
DEAD_LETTER_QUEUE: Final = "control.dead-letters"
# direct: routing key = the requester's reply queue. Replies do not go through the
# default exchange, whose write permission would let an agent publish to any queue
# (nexus.api among them).
REPLIES_EXCHANGE: Final = "control.replies"

# A requester's reply queue (exclusive to its connection, bound to control.replies under
# its own name) is named after the requester's broker user: a consumer answers a request
# only when its reply_to names a reply queue of the user who sent it.
REPLY_QUEUE_PREFIX: Final = "reply."

NEXUS_EVENTS_QUEUE: Final = "nexus.events"  # shared by every Nexus replica
NEXUS_API_QUEUE: Final = "nexus.api"

# What Nexus consumes from the agents; its own progress events are for watchers only.
NEXUS_EVENT_BINDINGS: Final = (
    # Not region.requested: Nexus placed the region itself and waits on none of these.
    "region.created",
    "region.failed",
    "region.tombstoned",
    "region.destroyed",
    # Snapshots and the read-only downstairs serving them (schemas.snapshot): Nexus
    # checks who sent them; the snapshot sagas (issue #15) will wait on them.
    "region_snapshot.*",
    "running_snapshot.*",
    "instance.*",
    "sled.*",
    "agent.*",
    "command.rejected",
)

# A message redelivered this many times (its handler keeps failing) is dead-lettered
# by the quorum queue itself rather than blocking the queue forever.
DELIVERY_LIMIT: Final = 20

# Headers a dead-lettered message carries, besides RabbitMQ's own ``x-death``.
REASON_HEADER: Final = "x-rejection-reason"
DETAIL_HEADER: Final = "x-rejection-detail"
ORIGINAL_QUEUE_HEADER: Final = "x-original-queue"
ORIGINAL_ROUTING_KEY_HEADER: Final = "x-original-routing-key"


def crucible_queue(agent_id: uuid.UUID) -> str:
    return f"crucible.{agent_id}"


def sled_queue(sled_id: uuid.UUID) -> str:
    return f"sled.{sled_id}"


def reply_queue(user: str) -> str:
    """A new reply queue name for broker user ``user``: ``reply.<user>.<32 hex digits>``."""
    return f"{REPLY_QUEUE_PREFIX}{user}.{uuid.uuid4().hex}"


def is_reply_queue_of(queue: str, user: str) -> bool:
    """Whether ``queue`` is named as a reply queue of broker user ``user``."""
    prefix = f"{REPLY_QUEUE_PREFIX}{user}."
    return (
        queue.startswith(prefix) and re.fullmatch(r"[0-9a-f]{32}", queue[len(prefix) :]) is not None
    )
