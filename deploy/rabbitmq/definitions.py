#!/usr/bin/env python3
"""Write (or check) the RabbitMQ definitions that compose.yaml loads at the broker's boot.

One vhost for the control plane (not ``/``) and one user per service with permissions
limited to the names that service uses (see README.md beside this file). RabbitMQ keeps
only password hashes: ``rabbit_password_hashing_sha256`` is
base64(salt + sha256(salt + utf-8 password)) with a 4-byte random salt.

Passwords come from the same variables compose.yaml interpolates (``AMQP_NEXUS_PASSWORD``
and so on), with the same development-only defaults:

    python3 deploy/rabbitmq/definitions.py > deploy/rabbitmq/definitions.json
    python3 deploy/rabbitmq/definitions.py --check deploy/rabbitmq/definitions.json

Standard library only, so it runs anywhere Python 3.11 does.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

VHOST = "control-plane"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
SALT_BYTES = 4

# user -> (variable holding its password, development-only default)
PASSWORDS: dict[str, tuple[str, str]] = {
    "nexus": ("AMQP_NEXUS_PASSWORD", "nexus-dev-only"),
    "crucible": ("AMQP_CRUCIBLE_PASSWORD", "crucible-dev-only"),
    "sled": ("AMQP_SLED_PASSWORD", "sled-dev-only"),
    "admin": ("AMQP_ADMIN_PASSWORD", "admin-dev-only"),
}
TAGS: dict[str, list[str]] = {"admin": ["administrator"]}

# Names on the broker (schemas/topology.py): the shared exchanges, Nexus's queues, and
# exclusive reply and watch queues (aio-pika names them amq_<uuid hex>, RabbitMQ
# amq.gen-<...> when a client leaves the name to the server).
_SHARED = r"control\.(commands|events|dead-letters)"
_NEXUS_QUEUES = r"nexus\.(events|api)"
_SERVER_NAMED = r"amq_[0-9a-f]{32}|amq\.gen-.*"
_AGENT_PUBLISHES = r"control\.(events|dead-letters)"
_CRUCIBLE_QUEUES = r"crucible\.[0-9a-f-]+"
_SLED_QUEUES = r"sled\.[0-9a-f-]+"


def _any_of(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


# Every agent still runs Transport.declare_topology(), which (re)declares the exchanges
# and Nexus's queues with their bindings and dead-letter arguments: that takes configure
# on all of them, write on the queues it binds and the dead-letter exchange, and read on
# the exchanges it binds to and on the queues it declares with a dead-letter exchange.
# What the agents do not get: configure/write/read on another kind of agent's queues or
# on exclusive reply queues, and write on control.commands (they cannot send commands).
PERMISSIONS: dict[str, dict[str, str]] = {
    "nexus": {
        "configure": _any_of(_SHARED, _NEXUS_QUEUES, _SERVER_NAMED),
        "write": _any_of(_SHARED, _NEXUS_QUEUES, r"amq\.default", _SERVER_NAMED),
        "read": _any_of(_SHARED, _NEXUS_QUEUES, _SERVER_NAMED),
    },
    "crucible": {
        "configure": _any_of(_SHARED, _NEXUS_QUEUES, _CRUCIBLE_QUEUES),
        "write": _any_of(_AGENT_PUBLISHES, _NEXUS_QUEUES, r"amq\.default", _CRUCIBLE_QUEUES),
        "read": _any_of(_SHARED, _NEXUS_QUEUES, _CRUCIBLE_QUEUES),
    },
    "sled": {
        "configure": _any_of(_SHARED, _NEXUS_QUEUES, _SLED_QUEUES),
        "write": _any_of(_AGENT_PUBLISHES, _NEXUS_QUEUES, r"amq\.default", _SLED_QUEUES),
        "read": _any_of(_SHARED, _NEXUS_QUEUES, _SLED_QUEUES),
    },
    # The operator (management UI, rabbitmqadmin): everything, in this vhost only.
    "admin": {"configure": ".*", "write": ".*", "read": ".*"},
}

# Routing keys each agent may publish on the control.events topic exchange
# (AMQP 0-9-1 checks topic permissions on publish only).
TOPIC_PERMISSIONS: dict[str, str] = {
    "crucible": r"^(region\.[a-z_]+|agent\.announced|command\.rejected)$",
    "sled": r"^(instance\.[a-z_]+|sled\.(registered|heartbeat)|command\.rejected)$",
}
EVENTS_EXCHANGE = "control.events"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` of ``password``."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def password_matches(password: str, stored_hash: str) -> bool:
    raw = base64.b64decode(stored_hash, validate=True)
    salt = raw[:SALT_BYTES]
    return secrets.compare_digest(password_hash(password, salt), stored_hash)


def passwords(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ) if environ is None else environ
    return {
        user: environ.get(variable) or default for user, (variable, default) in PASSWORDS.items()
    }


def definitions(user_passwords: dict[str, str]) -> dict[str, Any]:
    return {
        "rabbit_version": "3.13.0",
        "rabbitmq_version": "3.13.0",
        "users": [
            {
                "name": user,
                "password_hash": password_hash(user_passwords[user]),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": TAGS.get(user, []),
                "limits": {},
            }
            for user in PASSWORDS
        ],
        "vhosts": [{"name": VHOST, "description": "the control plane", "tags": []}],
        "permissions": [
            {"user": user, "vhost": VHOST, **permissions}
            for user, permissions in PERMISSIONS.items()
        ],
        "topic_permissions": [
            {
                "user": user,
                "vhost": VHOST,
                "exchange": EVENTS_EXCHANGE,
                "write": write,
                "read": ".*",
            }
            for user, write in TOPIC_PERMISSIONS.items()
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [],
        "exchanges": [],
        "bindings": [],
    }


def check(path: Path, user_passwords: dict[str, str]) -> list[str]:
    """What in the definitions at ``path`` differs from what this script would write."""
    loaded = json.loads(path.read_text())
    expected = definitions(user_passwords)
    problems = []
    users = {user["name"]: user for user in loaded.get("users", [])}
    if sorted(users) != sorted(PASSWORDS):
        problems.append(f"users are {sorted(users)}, expected {sorted(PASSWORDS)}")
    for name, password in user_passwords.items():
        user = users.get(name)
        if user is None:
            continue
        if user.get("hashing_algorithm") != HASHING_ALGORITHM:
            problems.append(f"{name}: hashing_algorithm is {user.get('hashing_algorithm')!r}")
        elif not password_matches(password, user.get("password_hash", "")):
            problems.append(f"{name}: the password hash does not match ${PASSWORDS[name][0]}")
        if user.get("tags") != TAGS.get(name, []):
            problems.append(f"{name}: tags are {user.get('tags')!r}")
    for key in ("vhosts", "permissions", "topic_permissions"):
        if loaded.get(key) != expected[key]:
            problems.append(f"{key} differ from this script's")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", type=Path, metavar="FILE", help="verify FILE instead")
    args = parser.parse_args(argv)
    user_passwords = passwords()
    if args.check is not None:
        problems = check(args.check, user_passwords)
        for problem in problems:
            print(f"{args.check}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    json.dump(definitions(user_passwords), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
