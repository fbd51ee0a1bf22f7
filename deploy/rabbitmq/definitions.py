#!/usr/bin/env python3
"""Write (or check) the RabbitMQ definitions that compose.yaml's broker loads at boot.

A thin wrapper: the users, their grants and the topology come from
:mod:`nexus.devstack.access`, the one source of truth (``nexusctl dev run-all`` uses it
too). This script only feeds it what compose.yaml holds -- the crucible agents' and
sleds' ids, and each broker user's password as its ``*_AMQP_URL`` spells it
(``${AMQP_..._PASSWORD:-...-dev-only}``, taken from the environment as compose would) --
and adds the operator ``admin`` (management UI, everything in the vhost only).

Run from the project's virtualenv (it imports the project and PyYAML):

    .venv/bin/python deploy/rabbitmq/definitions.py > deploy/rabbitmq/definitions.json
    .venv/bin/python deploy/rabbitmq/definitions.py --check deploy/rabbitmq/definitions.json
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from nexus.devstack.access import HASHING_ALGORITHM, VHOST, Access, password_hash

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"

# The operator: not a service, so not in nexus.devstack.access.
ADMIN_USER = "admin"
ADMIN_PASSWORD_VARIABLE = "AMQP_ADMIN_PASSWORD"
ADMIN_PASSWORD_DEFAULT = "admin-dev-only"
ADMIN_TAGS = ["administrator"]
ADMIN_PERMISSIONS = {"configure": ".*", "write": ".*", "read": ".*"}

# The keys of the definitions that a re-render reproduces exactly (users differ by salt).
EXACT_KEYS = ("vhosts", "permissions", "topic_permissions", "exchanges", "queues", "bindings")

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${VAR}`` and ``${VAR:-default}`` (unset or empty: the default)."""

    def value(match: re.Match[str]) -> str:
        return environ.get(match.group("name")) or match.group("default") or ""

    return _INTERPOLATION.sub(value, text)


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def compose_access(
    compose_path: Path = COMPOSE, environ: Mapping[str, str] | None = None
) -> Access:
    """compose.yaml's agents, sleds and broker passwords, as :class:`Access` renders them.

    Fails if a user that access.py grants has no URL in compose.yaml (it would get a
    random password nobody knows), if a URL names a user access.py does not grant, or
    if one user has two passwords.
    """
    environ = os.environ if environ is None else environ
    services = yaml.safe_load(compose_path.read_text())["services"]
    crucible_agents: list[uuid.UUID] = []
    sleds: list[uuid.UUID] = []
    passwords: dict[str, str] = {}
    for name, service in services.items():
        environment = _environment(service)
        if "CRUCIBLE_AMQP_URL" in environment:
            crucible_agents.append(uuid.UUID(environment["CRUCIBLE_AGENT_ID"]))
        if "SLED_AMQP_URL" in environment:
            sleds.append(uuid.UUID(environment["SLED_SLED_ID"]))
        for key, value in environment.items():
            if not key.endswith("_AMQP_URL"):
                continue
            parts = urlsplit(interpolate(value, environ))
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            if passwords.setdefault(user, password) != password:
                raise ValueError(f"{name}: user {user!r} has another password elsewhere")
    granted = set(Access(VHOST, tuple(crucible_agents), tuple(sleds)).grants())
    if set(passwords) != granted:
        raise ValueError(
            f"compose.yaml's broker users {sorted(passwords)} are not the ones "
            f"nexus.devstack.access grants {sorted(granted)}"
        )
    return Access.generate(VHOST, crucible_agents=crucible_agents, sleds=sleds, passwords=passwords)


def admin_password(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(ADMIN_PASSWORD_VARIABLE) or ADMIN_PASSWORD_DEFAULT


def definitions(access: Access, admin: str) -> dict[str, Any]:
    """``access.definitions()`` with the operator added."""
    rendered = access.definitions()
    rendered["users"].append(
        {
            "name": ADMIN_USER,
            "password_hash": password_hash(admin),
            "hashing_algorithm": HASHING_ALGORITHM,
            "tags": ADMIN_TAGS,
        }
    )
    rendered["permissions"].append({"user": ADMIN_USER, "vhost": access.vhost, **ADMIN_PERMISSIONS})
    return rendered


def password_matches(password: str, stored_hash: str) -> bool:
    """Whether ``stored_hash`` (base64(salt + sha256(salt + password))) is ``password``'s."""
    salt = base64.b64decode(stored_hash, validate=True)[: -hashlib.sha256().digest_size]
    return secrets.compare_digest(password_hash(password, salt), stored_hash)


def check(path: Path, access: Access, admin: str) -> list[str]:
    """What in the definitions at ``path`` differs from what this script would write."""
    loaded = json.loads(path.read_text())
    expected = definitions(access, admin)
    problems = [
        f"{key} differ from nexus.devstack.access's"
        for key in EXACT_KEYS
        if loaded.get(key) != expected[key]
    ]
    users = {user["name"]: user for user in loaded.get("users", [])}
    passwords = {**access.passwords, ADMIN_USER: admin}
    if sorted(users) != sorted(passwords):
        problems.append(f"users are {sorted(users)}, expected {sorted(passwords)}")
    for user in expected["users"]:
        found = users.get(user["name"])
        if found is None:
            continue
        if {k: v for k, v in found.items() if k != "password_hash"} != {
            k: v for k, v in user.items() if k != "password_hash"
        }:
            problems.append(f"{user['name']}: {found} is not {user} (but for the hash)")
        if not password_matches(passwords[user["name"]], found.get("password_hash", "")):
            problems.append(f"{user['name']}: the hash is not of compose.yaml's password")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="FILE", help="verify FILE instead")
    parser.add_argument("--compose", type=Path, default=COMPOSE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    access = compose_access(args.compose)
    admin = admin_password()
    if args.check is not None:
        problems = check(args.check, access, admin)
        for problem in problems:
            print(f"{args.check}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    json.dump(definitions(access, admin), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
