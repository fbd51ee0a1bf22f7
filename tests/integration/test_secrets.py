"""Broker and database passwords never appear in what the services and the CLI print,
even when the password is wrong or the server unreachable (the errors quote URLs)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from nexus.db.migrate import upgrade_async
from nexus.devstack.servers import free_port
from tests.processes import BIN, Service, crucible, nexus

pytestmark = [pytest.mark.integration, pytest.mark.security]

BROKER_PASSWORD = "Br0ker-pw-" + uuid.uuid4().hex
DATABASE_PASSWORD = "Datab4se-pw-" + uuid.uuid4().hex
RUN_SECONDS = 4.0
FAILURE_SIGNS = {
    "wrong-password": "ACCESS_REFUSED",
    "unreachable": "onnect",  # "Connect call failed", "cannot connect", "connection refused"
    "database-unreachable": "onnect",
}


def broker_urls(rabbitmq_url: str) -> dict[str, str]:
    """A wrong password on the real broker, and a port where nothing listens."""
    host = urlsplit(rabbitmq_url).netloc.rpartition("@")[2]
    return {
        "wrong-password": f"amqp://guest:{BROKER_PASSWORD}@{host}/",
        "unreachable": f"amqp://guest:{BROKER_PASSWORD}@127.0.0.1:{free_port()}/",
    }


def assert_secret_free(text: str, failure: str) -> None:
    # The failure must have been met and reported, or there was nothing to leak.
    assert FAILURE_SIGNS[failure] in text, text[-3000:]
    for secret in (BROKER_PASSWORD, DATABASE_PASSWORD):
        assert secret not in text, f"a password leaked:\n{text[-3000:]}"


async def run_briefly(service: Service) -> str:
    service.start()
    try:
        await asyncio.sleep(RUN_SECONDS)
    finally:
        await service.stop()
    return service.log_text()


@pytest.mark.parametrize("failure", ["wrong-password", "unreachable"])
async def test_the_agents_never_print_the_broker_password(
    rabbitmq_url: str, tmp_path: Path, failure: str
) -> None:
    url = broker_urls(rabbitmq_url)[failure]
    agent = crucible(url, tmp_path, log_level="DEBUG").service
    sled = Service(
        name="sled",
        argv=[str(BIN / "sled-agent"), "run"],
        env={
            "SLED_SLED_ID": str(uuid.uuid4()),
            "SLED_DATA_DIR": str(tmp_path / "sled"),
            "SLED_AMQP_URL": url,
            "SLED_LOG_LEVEL": "DEBUG",
        },
        log_path=tmp_path / "sled.log",
    )
    for service in (agent, sled):
        assert_secret_free(await run_briefly(service), failure)


@pytest.mark.parametrize("failure", ["wrong-password", "unreachable", "database-unreachable"])
async def test_nexus_never_prints_either_password(
    rabbitmq_url: str, tmp_path: Path, failure: str
) -> None:
    if failure == "database-unreachable":
        database_url = (
            f"postgresql+asyncpg://nexus:{DATABASE_PASSWORD}@127.0.0.1:{free_port()}/nexus"
        )
        amqp_url = rabbitmq_url
    else:
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
        await upgrade_async(database_url)
        amqp_url = broker_urls(rabbitmq_url)[failure]
    replica = nexus(
        "r1", database_url=database_url, amqp_url=amqp_url, workdir=tmp_path, log_level="DEBUG"
    )
    assert_secret_free(await run_briefly(replica), failure)


@pytest.mark.parametrize("failure", ["wrong-password", "unreachable"])
@pytest.mark.parametrize(
    "command", [["disk", "list"], ["saga", "list"], ["doctor"], ["db", "upgrade"]]
)
def test_the_cli_never_prints_either_password(
    rabbitmq_url: str, failure: str, command: list[str]
) -> None:
    environment = {
        "NEXUS_AMQP_URL": broker_urls(rabbitmq_url)[failure],
        "NEXUS_DATABASE_URL": (
            f"postgresql+asyncpg://nexus:{DATABASE_PASSWORD}@127.0.0.1:{free_port()}/nexus"
        ),
        "PATH": str(BIN),
    }
    result = subprocess.run(
        [str(BIN / "nexusctl"), *command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert_secret_free(output, "database-unreachable" if command[0] == "db" else failure)
