"""compose.yaml, the Dockerfile and the RabbitMQ definitions agree with the code.

No Docker engine is needed: every service's command and health check must name an entry
point and subcommand that exist (parsed by the real typer apps), every NEXUS_/CRUCIBLE_/
SLED_ variable a settings field (and the whole environment must validate), every broker
URL a user, password and vhost of the definitions with the permissions that service
needs, every volume and dependency something declared.
"""

from __future__ import annotations

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
from urllib.parse import unquote, urlsplit

import pytest
import typer
import yaml
from pydantic_settings import BaseSettings
from typer.core import TyperGroup
from typer.testing import CliRunner

from crucible_agent.settings import CrucibleSettings
from nexus.settings import NexusSettings
from schemas.instance import InstanceState
from schemas.region import RegionState
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENTS_QUEUE,
    crucible_queue,
    sled_queue,
)
from sled_agent.settings import SledSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
DEFINITIONS_SCRIPT = ROOT / "deploy" / "rabbitmq" / "definitions.py"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"

PROJECT_IMAGE = "oxide-eventplane:dev"
# Image services and the server tools their health checks may use.
SERVER_IMAGES = {"rabbitmq": "rabbitmq:3.13-management", "postgres": "postgres:15"}
SERVER_TOOLS = {"rabbitmq": {"rabbitmq-diagnostics"}, "postgres": {"pg_isready"}}

SETTINGS: dict[str, type[BaseSettings]] = {
    "NEXUS_": NexusSettings,
    "CRUCIBLE_": CrucibleSettings,
    "SLED_": SledSettings,
}
# The settings each entry point reads, and the broker user its service connects as.
ENTRY_POINT_SETTINGS = {
    "nexus": "NEXUS_",
    "nexusctl": "NEXUS_",
    "crucible-agent": "CRUCIBLE_",
    "sled-agent": "SLED_",
}
BROKER_USER = {"nexus": "nexus", "crucible-agent": "crucible", "sled-agent": "sled"}

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


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


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
    one_shots = _one_shots(services)
    for name, service in services.items():
        if name in one_shots:
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


def test_one_shots_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in _one_shots(services):
        assert services[name].get("restart") == "no", name


