"""The whole rack as real processes for chaos tests, and the faults done to it.

The same processes as ``nexusctl dev run-all`` (``nexus.devstack.stack.plan``: 2 Nexus, 3
crucible agents on distinct sleds, or as many as ``RackSettings.crucible_agents`` says,
2 sled agents) on PostgreSQL, each with its own
least-privilege broker user in a vhost of its own, provisioned by an administrator
before anything starts (``nexus.devstack.access``), as in production, on a PostgreSQL
cluster of the rack's own. Processes are SIGKILLed and started again, a replica is
frozen (SIGSTOP) and continued, or started again with its clock skewed (libfaketime);
the RabbitMQ node is stopped and started keeping its data; PostgreSQL is stopped
(immediate) or SIGKILLed and started again; a crucible agent's data directory, a small
tmpfs, is filled and emptied; a sled is lost for good (``Rack.lose``: its agent
SIGKILLed, never started again, and left out of every fault after).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika

from nexus.devstack.access import Access, provision
from nexus.devstack.stack import READINESS_KEYS, Readiness, StackConfig, StackPlan, plan
from schemas.brokers import broker_urls
from schemas.identity import CLI_USER, NEXUS_USER, crucible_user, sled_user
from schemas.topology import (
    DEAD_LETTER_QUEUE,
    DETAIL_HEADER,
    NEXUS_EVENTS_QUEUE,
    ORIGINAL_QUEUE_HEADER,
    REASON_HEADER,
)
from schemas.transport import Transport
from tests.chaos.machine import SmallDisk
from tests.harness.servers import (
    PatroniPostgres,
    PrivatePostgresCluster,
    PrivateRabbitMQCluster,
    RabbitMQServer,
)
from tests.processes import Service, libfaketime

READY_TIMEOUT = 90.0


@dataclass(frozen=True)
class RackSettings:
    lease_seconds: float = 2.0
    sweep_seconds: float = 0.2
    # Regions take a little while, so sagas really park and are woken by events.
    create_delay: str = "uniform:0.05,0.6"
    # Short, so that a PostgreSQL outage longer than it fits in a run: regions are
    # asked for (the reconcile) once their deadline passed without a notification.
    region_deadline_seconds: float = 5.0
    # Each crucible agent's data directory is a tmpfs of this size, which the driver
    # fills; room for the state database and the (sparse) regions of a long run.
    agent_disk_bytes: int = 32 << 20
    nexus_replicas: int = 2
    # One more than a disk's 3 regions lets a lost sled's every region be rebuilt on a
    # sled its disk does not use (the chaos run expunges one); 3 for the node-loss run.
    crucible_agents: int = 3


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    type: str | None
    user_id: str | None
    reason: str
    detail: str
    original_queue: str

    def describe(self) -> str:
        return (
            f"{self.type} {self.message_id} from user {self.user_id} "
            f"(queue {self.original_queue}): {self.reason}: {self.detail}"
        )


@dataclass
class Rack:
    server: RabbitMQServer
    # The single PostgreSQL the classic faults stop and kill, or a replicated one.
    database: PrivatePostgresCluster | PatroniPostgres
    settings: RackSettings
    access: Access
    stack: StackPlan
    services: dict[str, Service]
    # The crucible agents' data directories, by service name.
    disks: dict[str, SmallDisk]
    # Nexus's database (on a replicated server: an address that finds the primary).
    database_url: str
    unexpected_exits: list[str] = field(default_factory=list)
    # Replicas whose clock is skewed (a libfaketime FAKETIME offset such as "+30s"): a
    # machine's clock stays wrong across restarts of the process, so every start of
    # the replica gets it.
    skews: dict[str, str] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    # Services of a sled that was lost for good (expunged): SIGKILLed once and never
    # started again; no fault is done to them after (``of_kind`` leaves them out).
    lost: set[str] = field(default_factory=set)

    @property
    def operator_url(self) -> str:
        """The server's own administrator in this vhost: to look behind the services (on
        a cluster, every node's URL)."""
        return ",".join(
            url.rstrip("/") + f"/{self.access.vhost}" for url in broker_urls(self.server.url)
        )

    @property
    def cli_url(self) -> str:
        return self.access.url(self.server.url, CLI_USER)

    @property
    def nexus_names(self) -> list[str]:
        return list(self.stack.replica_ids)

    @property
    def agent_names(self) -> list[str]:
        return [name for name in self.services if name not in self.stack.replica_ids]

    def of_kind(self, kind: str) -> list[str]:
        """The live services of one kind: ``nexus``, ``crucible`` or ``sled``."""
        if kind == "nexus":
            return self.nexus_names
        return [
            name
            for name in self.agent_names
            if name.startswith(f"{kind}-") and name not in self.lost
        ]

    def sled_of(self, name: str) -> uuid.UUID:
        """The sled an agent runs on."""
        env = self.services[name].env
        return uuid.UUID(env.get("CRUCIBLE_SLED_ID") or env["SLED_SLED_ID"])

    def storage_only(self) -> list[str]:
        """The crucible agents on sleds that run no sled agent (no VMM is lost with
        them), still live."""
        vmm_sleds = {self.sled_of(name) for name in self.of_kind("sled")}
        return [name for name in self.of_kind("crucible") if self.sled_of(name) not in vmm_sleds]

    async def lose(self, names: list[str]) -> None:
        """A sled lost for good: its services SIGKILLed and never started again."""
        self.lost.update(names)
        for name in names:
            await self.kill(name)

    def start(self, name: str) -> None:
        skew = self.skews.get(name)
        extra = {"LD_PRELOAD": libfaketime(), "FAKETIME": skew} if skew else None
        self.services[name].start(extra_env=extra)

    def start_all(self) -> None:
        for name, service in self.services.items():
            if not service.running and name not in self.lost:
                self.start(name)

    def note_exits(self) -> None:
        """Record processes that exited although nobody killed them: each is a finding."""
        for name, service in self.services.items():
            if service.process is not None and not service.running:
                code = service.process.returncode
                why = last_error(service.log_text())
                self.unexpected_exits.append(
                    f"{name} exited by itself with status {code}" + (f": {why}" if why else "")
                )
                service.exits.append(code)
                service.process = None

    async def kill(self, name: str) -> None:
        service = self.services[name]
        if service.running:
            service.send(signal.SIGKILL)
            await service.wait_exit()
        service.process = None

    def restart(self, name: str) -> None:
        if not self.services[name].running and name not in self.lost:
            self.start(name)

    async def restart_skewed(self, name: str, skew: str) -> None:
        """SIGKILL a replica and start it with its clock off by ``skew`` (``+30s``)."""
        self.skews[name] = skew
        await self.kill(name)
        self.start(name)

    async def freeze(self, name: str, seconds: float) -> None:
        """SIGSTOP the process for ``seconds``, then SIGCONT it (always, even if the test
        is cancelled meanwhile)."""
        process = self.services[name].process
        assert process is not None and process.poll() is None, f"{name} is not running"
        process.send_signal(signal.SIGSTOP)
        self.frozen.add(name)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.frozen.discard(name)
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)

    @property
    def single_database(self) -> PrivatePostgresCluster:
        assert isinstance(self.database, PrivatePostgresCluster), "a replicated database"
        return self.database

    async def kill_db_primary(self, down_seconds: float) -> tuple[str, str, float]:
        """Lose the primary database node (its Patroni and postmaster SIGKILLed), wait for
        a standby to take writes, and start the lost node again ``down_seconds`` after
        the kill: (lost node, new primary, seconds until the new primary took writes)."""
        cluster = self.database
        assert isinstance(cluster, PatroniPostgres), "not a replicated database"
        primary = await asyncio.to_thread(cluster.wait_for_primary, 30.0)
        began = time.monotonic()
        killed = await asyncio.to_thread(primary.crash)
        promoted = await asyncio.to_thread(cluster.wait_for_primary, 60.0, other_than=primary.name)
        failover = time.monotonic() - began
        await asyncio.sleep(max(0.0, down_seconds - failover))
        await asyncio.to_thread(primary.start)
        return f"{primary.name} ({killed})", promoted.name, failover

    async def lose_broker_node(
        self, down_seconds: float, *, clean: bool, pick: float
    ) -> tuple[str, str, float]:
        """Lose a node of the RabbitMQ cluster: SIGKILL the one leading ``nexus.events``,
        or stop one cleanly (``pick``, in [0, 1), chooses which), wait until the queue is
        led by another, and start the lost node again ``down_seconds`` after it went:
        (lost node, new leader, seconds until it led)."""
        cluster = self.server
        assert isinstance(cluster, PrivateRabbitMQCluster), "not a RabbitMQ cluster"
        if clean:
            node = cluster.nodes[min(len(cluster.nodes) - 1, int(pick * len(cluster.nodes)))]
        else:
            node = cluster.node_named(await asyncio.to_thread(self._events_leader))
        began = time.monotonic()
        await asyncio.to_thread(node.stop if clean else node.kill)
        deadline = time.monotonic() + 60
        while (leader := await asyncio.to_thread(self._events_leader)) in ("", node.name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nexus.events has no leader but {node.name} after 60 s")
            await asyncio.sleep(0.2)
        failover = time.monotonic() - began
        await asyncio.sleep(max(0.0, down_seconds - failover))
        await asyncio.to_thread(node.start)
        await asyncio.to_thread(cluster.await_running, [node])
        return node.name, leader, failover

    def _events_leader(self) -> str:
        """The node leading the rack's ``nexus.events`` quorum queue ('' while none does)."""
        listed = self.server.rabbitmqctl(
            "list_queues", "-p", self.access.vhost, "name", "leader", "--formatter", "json"
        )
        for queue in json.loads(listed):
            if queue["name"] == NEXUS_EVENTS_QUEUE:
                return str(queue.get("leader") or "")
        return ""

    async def stop_postgres(self, down_seconds: float) -> float:
        """``pg_ctl stop -m immediate``, then started again after ``down_seconds``; how
        long it accepted no connection."""
        began = time.monotonic()
        await asyncio.to_thread(self.single_database.stop_immediately)
        await asyncio.sleep(max(0.0, down_seconds - (time.monotonic() - began)))
        await asyncio.to_thread(self.single_database.start)
        return time.monotonic() - began

    async def kill_postgres(self, down_seconds: float) -> tuple[float, str]:
        """SIGKILL the postmaster, then start PostgreSQL again (crash recovery) after
        ``down_seconds``; how long it was down, and what was killed."""
        began = time.monotonic()
        killed = await asyncio.to_thread(self.single_database.kill)
        await asyncio.sleep(max(0.0, down_seconds - (time.monotonic() - began)))
        await asyncio.to_thread(self.single_database.start)
        return time.monotonic() - began, killed

    def mount_disks(self) -> None:
        for disk in self.disks.values():
            disk.mount()

    @property
    def logs_dir(self) -> Path:
        return self.stack.health_files[0].parent / "logs"

    def unmount_disks(self) -> None:
        """After the agents stopped; their state databases are kept beside the logs."""
        for name, disk in self.disks.items():
            disk.unmount(keep=self.logs_dir / f"{name}-state")

    async def fill_disk(self, name: str) -> int:
        return await asyncio.to_thread(self.disks[name].fill)

    async def empty_disk(self, name: str) -> None:
        await asyncio.to_thread(self.disks[name].empty)

    async def restart_rabbitmq(self, down_seconds: float) -> None:
        # rabbitmqctl stop and the node's start block for seconds: off the event loop, so
        # the workload and the services' reconnect attempts carry on meanwhile.
        await asyncio.to_thread(self.server.stop)
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(self.server.start)

    async def wait_until_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Every replica healthy, then every agent heard from (see ``Readiness``)."""
        readiness = Readiness(self.stack.crucible_ids, self.stack.sled_ids)
        async with Transport(self.operator_url, name="chaos-readiness") as transport:
            await transport.subscribe(READINESS_KEYS, readiness.handle)
            deadline = time.monotonic() + timeout
            while not readiness.complete:
                dead = [name for name, s in self.services.items() if not s.running]
                if dead:
                    raise RuntimeError(f"died while starting: {', '.join(dead)}")
                if not readiness.armed and all(p.exists() for p in self.stack.health_files):
                    readiness.arm()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the rack was not ready after {timeout:g}s")
                await asyncio.sleep(0.1)

    async def stop_all(self) -> None:
        for name in list(self.frozen):
            process = self.services[name].process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
        await asyncio.gather(*(service.stop() for service in self.services.values()))

    async def dead_letters(self) -> list[DeadLetter]:
        """Everything in ``control.dead-letters``, read without removing it."""
        letters: list[DeadLetter] = []
        connection = await _connect_any(broker_urls(self.operator_url))
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(DEAD_LETTER_QUEUE)
            # Held unacked until the connection closes, so get() moves past each one.
            while (incoming := await queue.get(fail=False)) is not None:
                headers = incoming.headers or {}
                letters.append(
                    DeadLetter(
                        message_id=incoming.message_id,
                        type=incoming.type,
                        user_id=incoming.user_id,
                        reason=_text(headers.get(REASON_HEADER)),
                        detail=_text(headers.get(DETAIL_HEADER)),
                        original_queue=_text(headers.get(ORIGINAL_QUEUE_HEADER)),
                    )
                )
        return letters

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name, service in self.services.items():
            tail = service.log_text().splitlines()[-lines:]
            parts.append(f"--- {name} ({service.log_path})\n" + "\n".join(tail))
        return "\n".join(parts)

    def exit_counts(self) -> Counter[str]:
        return Counter({name: len(s.exits) for name, s in self.services.items()})


def last_error(log: str) -> str | None:
    """The message of the last error a service logged (its logs are JSON lines)."""
    for line in reversed(log.splitlines()[-200:]):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            return str(entry.get("msg", ""))[:300]
    return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def build_rack(
    server: RabbitMQServer,
    database: PrivatePostgresCluster | PatroniPostgres,
    database_url: str,
    state_dir: Path,
    seed: int,
    settings: RackSettings,
) -> Rack:
    """Provision the vhost and users, and plan every process (nothing starts or is
    mounted yet)."""
    vhost = f"chaos-{uuid.uuid4().hex[:10]}"
    config = StackConfig(
        state_dir=state_dir,
        amqp_url=server.url,
        database_url=database_url,
        create_delay=settings.create_delay,
        nexus_replicas=settings.nexus_replicas,
        crucible_agents=settings.crucible_agents,
    )
    stack = plan(config)
    access = Access.generate(vhost, crucible_agents=stack.crucible_ids, sleds=stack.sled_ids)
    provision(access, server.rabbitmqctl)
    server.rabbitmqctl("set_permissions", "-p", vhost, _operator(server), ".*", ".*", ".*")

    services: dict[str, Service] = {}
    disks: dict[str, SmallDisk] = {}
    for spec in stack.nexus:
        env = dict(spec.env) | {
            "NEXUS_AMQP_URL": access.url(server.url, NEXUS_USER),
            "NEXUS_LEASE_SECONDS": str(settings.lease_seconds),
            "NEXUS_SWEEP_SECONDS": str(settings.sweep_seconds),
            "NEXUS_REGION_DEADLINE_SECONDS": str(settings.region_deadline_seconds),
        }
        services[spec.name] = _service(spec.name, list(spec.argv), env, spec.log_path)
    crucible_urls = {
        str(agent): access.url(server.url, crucible_user(agent)) for agent in stack.crucible_ids
    }
    sled_urls = {str(sled): access.url(server.url, sled_user(sled)) for sled in stack.sled_ids}
    for number, spec in enumerate(stack.agents):
        env = dict(spec.env)
        if "CRUCIBLE_AGENT_ID" in env:
            env["CRUCIBLE_AMQP_URL"] = crucible_urls[env["CRUCIBLE_AGENT_ID"]]
            # Each agent draws its create delays from its own stream of the run's seed.
            env["CRUCIBLE_SEED"] = str(seed * 100 + number)
            disks[spec.name] = SmallDisk(Path(env["CRUCIBLE_DATA_DIR"]), settings.agent_disk_bytes)
        else:
            env["SLED_AMQP_URL"] = sled_urls[env["SLED_SLED_ID"]]
        services[spec.name] = _service(spec.name, list(spec.argv), env, spec.log_path)
    return Rack(
        server=server,
        database=database,
        settings=settings,
        access=access,
        stack=stack,
        services=services,
        disks=disks,
        database_url=database_url,
    )


def _service(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Service:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return Service(name=name, argv=argv, env=env, log_path=log_path)


def _operator(server: RabbitMQServer) -> str:
    return urlsplit(broker_urls(server.url)[0]).username or "guest"


async def _connect_any(urls: list[str]) -> aio_pika.abc.AbstractConnection:
    """A connection to the first node of ``urls`` that answers."""
    failures = []
    for url in urls:
        try:
            return await aio_pika.connect(url)
        except (OSError, aio_pika.exceptions.AMQPError) as error:
            failures.append(repr(error))
    raise ConnectionError(f"no node answers: {'; '.join(failures)}")


def unprovision(rack: Rack) -> None:
    rack.server.rabbitmqctl("delete_vhost", rack.access.vhost)
    for user in rack.access.grants():
        rack.server.rabbitmqctl("delete_user", user)
