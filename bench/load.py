"""The ``load`` phase: what one rack's control plane costs its broker and its database.

SCALING.md plans past one rack from these figures. One stack (2 Nexus replicas on
PostgreSQL, 3 crucible agents, 2 sled agents) is measured twice:

- **idle** for a window: the background load every agent adds (heartbeats,
  announcements) and Nexus's own (sweeps, relay sweeps, lease renewals);
- **under load**: disk creates arriving open-loop at a fixed rate (region delay 50 ms),
  each saga followed to its end.

From the broker (``rabbit_global_counters``, read with ``rabbitmqctl eval`` before and
after each window, never during it: each call starts an Erlang VM): messages received
from publishers, routed to queues and delivered to consumers, and open connections.
From PostgreSQL: transactions committed in the stack's database (``pg_stat_database``)
and its connections (``pg_stat_activity``). CPU per process group from ``psutil``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Scale, Servers, Stack

# Summed over the AMQP 0-9-1 counters of every queue type; connections on the node. A
# tuple, not a list: a list of small integers would be printed as a string.
BROKER_COUNTERS = (
    "O = rabbit_global_counters:overview(), P = maps:get([{protocol,amqp091}], O), "
    "D = lists:sum([maps:get(messages_delivered_total, V, 0) || {K, V} <- maps:to_list(O), "
    "lists:member({protocol,amqp091}, K), length(K) =:= 2]), "
    "{maps:get(messages_received_total, P), maps:get(messages_routed_total, P), D, "
    "length(rabbit_networking:connections())}."
)


def broker_counters(servers: Servers) -> dict[str, int]:
    answer = servers.rabbitmq.rabbitmqctl("eval", BROKER_COUNTERS).strip()
    received, routed, delivered, connections = (int(n) for n in answer[1:-1].split(","))
    return {
        "received": received,
        "routed": routed,
        "delivered": delivered,
        "connections": connections,
    }


async def _database_counters(stack_: Stack) -> dict[str, int]:
    from bench.run import _scalar

    return {
        "commits": await _scalar(
            stack_, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ),
        "connections": await _scalar(
            stack_,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        ),
    }


async def _window(
    stack_: Stack, servers: Servers, seconds: float, work: Any = None
) -> dict[str, Any]:
    """Counters over ``seconds`` (or over ``work``, awaited, if longer), per second."""
    from bench.run import _cpu, _processes

    watched = _processes(stack_, servers)
    cpu_before = _cpu(watched)
    broker_before = await asyncio.to_thread(broker_counters, servers)
    database_before = await _database_counters(stack_)
    started = time.monotonic()
    outcome = await work if work is not None else None
    remaining = seconds - (time.monotonic() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
    elapsed = time.monotonic() - started
    database_after = await _database_counters(stack_)
    broker_after = await asyncio.to_thread(broker_counters, servers)
    cpu_after = _cpu(_processes(stack_, servers))
    rates = {
        f"messages_{name}_per_second": (broker_after[name] - broker_before[name]) / elapsed
        for name in ("received", "routed", "delivered")
    }
    rates["commits_per_second"] = (database_after["commits"] - database_before["commits"]) / elapsed
    return {
        "seconds": elapsed,
        **rates,
        "broker_connections": broker_after["connections"],
        # Includes this benchmark's own one connection.
        "database_connections": database_after["connections"],
        "cores": {
            group: (cpu_after.get(group, 0.0) - cpu_before.get(group, 0.0)) / elapsed
            for group in sorted(cpu_after)
        },
        "outcome": outcome,
    }


async def load_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    from bench.run import saga_stats, stack, summary

    rate = 2.0 if scale.quick else 5.0
    seconds = 8.0 if scale.quick else 60.0
    idle_seconds = 8.0 if scale.quick else 30.0
    print(f"- load: idle {idle_seconds:.0f} s, then {rate:.0f} disk creates/s for {seconds:.0f} s")
    async with stack(
        servers, database="postgresql", replicas=2, create_delay="fixed:0.05", seed=seed
    ) as running:
        # Let start-up's announcements and first sweeps pass before the idle window.
        await asyncio.sleep(3.0)
        idle = await _window(running, servers, idle_seconds)

        async def arrivals() -> list[uuid.UUID]:
            tasks = []
            started = time.monotonic()
            for n in range(int(rate * seconds)):
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(running.create_disks(1)))
            sagas = [saga for task in tasks for saga in await task]
            await running.all_finished(sagas, timeout=600)
            return sagas

        loaded = await _window(running, servers, seconds, arrivals())
        sagas: list[uuid.UUID] = loaded.pop("outcome")
        idle.pop("outcome")
        stats = await saga_stats(running, sagas)
    operations = len(sagas)
    per_operation = {
        name: (loaded[f"{name}_per_second"] - idle[f"{name}_per_second"])
        * loaded["seconds"]
        / operations
        for name in ("messages_received", "messages_delivered", "commits")
    }
    result = {
        "offered_per_second": rate,
        "operations": operations,
        "states": stats.states,
        "wake_ms": summary(stats.wakes_ms),
        "idle": idle,
        "loaded": loaded,
        "per_disk_create_above_idle": per_operation,
        "agents": {"crucible": 3, "sled": 2},
        "nexus_replicas": 2,
    }
    print(
        f"  idle: {idle['messages_received_per_second']:.1f} msg/s in, "
        f"{idle['commits_per_second']:.1f} commits/s; loaded: "
        f"{loaded['messages_received_per_second']:.1f} msg/s in, "
        f"{loaded['messages_delivered_per_second']:.1f} out, "
        f"{loaded['commits_per_second']:.1f} commits/s; per disk create above idle: "
        + ", ".join(f"{name} {value:.1f}" for name, value in per_operation.items())
        + f"; connections: broker {loaded['broker_connections']}, "
        f"database {loaded['database_connections']}; {stats.states}"
    )
    return result
