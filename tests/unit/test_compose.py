"""compose.yaml, the Dockerfile and the RabbitMQ definitions agree with the code.

No Docker engine is needed: every service's command and health check must name an entry
point and subcommand that exist (parsed by the real typer apps), every NEXUS_/CRUCIBLE_/
SLED_ variable a settings field (and the whole environment must validate), every broker
URL its service's own user (``nexus``, ``nexusctl``, ``crucible-<agent id>``,
``sled-<sled id>``), password and vhost in the RabbitMQ definitions, which must be what
``nexus.devstack.access`` renders for compose's ids (plus the operator ``admin``), every
volume and dependency something declared.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import json
import re
import shlex
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import typer
import yaml
from pydantic_settings import BaseSettings
from typer.core import TyperGroup
from typer.testing import CliRunner

from crucible_agent.settings import CrucibleSettings
from nexus.cli.client import cli_source
from nexus.devstack.access import HASHING_ALGORITHM, VHOST, Access, password_hash
from nexus.settings import NexusSettings
from schemas.brokers import broker_urls
from schemas.identity import CLI_USER, NEXUS_USER, crucible_user, sled_user, source_allowed
from schemas.instance import VmmState
from schemas.region import RegionState
from schemas.snapshot import SnapshotState
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENTS_QUEUE,
    REPLIES_EXCHANGE,
    crucible_queue,
    reply_queue,
    sled_queue,
)
from sled_agent.settings import SledSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_HA = ROOT / "compose.ha.yaml"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
DEFINITIONS_SCRIPT = ROOT / "deploy" / "rabbitmq" / "definitions.py"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

PROJECT_IMAGE = "oxide-eventplane:dev"
# Image services (the official images by default, when no variable names a stand-in) and
# the server tools their health checks may use.
SERVER_IMAGES = {
    "rabbitmq": "rabbitmq:3.13-management",
    "postgres": "postgres:15",
    "prometheus": "eventplane-prometheus:dev",
}
SERVER_TOOLS = {
    "rabbitmq": {"rabbitmq-diagnostics"},
    "postgres": {"pg_isready"},
    "prometheus": {"promtool"},
}
# The variables that name the local stand-ins (scripts/docker/images.sh builds them).
STANDIN_VARIABLES = {
    "rabbitmq": "EVENTPLANE_RABBITMQ_IMAGE",
    "postgres": "EVENTPLANE_POSTGRES_IMAGE",
}

SETTINGS: dict[str, type[BaseSettings]] = {
    "NEXUS_": NexusSettings,
    "CRUCIBLE_": CrucibleSettings,
    "SLED_": SledSettings,
}
# The settings each entry point reads.
ENTRY_POINT_SETTINGS = {
    "nexus": "NEXUS_",
    "nexusctl": "NEXUS_",
    "crucible-agent": "CRUCIBLE_",
    "sled-agent": "SLED_",
}
# The operator of the management UI: compose's, not a service (deploy/rabbitmq/definitions.py).
ADMIN_USER = "admin"
ADMIN_PASSWORD_VARIABLE = "AMQP_ADMIN_PASSWORD"

_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


# Loading.


def _interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with no .env: every variable must have a default."""
    if isinstance(value, str):

        def default(match: re.Match[str]) -> str:
            assert match.group("default") is not None, f"{match.group(0)} has no default"
            return match.group("default")

        return _INTERPOLATION.sub(default, value)
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(raw_compose: str) -> dict[str, Any]:
    loaded = yaml.safe_load(raw_compose)
    assert isinstance(loaded, dict)
    interpolated = _interpolate(loaded)
    assert isinstance(interpolated, dict)
    return interpolated


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = pyproject["project"]["scripts"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def definitions_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rabbitmq_definitions", DEFINITIONS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    loaded = json.loads(DEFINITIONS.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _command(service: dict[str, Any]) -> list[str]:
    """What the container runs: its entrypoint (the image has none) and command."""
    return _argv(service.get("entrypoint")) + _argv(service.get("command"))


def _on_demand(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services under a profile: tools that `docker compose run` starts, `up` does not."""
    return {name for name, service in services.items() if service.get("profiles")}


def _project_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("image") == PROJECT_IMAGE}


def _one_shots(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services others wait for with service_completed_successfully (jobs, not servers)."""
    return {
        target
        for service in services.values()
        for target, how in _depends_on(service).items()
        if how.get("condition") == "service_completed_successfully"
    }


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    depends_on = service.get("depends_on", {})
    if isinstance(depends_on, list):
        return {name: {"condition": "service_started"} for name in depends_on}
    return {str(name): dict(how) for name, how in depends_on.items()}


def _by_entry_point(services: dict[str, dict[str, Any]], entry_point: str) -> dict[str, Any]:
    return {
        name: service
        for name, service in _project_services(services).items()
        if _command(service)[:1] == [entry_point] and _command(service)[1:2] == ["run"]
    }


# Entry points and subcommands.


def _typer_app(scripts: dict[str, str], entry_point: str) -> typer.Typer:
    assert entry_point in scripts, f"{entry_point} is not in [project.scripts]"
    module_name, _, attribute = scripts[entry_point].partition(":")
    app = getattr(importlib.import_module(module_name), attribute)
    assert isinstance(app, typer.Typer)
    return app


def _check_command_line(scripts: dict[str, str], argv: list[str]) -> None:
    """``argv`` names an entry point, a leaf subcommand, and options that command takes."""
    assert argv, "empty command"
    entry_point, *args = argv
    app = _typer_app(scripts, entry_point)
    command = typer.main.get_command(app)
    path: list[str] = []
    while isinstance(command, TyperGroup):
        assert args, f"{' '.join(argv)}: no subcommand after {' '.join([entry_point, *path])}"
        name = args.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"{' '.join(argv)}: {entry_point} has no subcommand {name!r}"
        path.append(name)
        command = sub
    # Parse the rest exactly as the command would (unknown options fail here).
    command.make_context(" ".join([entry_point, *path]), list(args))
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"{entry_point} {' '.join(path)} --help: {result.output}"


def test_compose_parses_and_has_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVER_IMAGES) <= set(services)
    for name, image in SERVER_IMAGES.items():
        assert services[name]["image"] == image
    assert len(_by_entry_point(services, "nexus")) == 2
    assert len(_by_entry_point(services, "crucible-agent")) == 3
    assert len(_by_entry_point(services, "sled-agent")) == 2
    migrate = [
        name
        for name, service in _project_services(services).items()
        if _command(service) == ["nexusctl", "db", "upgrade"]
    ]
    assert migrate, "no service runs `nexusctl db upgrade`"


def test_every_service_is_the_project_image_or_a_known_server(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name in SERVER_IMAGES:
            continue
        assert service.get("image") == PROJECT_IMAGE, name
        assert service.get("build", {}).get("context") == ".", f"{name}: not built from here"


def test_server_images_can_be_the_local_stand_ins(raw_compose: str) -> None:
    """Where no registry is reachable, a variable names the stand-in that
    scripts/docker/images.sh builds, and the compose check sets it."""
    raw = yaml.safe_load(raw_compose)["services"]
    check = (ROOT / "scripts" / "compose_check.sh").read_text()
    images = (ROOT / "scripts" / "docker" / "lib.sh").read_text()
    for name, variable in STANDIN_VARIABLES.items():
        assert raw[name]["image"] == f"${{{variable}:-{SERVER_IMAGES[name]}}}", name
        assert f"{variable}=" in check, f"scripts/compose_check.sh does not set {variable}"
        assert f"STANDIN_{name.upper()}_IMAGE=" in images, name


def test_built_images_take_the_base_image_and_the_host_network(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every image built here starts FROM a Debian base given by BASE_IMAGE (official by
    default, debootstrapped where no registry is reachable) and needs the package indexes."""
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        assert build.get("network") == "host", name
        assert build.get("args", {}).get("BASE_IMAGE") == "debian:bookworm-slim", name
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        text = dockerfile.read_text()
        assert "ARG BASE_IMAGE=debian:bookworm-slim" in text, dockerfile
        assert "FROM ${BASE_IMAGE}" in text, dockerfile


def test_commands_name_entry_points_and_subcommands(
    services: dict[str, dict[str, Any]], scripts: dict[str, str]
) -> None:
    for name, service in _project_services(services).items():
        argv = _command(service)
        try:
            _check_command_line(scripts, argv)
        except AssertionError as error:
            raise AssertionError(f"service {name}: {error}") from None


def test_health_checks_name_entry_points_or_server_tools(
    services: dict[str, dict[str, Any]], scripts: dict[str, str]
) -> None:
    not_servers = _one_shots(services) | _on_demand(services)
    for name, service in services.items():
        if name in not_servers:
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test, f"service {name} has no health check"
        assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: {test!r}"
        argv = shlex.split(test[1]) if test[0] == "CMD-SHELL" else [str(part) for part in test[1:]]
        if name in SERVER_IMAGES:
            assert argv[0] in SERVER_TOOLS[name], f"{name}: {argv[0]} is not a known tool"
        else:
            assert argv[0] == _command(service)[0], f"{name}: checks another program"
            try:
                _check_command_line(scripts, argv)
            except AssertionError as error:
                raise AssertionError(f"health check of {name}: {error}") from None


def test_one_shots_and_tools_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in _one_shots(services) | _on_demand(services):
        assert services[name].get("restart") == "no", name


def test_long_running_services_restart(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name not in _one_shots(services) | _on_demand(services):
            assert service.get("restart") == "unless-stopped", name


# Environment and settings.


def test_environment_names_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key in _environment(service):
            for prefix, settings_class in SETTINGS.items():
                if key.startswith(prefix):
                    field = key.removeprefix(prefix).lower()
                    assert settings_class.model_config.get("env_prefix") == prefix
                    assert field in settings_class.model_fields, (
                        f"service {name}: {key} is not a field of {settings_class.__name__}"
                    )


def test_environment_matches_the_entry_point(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _project_services(services).items():
        expected = ENTRY_POINT_SETTINGS[_command(service)[0]]
        for key in _environment(service):
            other = [prefix for prefix in SETTINGS if key.startswith(prefix) and prefix != expected]
            assert not other, f"service {name} ({_command(service)[0]}) sets {key}"


def test_environment_validates(services: dict[str, dict[str, Any]]) -> None:
    """Each service's variables alone make valid settings: types, ranges, required fields."""
    for name, service in _project_services(services).items():
        prefix = ENTRY_POINT_SETTINGS[_command(service)[0]]
        values = {
            key.removeprefix(prefix).lower(): value
            for key, value in _environment(service).items()
            if key.startswith(prefix)
        }
        # Validated as given: nothing from this process's environment mixes in.
        settings = SETTINGS[prefix].model_validate(values)
        if _command(service)[1:2] == ["run"]:
            assert getattr(settings, "health_file", None) is not None, (
                f"service {name}: its health check needs {prefix}HEALTH_FILE"
            )


def _values(services: dict[str, dict[str, Any]], entry_point: str, key: str) -> list[str]:
    return [_environment(s)[key] for s in _by_entry_point(services, entry_point).values()]


def test_identities_are_distinct(services: dict[str, dict[str, Any]]) -> None:
    for entry_point, key in [
        ("nexus", "NEXUS_REPLICA_ID"),
        ("crucible-agent", "CRUCIBLE_AGENT_ID"),
        ("crucible-agent", "CRUCIBLE_SLED_ID"),  # a disk's 3 regions go to distinct sleds
        ("sled-agent", "SLED_SLED_ID"),
    ]:
        values = _values(services, entry_point, key)
        duplicates = [value for value, count in Counter(values).items() if count > 1]
        assert not duplicates, f"{key} repeated: {duplicates}"


def test_crucible_agents_on_known_sleds_or_storage_only(
    services: dict[str, dict[str, Any]],
) -> None:
    sleds = set(_values(services, "sled-agent", "SLED_SLED_ID"))
    storage_sleds = _values(services, "crucible-agent", "CRUCIBLE_SLED_ID")
    assert sleds <= set(storage_sleds), "a sled agent's sled has no storage"
    for value in [*sleds, *storage_sleds]:
        uuid.UUID(value)


def test_nexus_database_is_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    postgres = _environment(services["postgres"])
    for name, service in _project_services(services).items():
        url = _environment(service).get("NEXUS_DATABASE_URL")
        if url is None:
            continue
        parts = urlsplit(url)
        assert parts.scheme in {"postgresql", "postgresql+asyncpg"}, name
        assert parts.hostname == "postgres" and (parts.port or 5432) == 5432, name
        assert parts.username == postgres["POSTGRES_USER"], name
        assert unquote(parts.password or "") == postgres["POSTGRES_PASSWORD"], name
        assert parts.path == f"/{postgres['POSTGRES_DB']}", name


# Dependencies and volumes.


def test_dependencies_exist_and_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, how in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = how.get("condition")
            assert condition in {"service_healthy", "service_completed_successfully"}, (
                f"{name} -> {target}: {condition}"
            )
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), (
                    f"{name} waits for {target} to be healthy, which has no health check"
                )


def test_project_services_wait_for_what_they_use(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _project_services(services).items():
        environment = _environment(service)
        depends_on = _depends_on(service)
        if any(key.endswith("_AMQP_URL") for key in environment):
            assert depends_on.get("rabbitmq", {}).get("condition") == "service_healthy", name
        if "NEXUS_DATABASE_URL" in environment:
            assert depends_on.get("postgres", {}).get("condition") == "service_healthy", name
        if _command(service)[:2] == ["nexus", "run"]:
            migrations = [t for t in depends_on if t in _one_shots(services)]
            assert migrations, f"{name} does not wait for the migration"


def _mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield str(volume["source"]), str(volume["target"])
        else:
            source, target, *_ = str(volume).split(":")
            yield source, target


def test_volumes_are_declared_and_files_exist(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in services.items():
        for source, _ in _mounts(service):
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"


def test_data_lives_in_named_volumes_of_their_own(services: dict[str, dict[str, Any]]) -> None:
    owners: dict[str, str] = {}
    for name, service in services.items():
        for source, _ in _mounts(service):
            if not source.startswith(("./", "/")):
                assert source not in owners, f"{source} shared by {owners[source]} and {name}"
                owners[source] = name
    for entry_point, key in [
        ("crucible-agent", "CRUCIBLE_DATA_DIR"),
        ("sled-agent", "SLED_DATA_DIR"),
    ]:
        for name, service in _by_entry_point(services, entry_point).items():
            data_dir = PurePosixPath(_environment(service)[key])
            named = [t for s, t in _mounts(service) if not s.startswith(("./", "/"))]
            assert any(
                data_dir == PurePosixPath(t) or PurePosixPath(t) in data_dir.parents for t in named
            ), f"{name}: {data_dir} is not on a named volume"
    assert "postgres" in owners.values() and "rabbitmq" in owners.values()


# The broker: URLs against the definitions, the definitions against nexus.devstack.access.


def _amqp_urls(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], str]]:
    for name, service in _project_services(services).items():
        for key, value in _environment(service).items():
            if key.endswith("_AMQP_URL"):
                yield name, service, value


def _service_identity(service: dict[str, Any]) -> tuple[str, str]:
    """The broker user the service must connect as, and the source its messages claim."""
    entry_point = _command(service)[0]
    environment = _environment(service)
    if entry_point == "nexus":
        return NEXUS_USER, f"nexus/{environment['NEXUS_REPLICA_ID']}"
    if entry_point == "nexusctl":
        return CLI_USER, cli_source()
    if entry_point == "crucible-agent":
        agent_id = uuid.UUID(environment["CRUCIBLE_AGENT_ID"])
        return crucible_user(agent_id), f"crucible/{agent_id}"
    if entry_point == "sled-agent":
        sled_id = uuid.UUID(environment["SLED_SLED_ID"])
        return sled_user(sled_id), f"sled/{sled_id}"
    raise AssertionError(f"no broker identity for {entry_point}")


def _url_credentials(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return unquote(parts.username or ""), unquote(parts.password or "")


@pytest.fixture(scope="module")
def compose_access(services: dict[str, dict[str, Any]]) -> Access:
    """What nexus.devstack.access makes of compose.yaml's ids and default passwords."""
    passwords: dict[str, str] = {}
    for name, _, url in _amqp_urls(services):
        user, password = _url_credentials(url)
        assert passwords.setdefault(user, password) == password, f"{name}: {user} differs"
    return Access.generate(
        VHOST,
        crucible_agents=[
            uuid.UUID(value) for value in _values(services, "crucible-agent", "CRUCIBLE_AGENT_ID")
        ],
        sleds=[uuid.UUID(value) for value in _values(services, "sled-agent", "SLED_SLED_ID")],
        passwords=passwords,
    )


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    example: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    return example


def _permissions(definitions: dict[str, Any], user: str, vhost: str = VHOST) -> dict[str, str]:
    found = [p for p in definitions["permissions"] if p["user"] == user and p["vhost"] == vhost]
    assert len(found) == 1, f"{user} has {len(found)} permission entries on {vhost}"
    return dict(found[0])


def _event_keys(definitions: dict[str, Any], user: str) -> str | None:
    found = [
        entry["write"]
        for entry in definitions["topic_permissions"]
        if entry["user"] == user and entry["exchange"] == EVENTS_EXCHANGE
    ]
    assert len(found) <= 1, f"{user} has {len(found)} topic permissions on {EVENTS_EXCHANGE}"
    return found[0] if found else None


def _allows(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def _hash_matches(password: str, stored_hash: str) -> bool:
    """RabbitMQ's sha256 scheme, checked with access.py's own hashing and the file's salt."""
    salt = base64.b64decode(stored_hash, validate=True)[: -hashlib.sha256().digest_size]
    return password_hash(password, salt) == stored_hash


def test_every_service_has_a_broker_url(services: dict[str, dict[str, Any]]) -> None:
    with_url = {name for name, _, _ in _amqp_urls(services)}
    for name, service in _project_services(services).items():
        if _command(service)[1:2] == ["run"] or name in _on_demand(services):
            assert name in with_url, f"{name} has no AMQP URL (it would use guest on /)"


def test_the_migration_does_not_touch_the_broker(services: dict[str, dict[str, Any]]) -> None:
    for name in _one_shots(services):
        assert not any(k.endswith("_AMQP_URL") for k in _environment(services[name])), name


def test_the_cli_has_a_service_and_a_user_of_its_own(services: dict[str, dict[str, Any]]) -> None:
    """A cli/... source from user nexus is refused: nexusctl must connect as nexusctl."""
    cli = {
        name: service
        for name, service in _project_services(services).items()
        if _command(service)[0] == "nexusctl" and name not in _one_shots(services)
    }
    assert cli, "no service to run nexusctl in (exec into a Nexus replica connects as nexus)"
    for name, service in cli.items():
        assert name in _on_demand(services), f"{name}: `up` would start the CLI"
        user, _ = _url_credentials(_environment(service)["NEXUS_AMQP_URL"])
        assert user == CLI_USER, f"{name} connects as {user!r}"
    assert not source_allowed(NEXUS_USER, cli_source())


def test_each_service_connects_as_its_own_user(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any]
) -> None:
    users = {user["name"]: user for user in definitions["users"]}
    vhosts = {vhost["name"] for vhost in definitions["vhosts"]}
    assert vhosts == {VHOST}, "only the control plane's vhost, not /"
    for name, service, url in _amqp_urls(services):
        parts = urlsplit(url)
        assert parts.scheme in {"amqp", "amqps"} and parts.hostname == "rabbitmq", name
        assert unquote(parts.path.removeprefix("/")) == VHOST, f"{name}: vhost {parts.path}"
        user, _ = _url_credentials(url)
        expected_user, source = _service_identity(service)
        assert user == expected_user, f"{name} connects as {user!r}, not {expected_user!r}"
        assert user in users, f"{name}: no user {user!r} in the definitions"
        assert source_allowed(user, source), f"{name}: {user} may not claim source {source}"


def test_broker_passwords_match_the_hashes(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any], env_example: dict[str, str]
) -> None:
    hashes = {user["name"]: user for user in definitions["users"]}
    for name, _, url in _amqp_urls(services):
        user, password = _url_credentials(url)
        assert hashes[user]["hashing_algorithm"] == HASHING_ALGORITHM, user
        assert _hash_matches(password, hashes[user]["password_hash"]), (
            f"{name}: the password in its URL does not match {user}'s hash"
        )
    admin = hashes[ADMIN_USER]
    assert admin["hashing_algorithm"] == HASHING_ALGORITHM
    assert _hash_matches(env_example[ADMIN_PASSWORD_VARIABLE], admin["password_hash"])


def test_definitions_file_is_what_access_renders_for_compose(
    definitions: dict[str, Any], compose_access: Access
) -> None:
    """Equal to ``Access.definitions()`` for compose's ids, plus the operator ``admin``;
    the password hashes differ by their random salts (checked above against compose's
    passwords)."""
    expected = compose_access.definitions()
    assert set(definitions) == set(expected)
    for key in ("vhosts", "topic_permissions", "exchanges", "queues", "bindings"):
        assert definitions[key] == expected[key], f"{key} differ from nexus.devstack.access's"
    admin_permissions = {"configure": ".*", "write": ".*", "read": ".*"}
    assert definitions["permissions"] == [
        *expected["permissions"],
        {"user": ADMIN_USER, "vhost": VHOST, **admin_permissions},
    ]

    def without_hash(user: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in user.items() if key != "password_hash"}

    assert [without_hash(user) for user in definitions["users"]] == [
        *(without_hash(user) for user in expected["users"]),
        {"name": ADMIN_USER, "hashing_algorithm": HASHING_ALGORITHM, "tags": ["administrator"]},
    ]
    for user in definitions["users"]:
        if user["name"] != ADMIN_USER:
            password = compose_access.passwords[user["name"]]
            assert _hash_matches(password, user["password_hash"]), user["name"]


def test_definitions_script_agrees(definitions_module: ModuleType) -> None:
    """The wrapper over access.py reads compose.yaml as the test does (no .env set)."""
    access = definitions_module.compose_access(COMPOSE, {})
    assert (
        definitions_module.check(DEFINITIONS, access, definitions_module.admin_password({})) == []
    )


def test_every_user_has_the_grant_access_gives_it(
    definitions: dict[str, Any], compose_access: Access
) -> None:
    for user, grant in compose_access.grants().items():
        permissions = _permissions(definitions, user)
        assert (permissions["configure"], permissions["write"], permissions["read"]) == (
            grant.configure,
            grant.write,
            grant.read,
        ), user
        assert _event_keys(definitions, user) == grant.event_keys, user


def test_agents_have_users_of_their_own(services: dict[str, dict[str, Any]]) -> None:
    agents = {
        **_by_entry_point(services, "crucible-agent"),
        **_by_entry_point(services, "sled-agent"),
    }
    users = [_url_credentials(url)[0] for name, _, url in _amqp_urls(services) if name in agents]
    assert len(users) == len(agents) and len(set(users)) == len(users), users
    assert not {"crucible", "sled"} & set(users), "a user shared by every agent of a kind"


def test_only_admin_and_nexus_may_configure(definitions: dict[str, Any]) -> None:
    """The CLI declares its exclusive reply/watch queues (server-named) and nothing else;
    agents configure nothing: their queues and bindings come with the definitions."""
    some_id = uuid.uuid4()
    shared = [
        COMMANDS_EXCHANGE,
        EVENTS_EXCHANGE,
        REPLIES_EXCHANGE,
        DEAD_LETTER_EXCHANGE,
        DEAD_LETTER_QUEUE,
        NEXUS_EVENTS_QUEUE,
        NEXUS_API_QUEUE,
        crucible_queue(some_id),
        sled_queue(some_id),
        "amq.default",
    ]
    for permissions in definitions["permissions"]:
        user = permissions["user"]
        if user in {ADMIN_USER, NEXUS_USER}:
            continue
        if user == CLI_USER:
            assert _allows(permissions["configure"], f"amq_{some_id.hex}")
            for name in shared:
                assert not _allows(permissions["configure"], name), f"{user} configures {name}"
        else:
            assert permissions["configure"] == "^$", f"{user} may configure"


def test_users_may_do_what_their_service_does(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any]
) -> None:
    exchanges = [COMMANDS_EXCHANGE, EVENTS_EXCHANGE, REPLIES_EXCHANGE, DEAD_LETTER_EXCHANGE]
    watch_queue = f"amq_{uuid.uuid4().hex}"  # aio-pika's name for an exclusive queue
    nexus = _permissions(definitions, NEXUS_USER)
    own = [watch_queue, reply_queue(NEXUS_USER)]
    for name in [*exchanges, NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE, DEAD_LETTER_QUEUE, *own]:
        for kind in ("configure", "write", "read"):
            assert _allows(nexus[kind], name), f"nexus may not {kind} {name}"

    cli = _permissions(definitions, CLI_USER)
    assert _allows(cli["write"], COMMANDS_EXCHANGE)
    assert _allows(cli["read"], EVENTS_EXCHANGE) and _allows(cli["read"], REPLIES_EXCHANGE)
    for kind in ("configure", "write", "read"):
        assert _allows(cli[kind], watch_queue)
        assert _allows(cli[kind], reply_queue(CLI_USER))
        # Nexus answers only on a reply queue named after the requester: none may
        # declare one named after another user.
        assert not _allows(cli[kind], reply_queue(NEXUS_USER)), f"nexusctl may {kind} nexus's"
        assert not _allows(nexus[kind], reply_queue(CLI_USER)), f"nexus may {kind} nexusctl's"

    for name, service in {
        **_by_entry_point(services, "crucible-agent"),
        **_by_entry_point(services, "sled-agent"),
    }.items():
        user, _ = _service_identity(service)
        environment = _environment(service)
        queue = (
            crucible_queue(uuid.UUID(environment["CRUCIBLE_AGENT_ID"]))
            if "CRUCIBLE_AGENT_ID" in environment
            else sled_queue(uuid.UUID(environment["SLED_SLED_ID"]))
        )
        granted = _permissions(definitions, user)
        assert _allows(granted["read"], queue), f"{name}: {user} may not consume {queue}"
        for exchange in (EVENTS_EXCHANGE, REPLIES_EXCHANGE, DEAD_LETTER_EXCHANGE):
            assert _allows(granted["write"], exchange), f"{user} may not publish to {exchange}"


def test_agents_may_not_do_what_they_do_not_need(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any]
) -> None:
    agents = {
        **_by_entry_point(services, "crucible-agent"),
        **_by_entry_point(services, "sled-agent"),
    }
    queues = {
        _service_identity(s)[0]: (
            crucible_queue(uuid.UUID(_environment(s)["CRUCIBLE_AGENT_ID"]))
            if "CRUCIBLE_AGENT_ID" in _environment(s)
            else sled_queue(uuid.UUID(_environment(s)["SLED_SLED_ID"]))
        )
        for s in agents.values()
    }
    some_id = uuid.uuid4()
    for user, own in queues.items():
        granted = _permissions(definitions, user)
        foreign = [q for q in queues.values() if q != own]
        foreign += [crucible_queue(some_id), sled_queue(some_id), f"amq_{some_id.hex}"]
        foreign += [NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE]
        for queue in foreign:
            for kind in ("configure", "write", "read"):
                assert not _allows(granted[kind], queue), f"{user} may {kind} {queue}"
        # The dead-letter queue has its exchange's name: write on it is the exchange's.
        for kind in ("configure", "read"):
            assert not _allows(granted[kind], DEAD_LETTER_QUEUE), f"{user} may {kind} it"
        for exchange in (COMMANDS_EXCHANGE, "amq.default"):
            assert not _allows(granted["write"], exchange), f"{user} may publish to {exchange}"
    nexus = _permissions(definitions, NEXUS_USER)
    for queue in [*queues.values(), crucible_queue(some_id), sled_queue(some_id)]:
        assert not _allows(nexus["read"], queue), f"nexus may read {queue}"


