"""The rack for end-to-end tests: ``nexusctl dev run-all`` as a real process tree, and
``nexusctl ... --output json`` as real processes against it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness.servers import NotSupportedInMode, RabbitMQServer

NEXUSCTL = str(Path(sys.executable).parent / "nexusctl")


@dataclass(frozen=True)
class Result:
    code: int
    document: Any
    stderr: str


@dataclass
class Rack:
    amqp_url: str
    # Nexus's database (nexus.sqlite3), the agents' data and the logs.
    state_dir: Path

    def ctl(self, *args: str, timeout: float = 60.0) -> Result:
        completed = subprocess.run(
            [NEXUSCTL, *args, "--amqp-url", self.amqp_url, "--output", "json"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        document = json.loads(completed.stdout) if completed.stdout.strip() else None
        return Result(completed.returncode, document, completed.stderr)

    def ok(self, *args: str) -> Any:
        result = self.ctl(*args)
        assert result.code == 0, f"nexusctl {' '.join(args)}: {result.stderr}{result.document}"
        return result.document

    def all_ok(self, commands: list[list[str]]) -> list[Any]:
        """Run the commands concurrently, as several operators would."""
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            return list(pool.map(lambda args: self.ok(*args), commands))


@pytest.fixture
def amqp_url(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    """A virtual host of its own when the server allows it: other tests leave crucible
    agents' announcements in ``nexus.events``, which this rack's Nexus would take for
    datasets it could place regions on."""
    vhost = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        rabbitmq_server.rabbitmqctl("add_vhost", vhost)
    except NotSupportedInMode:
        yield rabbitmq_server.url
        return
    rabbitmq_server.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield rabbitmq_server.url.rstrip("/") + f"/{vhost}"
    rabbitmq_server.rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def rack(amqp_url: str, tmp_path: Path) -> Iterator[Rack]:
    output = tmp_path / "run-all.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                NEXUSCTL,
                "dev",
                "run-all",
                "--amqp-url",
                amqp_url,
                "--state-dir",
                str(tmp_path / "stack"),
                "--create-delay",
                "uniform:0.05,0.3",
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "stack ready" not in output.read_text():
            assert process.poll() is None, f"run-all exited:\n{output.read_text()}"
            assert time.monotonic() < deadline, f"run-all not ready:\n{output.read_text()}"
            time.sleep(0.1)
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) == 7, children
        yield Rack(amqp_url, tmp_path / "stack")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    log = output.read_text()
    assert code == 0, log
    assert "exited unexpectedly" not in log, log
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {alive}"
