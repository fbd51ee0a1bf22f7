"""Least privilege on the broker: the control plane's vhost, a user per service, and the
topology, provisioned by an administrator before the services start.

One source of truth for ``nexusctl dev run-all``, the tests and ``compose.yaml``: an
:class:`Access` renders RabbitMQ definitions (:meth:`Access.definitions`, the JSON that
``rabbitmqctl import_definitions`` and the ``load_definitions`` setting read) and URLs
with each user's credentials (:meth:`Access.url`).

Who may do what (``c``/``w``/``r`` = RabbitMQ's configure/write/read):

- ``nexus`` owns the topology (it re-declares it at start, adding bindings a newer
  version needs): ``c``/``w``/``r`` on the shared exchanges, its own queues, its
  exclusive watch queues and its reply queues (``reply.nexus.<hex>``); nothing on
  agents' queues.
- ``crucible-<id>`` / ``sled-<id>``, one user per agent: ``r`` on its own queue only
  (consume); ``w`` on ``control.events`` (its notifications, and by topic permission
  only under its own routing keys), ``control.replies`` (answers to requests) and
  ``control.dead-letters`` (what its consumer refuses); ``c`` on nothing. So it cannot
  send to ``control.commands`` (no commands, no requests to ``nexus.api``), cannot
  publish through the default exchange (which reaches every queue by name), cannot read
  Nexus's or another agent's queue, and cannot bind its queue to anyone else's traffic:
  its queue and binding are provisioned here, and ``Transport.ensure_topology`` only
  checks that they exist.
- ``nexusctl`` (the admin CLI): ``w`` on ``control.commands`` (requests to Nexus), ``r``
  on ``control.events`` (``--wait`` watches) and ``control.replies``, ``c``/``w``/``r`` on
  its exclusive queues (watches, and replies as ``reply.nexusctl.<hex>``). As an
  operator's tool it could also command an agent directly; the agent then sees a
  ``cli/...`` source from user ``nexusctl``.

A message's ``user_id`` is checked by the broker and its source against the user by the
consumer (:mod:`schemas.identity`), so a user can speak only for itself.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import secrets
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from schemas.identity import CLI_USER, NEXUS_USER, crucible_user, sled_user
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENT_BINDINGS,
    NEXUS_EVENTS_QUEUE,
    REPLIES_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    crucible_queue,
    sled_queue,
)
from schemas.transport import quorum_arguments

VHOST = "control-plane"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
_SALT_BYTES = 4
NOTHING = "^$"

# Exclusive queues of watches: aio-pika's robust queues name themselves amq_<uuid hex>;
# RabbitMQ names a queue left unnamed amq.gen-<...>.
_EXCLUSIVE = r"amq_[0-9a-f]{32}|amq\.gen-[A-Za-z0-9_-]+"
_SHARED_EXCHANGES = (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, REPLIES_EXCHANGE, DEAD_LETTER_EXCHANGE)
_AGENT_PUBLISHES = (EVENTS_EXCHANGE, REPLIES_EXCHANGE, DEAD_LETTER_EXCHANGE)

# Routing keys each kind of agent may publish on control.events (topic permissions).
CRUCIBLE_EVENT_KEYS = (
    r"^((region|region_snapshot|running_snapshot)\.[a-z_]+|agent\.announced|command\.rejected)$"
)
SLED_EVENT_KEYS = (
    r"^(instance\.[a-z_]+|sled\.(registered|heartbeat)|agent\.announced|command\.rejected)$"
)


def _exactly(*names: str, patterns: Iterable[str] = ()) -> str:
    """A permission regex matching exactly ``names`` (escaped) and ``patterns`` (not)."""
    return "^(" + "|".join([*(re.escape(name) for name in names), *patterns]) + ")$"


@dataclass(frozen=True)
class Grant:
    """One user's permissions in the vhost; ``event_keys`` limits its control.events keys."""

    configure: str
    write: str
    read: str
    event_keys: str | None = None


def _reply_queues(user: str) -> str:
    """``user``'s own reply queues (``schemas.topology.reply_queue``), and no one else's:
    Nexus answers a request only on a reply queue named after the user who sent it."""
    return re.escape(f"{REPLY_QUEUE_PREFIX}{user}.") + "[0-9a-f]{32}"


def nexus_grant() -> Grant:
    names = (*_SHARED_EXCHANGES, DEAD_LETTER_QUEUE, NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE)
    # The same set for all three: declaring a queue with a dead-letter exchange takes read
    # on the queue and write on that exchange; binding takes write on the queue and read
    # on the exchange; consuming takes read, publishing write.
    everything_it_owns = _exactly(*names, patterns=[_EXCLUSIVE, _reply_queues(NEXUS_USER)])
    return Grant(everything_it_owns, everything_it_owns, everything_it_owns)


def cli_grant() -> Grant:
    own = [_EXCLUSIVE, _reply_queues(CLI_USER)]
    return Grant(
        configure=_exactly(patterns=own),
        write=_exactly(COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, patterns=own),
        read=_exactly(EVENTS_EXCHANGE, REPLIES_EXCHANGE, patterns=own),
    )


