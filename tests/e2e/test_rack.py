"""The whole rack through the CLI: ``nexusctl dev run-all`` as a real process tree, and
every operation as a real ``nexusctl ... --output json`` process against it."""

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

pytestmark = pytest.mark.e2e

NEXUSCTL = str(Path(sys.executable).parent / "nexusctl")
PROJECT = "e2e"


@dataclass(frozen=True)
class Result:
    code: int
    document: Any
    stderr: str


@dataclass
class Rack:
    amqp_url: str

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
        yield Rack(amqp_url)
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


def test_disks_and_instances_through_the_cli(rack: Rack) -> None:
    started = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - started:6.1f}s {what}")

    disks = [f"disk-{n}" for n in range(10)]
    created = rack.all_ok(
        [["disk", "create", name, "--size", "256MiB", "-p", PROJECT, "--wait"] for name in disks]
    )
    assert all(outcome["state"] == "done" for outcome in created)
    mark("10 disks created")

    listed = rack.ok("disk", "list", "-p", PROJECT)
    assert sorted(disk["name"] for disk in listed) == disks
    assert {disk["state"] for disk in listed} == {"detached"}

    # The timeline of a disk: three regions, each woken by its agent's notification.
    timeline = rack.ok("saga", "show", created[0]["saga_id"])
    assert timeline["state"] == "done"
    assert len(timeline["wakes"]) == 3
    assert not any(wake["by_reconcile"] for wake in timeline["wakes"])

    # Mistakes are one line and exit 1: a duplicate name, an unknown id.
    duplicate = rack.ctl("disk", "create", disks[0], "--size", "1GiB", "-p", PROJECT)
    assert duplicate.code == 1 and "already exists" in duplicate.stderr
    assert len(duplicate.stderr.strip().splitlines()) == 1
    unknown = rack.ctl("disk", "show", str(uuid.uuid4()), "-p", PROJECT)
    assert unknown.code == 1 and "not_found" in unknown.stderr

    vms = ["vm-1", "vm-2"]
    launched = rack.all_ok(
        [
            [
                *("instance", "create", vm, "--ncpus", "2", "--memory", "1GiB", "-p", PROJECT),
                *("--disk", disks[2 * n], "--disk", disks[2 * n + 1], "--wait"),
            ]
            for n, vm in enumerate(vms)
        ]
    )
    assert all(outcome["state"] == "done" for outcome in launched)
    mark("2 instances created")
    instances = {i["name"]: i for i in rack.ok("instance", "list", "-p", PROJECT)}
    assert {name: i["state"] for name, i in instances.items()} == dict.fromkeys(vms, "running")
    attached = {disk["id"]: disk for disk in rack.ok("disk", "list", "-p", PROJECT)}
    for n, vm in enumerate(vms):
        assert len(instances[vm]["disk_ids"]) == 2
        for disk_id in instances[vm]["disk_ids"]:
            assert attached[disk_id]["name"] in disks[2 * n : 2 * n + 2]
            assert attached[disk_id]["state"] == "attached"

    for action, state in (("stop", "stopped"), ("start", "running")):
        rack.all_ok([["instance", action, vm, "-p", PROJECT, "--wait"] for vm in vms])
        listed_instances = rack.ok("instance", "list", "-p", PROJECT)
        assert {i["state"] for i in listed_instances} == {state}
        mark(f"instances {state}")

    rack.all_ok([["instance", "delete", vm, "-p", PROJECT, "--wait"] for vm in vms])
    assert rack.ok("instance", "list", "-p", PROJECT) == []
    rack.all_ok([["disk", "delete", name, "-p", PROJECT, "--wait"] for name in disks])
    assert rack.ok("disk", "list", "-p", PROJECT) == []
    mark("instances and disks deleted")

    report = rack.ctl("doctor")
    assert report.code == 0, report.document
    assert report.document["healthy"] is True
    assert report.document["unreachable_agents"] == []
    assert rack.ok("saga", "list", "--state", "stuck") == []