def test_topic_permissions_cover_what_each_agent_publishes(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any]
) -> None:
    crucible_keys = [f"region.{state.value}" for state in RegionState]
    crucible_keys += [f"region_snapshot.{state.value}" for state in SnapshotState]
    crucible_keys += [f"running_snapshot.{state.value}" for state in RegionState]
    crucible_keys += ["agent.announced", "command.rejected"]
    sled_keys = [f"instance.{state.value}" for state in VmmState]
    sled_keys += ["sled.registered", "sled.heartbeat", "command.rejected"]
    for entry_point, allowed, refused in [
        ("crucible-agent", crucible_keys, ["instance.running", "sled.heartbeat", "disk.ready"]),
        (
            "sled-agent",
            sled_keys,
            ["region.created", "region_snapshot.created", "disk.ready", "saga.done"],
        ),
    ]:
        for service in _by_entry_point(services, entry_point).values():
            user, _ = _service_identity(service)
            keys = _event_keys(definitions, user)
            assert keys is not None, f"{user} may publish any routing key"
            for key in allowed:
                assert _allows(keys, key), f"{user}: {key}"
            for key in refused:
                assert not _allows(keys, key), f"{user}: {key}"


def test_rabbitmq_loads_the_mounted_definitions(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(_mounts(services["rabbitmq"]))
    conf_target = mounts["./deploy/rabbitmq/rabbitmq.conf"]
    assert conf_target.startswith("/etc/rabbitmq/conf.d/")
    settings: dict[str, str] = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["load_definitions"] == mounts["./deploy/rabbitmq/definitions.json"]
    assert settings["loopback_users.guest"] == "true"
    assert "guest" not in {user["name"] for user in json.loads(DEFINITIONS.read_text())["users"]}


# Passwords: one place for the defaults.


def test_env_example_lists_every_variable_with_its_default(
    raw_compose: str, env_example: dict[str, str], definitions_module: ModuleType
) -> None:
    used: dict[str, str] = {}
    for text in (raw_compose, COMPOSE_HA.read_text()):
        for match in _INTERPOLATION.finditer(text):
            name, default = match.group("name"), match.group("default")
            assert used.setdefault(name, default) == default, f"{name}: two defaults"
    for name, default in used.items():
        assert env_example.get(name) == default, (
            f"{name}: .env.example has {env_example.get(name)!r}"
        )
    admin = definitions_module.ADMIN_PASSWORD_VARIABLE
    assert admin == ADMIN_PASSWORD_VARIABLE
    assert env_example.get(admin) == definitions_module.ADMIN_PASSWORD_DEFAULT
    assert set(env_example) == {*used, admin}, "a variable nothing uses"
    for name, default in env_example.items():
        if "PASSWORD" in name or "COOKIE" in name:
            assert "dev-only" in default, f"{name}: a default that does not say it is for dev"
        else:
            assert name.endswith("_IMAGE"), f"{name}: neither a password nor an image"


def test_one_password_variable_per_broker_user(
    raw_compose: str, definitions: dict[str, Any], env_example: dict[str, str]
) -> None:
    """Each URL's password is ``${AMQP_<X>_PASSWORD:-...}``, one variable per user."""
    variables: dict[str, set[str]] = {}
    for service in yaml.safe_load(raw_compose)["services"].values():
        for key, value in _environment(service).items():
            if key.endswith("_AMQP_URL"):
                user, password = _url_credentials(value)
                match = _INTERPOLATION.fullmatch(password)
                assert match, f"{user}: the password is not a ${{VARIABLE:-default}}"
                variables.setdefault(user, set()).add(match.group("name"))
    assert all(len(names) == 1 for names in variables.values()), variables
    by_user = {user: names.pop() for user, names in variables.items()}
    assert len(set(by_user.values())) == len(by_user), f"users share a variable: {by_user}"
    users = {user["name"] for user in definitions["users"]}
    assert set(by_user) == users - {ADMIN_USER}
    amqp = {name for name in env_example if name.startswith("AMQP_")}
    assert amqp == {*by_user.values(), ADMIN_PASSWORD_VARIABLE}


# The image.


def test_dockerfile_installs_the_project_as_a_non_root_user(scripts: dict[str, str]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.strip()
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    # Any Debian bookworm: official by default, debootstrapped where no registry answers.
    assert froms and all(image == "${BASE_IMAGE}" for image in froms)
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in instructions
    assert any(
        line.startswith("RUN") and re.search(r"pip install \.(\s|$)", line) for line in instructions
    )
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = " ".join(line for line in instructions if line.startswith("COPY"))
    assert "pyproject.toml" in copied
    for package in packages:
        assert package.rstrip("*") in copied, f"the image does not copy {package}"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "no USER: the services would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    cmd = [line for line in instructions if line.startswith("CMD ")]
    assert cmd and cmd[-1].split('"')[1] in scripts


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "expected an allow-list"
    allowed = {line.removeprefix("!").rstrip("/") for line in lines if line.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"pyproject.toml", *(package.rstrip("*") for package in packages)} <= allowed


# Metrics: every long-running service serves them, and Prometheus scrapes them all.


def test_prometheus_scrapes_every_service_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    serving: set[str] = set()
    for entry_point, prefix in [
        ("nexus", "NEXUS_"),
        ("crucible-agent", "CRUCIBLE_"),
        ("sled-agent", "SLED_"),
    ]:
        for name, service in _by_entry_point(services, entry_point).items():
            environment = _environment(service)
            assert environment.get(f"{prefix}METRICS_HOST") == "0.0.0.0", name
            serving.add(f"{name}:{environment[f'{prefix}METRICS_PORT']}")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
        if not target.startswith("localhost:")
    }
    assert targets == serving
    prometheus = services["prometheus"]
    assert prometheus["build"]["context"] == "deploy/prometheus"
    assert (ROOT / "deploy" / "prometheus" / "Dockerfile").exists()


# The variant on a broker cluster and a replicated database (compose.ha.yaml, an override).

RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
POSTGRES_NODES = ("postgres-1", "postgres-2", "postgres-3")
PATRONI_IMAGE = "eventplane-patroni:dev"


class _Override:
    """A value tagged ``!override``: it replaces the base's instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Reset:
    """A value tagged ``!reset``: the base's is dropped."""


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags."""


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _construct_override)
_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _merged(base: Any, override: Any) -> Any:
    """Compose's merge of an override file into a base, for what these tests read:
    mappings merge key by key, ``!override`` replaces, ``!reset`` drops, sequences of
    ports and volumes add up, any other value replaces."""
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            elif key in merged and key in {"ports", "volumes"}:
                merged[key] = [*merged[key], *value]
            else:
                merged[key] = _merged(merged.get(key), value)
        return merged
    return override


@pytest.fixture(scope="module")
def ha_override() -> dict[str, Any]:
    loaded = yaml.load(COMPOSE_HA.read_text(), Loader=_ComposeLoader)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def ha_services(ha_override: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """compose.yaml with compose.ha.yaml over it, as `docker compose -f ... -f ...` sees
    it: the services of the profiles enabled by hand (cli) kept, the others gone."""
    base = yaml.safe_load(COMPOSE.read_text())
    merged = _interpolate(_merged(base, ha_override))
    return {
        name: service
        for name, service in merged["services"].items()
        if set(service.get("profiles", [])) <= {"cli"}
    }


def test_ha_keeps_the_single_nodes_out(ha_services: dict[str, dict[str, Any]]) -> None:
    assert not {"rabbitmq", "postgres"} & set(ha_services)
    for name, service in ha_services.items():
        assert not {"rabbitmq", "postgres"} & set(_depends_on(service)), name
    assert set(RABBITMQ_NODES) | set(POSTGRES_NODES) | {"etcd", "rabbitmq-cluster"} <= set(
        ha_services
    )


def test_ha_every_dependency_exists_and_servers_have_health_checks(
    ha_services: dict[str, dict[str, Any]],
) -> None:
    test_dependencies_exist_and_can_be_met(ha_services)
    one_shots = _one_shots(ha_services)
    assert one_shots == {"migrate", "rabbitmq-cluster"}
    for name, service in ha_services.items():
        if name in one_shots or service.get("profiles"):
            assert service.get("restart") == "no", name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_ha_rabbitmq_nodes_form_one_cluster(ha_services: dict[str, dict[str, Any]]) -> None:
    cookies = set()
    for name in RABBITMQ_NODES:
        node = ha_services[name]
        # The node is rabbit@<hostname>, which cluster.sh names.
        assert node["hostname"] == name
        assert node["command"] == ["sh", "/etc/rabbitmq/cluster.sh", "server"]
        assert node["healthcheck"]["test"][1] in SERVER_TOOLS["rabbitmq"]
        cookies.add(_environment(node)["RABBITMQ_ERLANG_COOKIE"])
        mounts = dict(_mounts(node))
        assert mounts["./deploy/rabbitmq/cluster.conf"] == "/etc/rabbitmq/conf.d/20-eventplane.conf"
        assert f"{name}-data" in mounts, f"{name}: no data volume of its own"
    assert len(cookies) == 1, "the nodes of one cluster share one Erlang cookie"
    script = (ROOT / "deploy" / "rabbitmq" / "cluster.sh").read_text()
    for name in RABBITMQ_NODES:
        assert f"rabbit@{name}" in script
    # No node loads the definitions at boot (its quorum queues would live on it alone).
    conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
    assert not [line for line in conf.splitlines() if line.startswith("load_definitions")]


def test_ha_definitions_are_loaded_once_the_cluster_is_whole(
    ha_services: dict[str, dict[str, Any]],
) -> None:
    one_shot = ha_services["rabbitmq-cluster"]
    assert one_shot["command"] == ["sh", "/etc/rabbitmq/cluster.sh", "cluster"]
    assert (
        _environment(one_shot)["RABBITMQ_ERLANG_COOKIE"]
        == _environment(ha_services["rabbitmq-1"])["RABBITMQ_ERLANG_COOKIE"]
    )
    assert dict(_mounts(one_shot))["./deploy/rabbitmq/definitions.json"] == (
        "/etc/rabbitmq/definitions.json"
    )
    depends_on = _depends_on(one_shot)
    assert {n: depends_on[n]["condition"] for n in RABBITMQ_NODES} == dict.fromkeys(
        RABBITMQ_NODES, "service_healthy"
    )


def test_ha_every_service_gets_every_broker_node(
    services: dict[str, dict[str, Any]], ha_services: dict[str, dict[str, Any]]
) -> None:
    """Each broker setting lists the 3 nodes, as the same user, password and vhost as
    compose.yaml's single URL; the services start at different nodes."""
    firsts: Counter[str] = Counter()
    checked: set[str] = set()
    for name, service in ha_services.items():
        for key, value in _environment(service).items():
            if not key.endswith("_AMQP_URL"):
                continue
            urls = broker_urls(value)
            hosts = [(urlsplit(url).hostname, urlsplit(url).port) for url in urls]
            assert sorted(hosts) == [(node, 5672) for node in RABBITMQ_NODES], (name, hosts)
            single = urlsplit(_environment(services[name])[key])
            for url in urls:
                parts = urlsplit(url)
                assert (parts.username, parts.password, parts.path) == (
                    single.username,
                    single.password,
                    single.path,
                ), name
            firsts[str(hosts[0][0])] += 1
            checked.add(name)
            depends_on = _depends_on(service)
            for node in RABBITMQ_NODES:
                assert depends_on.get(node, {}).get("condition") == "service_healthy", name
            assert depends_on["rabbitmq-cluster"]["condition"] == (
                "service_completed_successfully"
            ), f"{name} may start before the definitions are loaded"
    expected = {
        n for n, s in services.items() if any(k.endswith("_AMQP_URL") for k in _environment(s))
    }
    assert checked == expected, "a service without the cluster's addresses"
    assert set(firsts) == set(RABBITMQ_NODES), f"every service starts at one node: {firsts}"


def test_ha_every_database_user_gets_every_node(ha_services: dict[str, dict[str, Any]]) -> None:
    postgres = {name: _environment(ha_services[name]) for name in POSTGRES_NODES}
    for name, environment in postgres.items():
        assert environment["PATRONI_NAME"] == ha_services[name]["hostname"] == name
    users = {
        (e["POSTGRES_USER"], e["POSTGRES_PASSWORD"], e["POSTGRES_DB"]) for e in postgres.values()
    }
    assert len(users) == 1
    user, password, database = users.pop()
    with_database = {
        name: _environment(s)["NEXUS_DATABASE_URL"]
        for name, s in ha_services.items()
        if "NEXUS_DATABASE_URL" in _environment(s)
    }
    assert set(with_database) == {"migrate", "nexus-1", "nexus-2"}
    for name, url in with_database.items():
        parts = urlsplit(url)
        assert parts.scheme == "postgresql+asyncpg" and parts.hostname is None, name
        assert (parts.username, unquote(parts.password or ""), parts.path) == (
            user,
            password,
            f"/{database}",
        ), name
        query = parse_qs(parts.query)
        assert query["host"] == [f"{node}:5432" for node in POSTGRES_NODES], name
        assert query["target_session_attrs"] == ["read-write"], name
        depends_on = _depends_on(ha_services[name])
        for node in POSTGRES_NODES:
            assert depends_on.get(node, {}).get("condition") == "service_healthy", name
    # And the whole environment still makes valid settings.
    test_environment_validates(ha_services)


def test_ha_database_is_patroni_in_synchronous_mode(ha_services: dict[str, dict[str, Any]]) -> None:
    etcd = ha_services["etcd"]
    assert etcd["image"] == PATRONI_IMAGE and etcd["command"][0] == "etcd"
    for name in POSTGRES_NODES:
        node = ha_services[name]
        assert node["image"] == PATRONI_IMAGE
        assert node["healthcheck"]["test"] == ["CMD", "health.py", "patroni"]
        assert _environment(node)["PATRONI_ETCD3_HOSTS"] == "etcd:2379"
        assert _depends_on(node)["etcd"]["condition"] == "service_healthy"
        assert f"{name}-data" in dict(_mounts(node))
    entrypoint = (ROOT / "deploy" / "standin" / "patroni" / "entrypoint.sh").read_text()
    assert '"synchronous_mode": true' in entrypoint
    assert '"ttl": 10, "loop_wait": 1, "retry_timeout": 4' in entrypoint


def test_ha_volumes_are_declared(
    compose: dict[str, Any], ha_override: dict[str, Any], ha_services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {}) | set(ha_override.get("volumes") or {})
    for name, service in ha_services.items():
        for source, _ in _mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
