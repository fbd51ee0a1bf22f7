"""``nexusctl dev run-all`` on a RabbitMQ node of its own practises least privilege: no
``guest`` on the control plane's vhost, nexusctl's credentials in a file only its owner
can read, and a hint that loads them rather than a password on the screen."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import psutil
import pytest

from nexus.devstack.access import VHOST
from nexus.devstack.servers import free_port
from nexus.devstack.stack import CLI_URL_FILE

pytestmark = [pytest.mark.e2e, pytest.mark.security]

NEXUSCTL = str(Path(sys.executable).parent / "nexusctl")


@dataclass(frozen=True)
class OwnNodeStack:
    port: int
    state_dir: Path
    output: Path


@pytest.fixture
def own_node_stack(tmp_path: Path) -> Iterator[OwnNodeStack]:
    """run-all where nothing answers at --amqp-url: it starts and provisions its own node."""
    port = free_port()
    stack = OwnNodeStack(port, tmp_path / "stack", tmp_path / "run-all.out")
    with stack.output.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(NEXUSCTL, "dev", "run-all", "--state-dir", str(stack.state_dir)),
                *("--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/"),
                *("--create-delay", "uniform:0.05,0.1"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "stack ready" not in stack.output.read_text():
            assert process.poll() is None, f"run-all exited:\n{stack.output.read_text()}"
            assert time.monotonic() < deadline, f"not ready:\n{stack.output.read_text()}"
            time.sleep(0.2)
        children = psutil.Process(process.pid).children(recursive=True)
        yield stack
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, stack.output.read_text()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


def test_run_all_grants_guest_nothing_and_shows_no_password(own_node_stack: OwnNodeStack) -> None:
    stack = own_node_stack
    url_file = stack.state_dir / CLI_URL_FILE
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    cli_url = url_file.read_text().strip()
    password = urlsplit(cli_url).password
    assert urlsplit(cli_url).username == "nexusctl" and password

    # Nothing it printed, and nothing in its logs, holds the password.
    printed = stack.output.read_text()
    assert password not in printed
    for log in (stack.state_dir / "logs").iterdir():
        assert password not in log.read_text(errors="replace"), log

    # The hint it printed, run as printed, points nexusctl at the stack.
    (hint,) = [line.strip() for line in printed.splitlines() if "NEXUS_AMQP_URL" in line]
    listed = subprocess.run(
        ["bash", "-c", f"{hint} && {NEXUSCTL} disk list --output json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (listed.returncode, listed.stdout.strip()) == (0, "[]"), listed.stderr

    # guest cannot open the control plane's vhost (nor any other: it is gone).
    for vhost in (VHOST, ""):
        refused = asyncio.run(connect_as_guest(stack.port, vhost))
        assert "ACCESS_REFUSED" in refused or "authentication" in refused.lower(), refused


async def connect_as_guest(port: int, vhost: str) -> str:
    """Why the broker refused guest: the error, or a failure of the test if it did not."""
    try:
        connection = await aio_pika.connect(
            f"amqp://guest:guest@127.0.0.1:{port}/{vhost}", timeout=10
        )
    except Exception as error:
        return repr(error)
    await connection.close()
    pytest.fail(f"guest connected to vhost {vhost!r}")
