"""Who may say what: broker user names per service, and the sources each may claim.

RabbitMQ validates a message's ``user_id`` property against the user of the connection
that published it, so ``user_id`` says who really sent a message. A message's envelope
``source`` says who claims to have sent it; :func:`source_allowed` is the one place that
decides whether the two agree.

Users by role (``nexus.devstack.access`` provisions them):

- ``nexus``: every Nexus replica (sources ``nexus/<replica>``);
- ``nexusctl``: the admin CLI (sources ``cli/<host>``);
- ``crucible-<agent id>``: one crucible agent (source ``crucible/<agent id>`` only);
- ``sled-<sled id>``: one sled agent (source ``sled/<sled id>`` only);
- ``crucible`` / ``sled``: all agents of a kind sharing one user (sources
  ``crucible/...`` / ``sled/...``), for deployments that accept agents reading each
  other's queues.

Agents get a user each so that one agent's credentials can neither read another
agent's queue nor speak in its name. Any other user (the broker's administrator, or
``guest`` on a development broker) is an operator: the broker lets it do anything in
the virtual host anyway, so a source check could not constrain it.

A verified source is an agent's identity, and each agent is commanded on the queue its
identity names (``crucible.<agent id>``, ``sled.<sled id>``): :func:`queue_agent` says
whose a queue is, so only that agent may answer a request sent there. What an agent may
say about which object (only about what Nexus placed on it) is decided by Nexus
(``nexus/events.py``); a message that fails it is dead-lettered with :data:`NOT_OWNER`.
"""

from __future__ import annotations

import uuid
from typing import Final

from schemas.topology import crucible_queue, sled_queue

NEXUS_USER: Final = "nexus"
CLI_USER: Final = "nexusctl"
CRUCIBLE_USER_PREFIX: Final = "crucible-"
SLED_USER_PREFIX: Final = "sled-"

# The role part of the sources a role user may claim; agents may claim only their own.
_ROLE_SOURCE_PREFIX: Final = {
    NEXUS_USER: "nexus/",
    CLI_USER: "cli/",
    "crucible": "crucible/",
    "sled": "sled/",
}
_AGENT_SOURCE_KIND: Final = {CRUCIBLE_USER_PREFIX: "crucible", SLED_USER_PREFIX: "sled"}

# The dead-letter reason of a message about an object its sender does not own, or in
# which an agent speaks for another.
NOT_OWNER: Final = "not_owner"


def crucible_user(agent_id: uuid.UUID) -> str:
    return f"{CRUCIBLE_USER_PREFIX}{agent_id}"


def sled_user(sled_id: uuid.UUID) -> str:
    return f"{SLED_USER_PREFIX}{sled_id}"


def crucible_source(agent_id: uuid.UUID) -> str:
    return f"crucible/{agent_id}"


def sled_source(sled_id: uuid.UUID) -> str:
    return f"sled/{sled_id}"


# Each kind of agent: the queue it is commanded on and the source it speaks as, by id.
_AGENT_KINDS: Final = {
    "crucible": (crucible_queue, crucible_source),
    "sled": (sled_queue, sled_source),
}


def queue_agent(queue: str) -> str | None:
    """The source of the agent commanded on ``queue``, the only one that may answer a
    request sent there; None for a queue that is no agent's."""
    kind, _, agent_id = queue.partition(".")
    if kind not in _AGENT_KINDS or not _is_canonical_uuid(agent_id):
        return None
    queue_of, source_of = _AGENT_KINDS[kind]
    return source_of(uuid.UUID(agent_id)) if queue_of(uuid.UUID(agent_id)) == queue else None


def source_allowed(user: str, source: str) -> bool:
    """Whether a message published by broker user ``user`` may carry ``source``."""
    prefix = _ROLE_SOURCE_PREFIX.get(user)
    if prefix is not None:
        return source.startswith(prefix)
    for user_prefix, kind in _AGENT_SOURCE_KIND.items():
        if user.startswith(user_prefix):
            agent_id = user.removeprefix(user_prefix)
            # A user named like an agent but without a proper id speaks for nobody.
            return _is_canonical_uuid(agent_id) and source == f"{kind}/{agent_id}"
    return True


def _is_canonical_uuid(text: str) -> bool:
    # Only the canonical spelling: uuid.UUID also accepts braces and no hyphens.
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
