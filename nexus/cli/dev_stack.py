"""``nexusctl dev run-all``: the whole stack as local processes, like a one-machine rack.

The command and its options are in :mod:`nexus.cli.dev`, which imports this module (the
development servers, alembic, the transport) only when the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import typer

from nexus.cli.client import NexusClient
from nexus.cli.console import errors_reported, fail, say, stderr
from nexus.cli.demo import run_demo
from nexus.db import migrate
from nexus.devstack.access import Access, provision
from nexus.devstack.patroni import PatroniCluster
from nexus.devstack.servers import (
    PostgresCluster,
    RabbitMQNode,
    amqp_answers,
    port_is_free,
)
from nexus.devstack.stack import (
    READINESS_KEYS,
    Readiness,
    StackConfig,
    StartupFailed,
    metrics_urls,
    plan,
    save_cli_url,
    wait_until_ready,
    with_users,
)
from nexus.devstack.supervisor import ChildSpec, Supervisor
from schemas.identity import CLI_USER, NEXUS_USER
from schemas.redact import redact_url
from schemas.transport import Transport

# Marks a directory as ours, so that starting afresh never deletes anything else.
STATE_MARKER = ".nexus-devstack"
STARTUP_TIMEOUT = 90.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Stopped(Exception):
    """SIGINT or SIGTERM while the stack was starting."""


def run_all(
    amqp_url: str,
    postgres: bool,
    state_dir: Path | None,
    demo: bool,
    create_delay: str,
    *,
    ha_db: bool = False,
) -> None:
    """``nexusctl dev run-all`` (its options are in :mod:`nexus.cli.dev`)."""
    directory = (state_dir or Path("var/demo" if demo else "var/dev")).resolve()
    code = 1
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with contextlib.ExitStack() as servers:
        servers.callback(_restore_signals, previous)
        try:
            with _stop_signals_raise(), errors_reported():
                _fresh(directory)
                url, node = _rabbitmq(amqp_url, servers)
                database_url = _database(directory, postgres, servers, ha_db=ha_db)
                say("upgrading the database schema")
                migrate.upgrade(database_url)
            config = StackConfig(
                state_dir=directory,
                amqp_url=url,
                database_url=database_url,
                create_delay=create_delay,
            )
            code = asyncio.run(_run(config, demo, node))
        except Stopped:
            say("stopped before the stack was up")
        finally:
            # While the private servers stop, a second Ctrl-C must not interrupt that
            # and leave one running.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
    raise typer.Exit(code)


async def _run(config: StackConfig, demo: bool, node: RabbitMQNode | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    stack = plan(config)
    cli_url = config.amqp_url
    if node is not None:
        # Our own node: each process gets its own least-privilege user in the control
        # plane's vhost (nexus.devstack.access), and the topology is provisioned with
        # them; run-all administers the node with rabbitmqctl, and watches as nexusctl.
        access = Access.generate(crucible_agents=stack.crucible_ids, sleds=stack.sled_ids)
        provision(access, node.rabbitmqctl)
        # The node's built-in administrator, with a password everyone knows: gone.
        node.rabbitmqctl("delete_user", "guest")
        stack = with_users(stack, access, config.amqp_url)
        cli_url = access.url(config.amqp_url, CLI_USER)
        config = dataclasses.replace(config, amqp_url=access.url(config.amqp_url, NEXUS_USER))
    cli_url_file = save_cli_url(config.state_dir, cli_url)
    supervisor = Supervisor(_report_death)
    transport = Transport(cli_url, name="nexusctl dev run-all")
    try:
        await transport.connect()
        if node is None:
            # Before any process starts: the agents' first announcements then wait in
            # nexus.events for the replicas instead of going nowhere. (Our own node has
            # it already: it was provisioned with the users.)
            await transport.declare_topology()
        readiness = Readiness(stack.crucible_ids, stack.sled_ids)
        await transport.subscribe(READINESS_KEYS, readiness.handle)
        for spec in [*stack.nexus, *stack.agents]:
            await supervisor.start(spec)
        say(
            f"started {len(stack.nexus)} Nexus replicas, {len(stack.crucible_ids)} crucible "
            f"agents and {len(stack.sled_ids)} sled agents; waiting until they are ready"
        )
        stopped = asyncio.create_task(stop.wait())
        ready = asyncio.create_task(wait_until_ready(supervisor, stack, readiness, STARTUP_TIMEOUT))
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            return 0
        ready.result()
        _say_ready(config, cli_url_file, stack.nexus + stack.agents)
        if not demo:
            await stopped
            return 0
        return await _demo(cli_url, stopped)
    except StartupFailed as error:
        stderr.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return 1
    finally:
        say("stopping the stack")
        for name, code in (await supervisor.stop()).items():
            if code not in (0, -signal.SIGTERM):
                say(f"  {name} exited with status {code}")
        await transport.close()


async def _demo(cli_url: str, stopped: asyncio.Task[bool]) -> int:
    try:
        async with NexusClient(cli_url, timeout=15.0) as client:
            demo = asyncio.create_task(run_demo(client))
            await asyncio.wait({demo, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not demo.done():
                demo.cancel()
                say("demo interrupted")
                return 1
            succeeded = demo.result()
    except Exception as error:
        stderr.print(f"error: demo failed: {error}", markup=False, highlight=False)
        return 1
    say("demo finished" if succeeded else "demo finished with failures (see above)")
    return 0 if succeeded else 1


def _say_ready(config: StackConfig, cli_url_file: Path, children: list[ChildSpec]) -> None:
    say(
        f"stack ready; state and logs in {config.state_dir}\n"
        f"  RabbitMQ:  {redact_url(config.amqp_url)}\n"
        f"  database:  {redact_url(config.database_url)}\n"
        f"  processes: {', '.join(child.name for child in children)} "
        f"(logs: {config.state_dir / 'logs'})\n"
        f"{_metrics_lines(config, children)}"
        f"to use it from another shell (nexusctl's credentials are in {cli_url_file}, "
        "readable by you only):\n"
        f"  {load_cli_url_hint(cli_url_file)}\n"
        f"  nexusctl disk create disk-1 --size 1GiB --wait\n"
        f"Ctrl-C stops everything."
    )


def _metrics_lines(config: StackConfig, children: list[ChildSpec]) -> str:
    """Where each process serves its Prometheus metrics, a line each."""
    urls = metrics_urls(config.state_dir, [child.name for child in children])
    width = max(len(name) for name in urls) + 1 if urls else 0
    lines = "".join(f"    {name + ':':<{width}} {url}\n" for name, url in urls.items())
    return f"  metrics (Prometheus text format, e.g. curl one):\n{lines}"


def load_cli_url_hint(cli_url_file: Path) -> str:
    """The shell line that points nexusctl at the stack, without showing the password."""
    return f'export NEXUS_AMQP_URL="$(cat {shlex.quote(str(cli_url_file))})"'


def _report_death(spec: ChildSpec, code: int) -> None:
    stderr.print(
        f"warning: {spec.name} exited unexpectedly with status {code}; its log: {spec.log_path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _fresh(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not (directory / STATE_MARKER).exists():
            fail(
                f"refusing to empty {directory}: it is not a state directory of "
                f"nexusctl dev (no {STATE_MARKER} file in it)"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_MARKER).write_text(
        "created by nexusctl dev run-all; emptied by its next run\n"
    )


def _rabbitmq(url: str, servers: contextlib.ExitStack) -> tuple[str, RabbitMQNode | None]:
    version = amqp_answers(url)
    if version is not None:
        say(
            f"using RabbitMQ {version} at {redact_url(url)} with these credentials for every "
            "process (per-service users are provisioned only on a private node)"
        )
        return url, None
    parts = urlsplit(url)
    local = parts.hostname in {"localhost", "127.0.0.1", "::1"}
    # On the URL's own port when possible, so that the default URL just works.
    port = parts.port or 5672
    node = RabbitMQNode(port if local and port_is_free(port) else None)
    servers.callback(_stop_server, "RabbitMQ", node.close)
    say(f"nothing answers at {redact_url(url)}; started a private RabbitMQ node: {node.describe()}")
    return node.url, node


def _database(
    directory: Path, postgres: bool, servers: contextlib.ExitStack, *, ha_db: bool
) -> str:
    if ha_db:
        replicated = PatroniCluster()
        servers.callback(_stop_server, "replicated PostgreSQL", replicated.close)
        primary = replicated.primary()
        say(
            f"started a replicated PostgreSQL: {replicated.describe()}; primary "
            f"{primary.name if primary else '?'}. To see the nodes, or fail over:\n"
            f"  patronictl -c {replicated.nodes[0].config_path} list\n"
            f"  patronictl -c {replicated.nodes[0].config_path} failover"
        )
        return replicated.url
    if not postgres:
        return f"sqlite+aiosqlite:///{directory / 'nexus.sqlite3'}"
    cluster = PostgresCluster()
    servers.callback(_stop_server, "PostgreSQL", cluster.close)
    say(f"started a private PostgreSQL cluster: {cluster.describe()}")
    return cluster.url


def _stop_server(name: str, close: Callable[[], None]) -> None:
    say(f"stopping the private {name} server")
    close()


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped while the servers start (synchronous code)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore_signals(previous)


def _restore_signals(handlers: Mapping[signal.Signals, SignalHandler]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