def agent_grant(own_queue: str, event_keys: str) -> Grant:
    return Grant(
        configure=NOTHING,
        write=_exactly(*_AGENT_PUBLISHES),
        read=_exactly(own_queue),
        event_keys=event_keys,
    )


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class Access:
    """The control plane's vhost with its users, their passwords, grants and topology."""

    vhost: str
    crucible_agents: tuple[uuid.UUID, ...] = ()
    sleds: tuple[uuid.UUID, ...] = ()
    passwords: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(
        cls,
        vhost: str = VHOST,
        *,
        crucible_agents: Iterable[uuid.UUID] = (),
        sleds: Iterable[uuid.UUID] = (),
        passwords: Mapping[str, str] | None = None,
    ) -> Access:
        """Users for Nexus, the CLI and each agent; a fresh random password for each user
        that ``passwords`` does not name."""
        access = cls(vhost, tuple(crucible_agents), tuple(sleds))
        given = dict(passwords or {})
        chosen = {user: given.get(user) or secrets.token_urlsafe(24) for user in access.grants()}
        return cls(access.vhost, access.crucible_agents, access.sleds, chosen)

    def grants(self) -> dict[str, Grant]:
        grants = {NEXUS_USER: nexus_grant(), CLI_USER: cli_grant()}
        grants |= {
            crucible_user(agent): agent_grant(crucible_queue(agent), CRUCIBLE_EVENT_KEYS)
            for agent in self.crucible_agents
        }
        grants |= {
            sled_user(sled): agent_grant(sled_queue(sled), SLED_EVENT_KEYS) for sled in self.sleds
        }
        return grants

    def url(self, base_url: str, user: str) -> str:
        """``base_url`` (any scheme, host, port, query) as ``user`` in this vhost."""
        parts = urlsplit(base_url)
        host = parts.netloc.rpartition("@")[2]
        credentials = f"{quote(user, safe='')}:{quote(self.passwords[user], safe='')}"
        return urlunsplit(
            parts._replace(netloc=f"{credentials}@{host}", path="/" + quote(self.vhost, safe=""))
        )

    def definitions(self) -> dict[str, Any]:
        """RabbitMQ definitions: vhost, users (password hashes), permissions, topology."""
        grants = self.grants()
        return {
            "vhosts": [{"name": self.vhost}],
            "users": [
                {
                    "name": user,
                    "password_hash": password_hash(self.passwords[user]),
                    "hashing_algorithm": HASHING_ALGORITHM,
                    "tags": [],
                }
                for user in grants
            ],
            "permissions": [
                {
                    "user": user,
                    "vhost": self.vhost,
                    "configure": grant.configure,
                    "write": grant.write,
                    "read": grant.read,
                }
                for user, grant in grants.items()
            ],
            "topic_permissions": [
                {
                    "user": user,
                    "vhost": self.vhost,
                    "exchange": EVENTS_EXCHANGE,
                    "write": grant.event_keys,
                    "read": NOTHING,
                }
                for user, grant in grants.items()
                if grant.event_keys is not None
            ],
            **self._topology(),
        }

    def _topology(self) -> dict[str, list[dict[str, Any]]]:
        """What ``Transport.declare_topology`` and ``declare_command_queue`` declare, with
        the same arguments (a re-declaration by Nexus must be equivalent)."""
        kinds = {
            COMMANDS_EXCHANGE: "direct",
            EVENTS_EXCHANGE: "topic",
            REPLIES_EXCHANGE: "direct",
            DEAD_LETTER_EXCHANGE: "fanout",
        }
        queues: dict[str, dict[str, Any]] = {DEAD_LETTER_QUEUE: quorum_arguments(dead_letter=False)}
        bindings = [(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, "")]
        agent_queues = [crucible_queue(a) for a in self.crucible_agents]
        agent_queues += [sled_queue(s) for s in self.sleds]
        for name in (NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE, *agent_queues):
            queues[name] = quorum_arguments()
        bindings += [(EVENTS_EXCHANGE, NEXUS_EVENTS_QUEUE, key) for key in NEXUS_EVENT_BINDINGS]
        bindings += [(COMMANDS_EXCHANGE, name, name) for name in (NEXUS_API_QUEUE, *agent_queues)]
        return {
            "exchanges": [
                {
                    "name": name,
                    "vhost": self.vhost,
                    "type": kind,
                    "durable": True,
                    "auto_delete": False,
                    "internal": False,
                    "arguments": {},
                }
                for name, kind in kinds.items()
            ],
            "queues": [
                {
                    "name": name,
                    "vhost": self.vhost,
                    "durable": True,
                    "auto_delete": False,
                    "arguments": arguments,
                }
                for name, arguments in queues.items()
            ],
            "bindings": [
                {
                    "source": source,
                    "vhost": self.vhost,
                    "destination": destination,
                    "destination_type": "queue",
                    "routing_key": key,
                    "arguments": {},
                }
                for source, destination, key in bindings
            ],
        }


def provision(access: Access, rabbitmqctl: Callable[..., str]) -> None:
    """Load ``access`` into the broker that ``rabbitmqctl(*args)`` administers.

    Idempotent: a second run updates passwords and grants and keeps what exists. The
    definitions hold password hashes only, still the file is private and short-lived.
    """
    with tempfile.TemporaryDirectory(prefix="eventplane-access-") as directory:
        path = Path(directory) / "definitions.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps(access.definitions()))
        rabbitmqctl("import_definitions", str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nexus.devstack.access",
        description="Print RabbitMQ definitions for the control plane (least privilege). "
        "Passwords come from a JSON file {user: password}; users it does not name get a "
        "random one, written back to it (keep it private).",
    )
    parser.add_argument("--vhost", default=VHOST)
    parser.add_argument("--crucible", type=uuid.UUID, action="append", default=[])
    parser.add_argument("--sled", type=uuid.UUID, action="append", default=[])
    parser.add_argument("--passwords", type=Path, required=True, metavar="FILE")
    args = parser.parse_args(argv)
    known = json.loads(args.passwords.read_text()) if args.passwords.exists() else {}
    access = Access.generate(
        args.vhost, crucible_agents=args.crucible, sleds=args.sled, passwords=known
    )
    args.passwords.touch(mode=0o600)
    args.passwords.write_text(json.dumps(dict(access.passwords), indent=2) + "\n")
    json.dump(access.definitions(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