def test_long_running_services_restart(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name not in _one_shots(services):
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


# The broker: URLs against the definitions.


def _amqp_urls(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    for name, service in _project_services(services).items():
        for key, value in _environment(service).items():
            if key.endswith("_AMQP_URL"):
                yield name, _command(service)[0], value


def _permissions(definitions: dict[str, Any], user: str, vhost: str) -> dict[str, str]:
    found = [p for p in definitions["permissions"] if p["user"] == user and p["vhost"] == vhost]
    assert len(found) == 1, f"{user} has {len(found)} permission entries on {vhost}"
    return dict(found[0])


def _allows(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def test_every_service_has_a_broker_url(services: dict[str, dict[str, Any]]) -> None:
    with_url = {name for name, _, _ in _amqp_urls(services)}
    for name, service in _project_services(services).items():
        if _command(service)[1:2] == ["run"]:
            assert name in with_url, f"{name} has no AMQP URL (it would use guest on /)"


def test_broker_urls_match_users_passwords_and_vhost(
    services: dict[str, dict[str, Any]],
    definitions: dict[str, Any],
    definitions_module: ModuleType,
) -> None:
    users = {user["name"]: user for user in definitions["users"]}
    vhosts = {vhost["name"] for vhost in definitions["vhosts"]}
    assert "/" not in vhosts
    for name, entry_point, url in _amqp_urls(services):
        parts = urlsplit(url)
        assert parts.scheme in {"amqp", "amqps"} and parts.hostname == "rabbitmq", name
        user = unquote(parts.username or "")
        assert user == BROKER_USER[entry_point], f"{name} connects as {user!r}"
        assert user in users, f"{name}: no user {user!r} in the definitions"
        assert definitions_module.password_matches(
            unquote(parts.password or ""), users[user]["password_hash"]
        ), f"{name}: the password in its URL does not match {user}'s hash"
        assert users[user]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        vhost = unquote(parts.path.removeprefix("/"))
        assert vhost in vhosts, f"{name}: vhost {vhost!r} is not defined"
        assert vhost == definitions_module.VHOST
        _permissions(definitions, user, vhost)


def test_users_may_do_what_their_service_does(
    services: dict[str, dict[str, Any]], definitions: dict[str, Any]
) -> None:
    vhost = "control-plane"
    exchanges = [COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE]
    nexus = _permissions(definitions, "nexus", vhost)
    for exchange in exchanges:
        assert _allows(nexus["configure"], exchange) and _allows(nexus["write"], exchange)
    for queue in [NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE, DEAD_LETTER_QUEUE]:
        assert _allows(nexus["configure"], queue) and _allows(nexus["read"], queue)
    reply_queue = f"amq_{uuid.uuid4().hex}"  # aio-pika's name for an exclusive queue
    for kind in ("configure", "write", "read"):
        assert _allows(nexus[kind], reply_queue)
    assert _allows(nexus["write"], "amq.default")

    for entry_point, user, key, queue_of in [
        ("crucible-agent", "crucible", "CRUCIBLE_AGENT_ID", crucible_queue),
        ("sled-agent", "sled", "SLED_SLED_ID", sled_queue),
    ]:
        granted = _permissions(definitions, user, vhost)
        for identity in _values(services, entry_point, key):
            queue = queue_of(uuid.UUID(identity))
            for kind in ("configure", "write", "read"):
                assert _allows(granted[kind], queue), f"{user} may not {kind} {queue}"
        for exchange in exchanges:
            assert _allows(granted["configure"], exchange), f"{user}: configure {exchange}"
        for exchange in (EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE, "amq.default"):
            assert _allows(granted["write"], exchange), f"{user} may not publish to {exchange}"


def test_agents_may_not_do_what_they_do_not_need(definitions: dict[str, Any]) -> None:
    vhost = "control-plane"
    some_id = uuid.uuid4()
    crucible = _permissions(definitions, "crucible", vhost)
    sled = _permissions(definitions, "sled", vhost)
    for granted, foreign in [(crucible, sled_queue(some_id)), (sled, crucible_queue(some_id))]:
        for kind in ("configure", "write", "read"):
            assert not _allows(granted[kind], foreign)
        assert not _allows(granted["write"], COMMANDS_EXCHANGE), "agents send no commands"
        for kind in ("configure", "read"):
            assert not _allows(granted[kind], f"amq_{some_id.hex}")
    nexus = _permissions(definitions, "nexus", vhost)
    assert not _allows(nexus["read"], crucible_queue(some_id))
    assert not _allows(nexus["read"], sled_queue(some_id))


def test_topic_permissions_cover_what_each_agent_publishes(definitions: dict[str, Any]) -> None:
    topics = {
        (entry["user"], entry["exchange"]): entry["write"]
        for entry in definitions["topic_permissions"]
    }
    crucible = topics[("crucible", EVENTS_EXCHANGE)]
    sled = topics[("sled", EVENTS_EXCHANGE)]
    crucible_keys = [f"region.{state.value}" for state in RegionState]
    crucible_keys += ["agent.announced", "command.rejected"]
    sled_keys = [f"instance.{state.value}" for state in InstanceState]
    sled_keys += ["sled.registered", "sled.heartbeat", "command.rejected"]
    for key in crucible_keys:
        assert _allows(crucible, key), key
    for key in sled_keys:
        assert _allows(sled, key), key
    for key in ["instance.running", "sled.heartbeat", "disk.ready", "saga.done"]:
        assert not _allows(crucible, key), key
    for key in ["region.created", "agent.announced", "disk.ready", "saga.done"]:
        assert not _allows(sled, key), key


def test_definitions_file_is_what_the_script_writes(
    definitions_module: ModuleType, compose: dict[str, Any]
) -> None:
    """Checked with the passwords compose.yaml uses when no .env sets them."""
    environment = {variable: "" for variable, _ in definitions_module.PASSWORDS.values()}
    assert definitions_module.check(DEFINITIONS, definitions_module.passwords(environment)) == []


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


# Passwords: one place for the defaults.


def test_env_example_lists_every_variable_with_its_default(
    raw_compose: str, definitions_module: ModuleType
) -> None:
    example: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    used = {m.group("name"): m.group("default") for m in _INTERPOLATION.finditer(raw_compose)}
    for name, default in used.items():
        assert example.get(name) == default, f"{name}: .env.example has {example.get(name)!r}"
    for variable, default in definitions_module.PASSWORDS.values():
        assert example.get(variable) == default, variable
    for name, default in example.items():
        assert "dev-only" in default, f"{name}: a default that does not say it is for dev"


# The image.


def test_dockerfile_installs_the_project_as_a_non_root_user(scripts: dict[str, str]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.strip()
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
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
