"""The third baseline, a long poll (omicron#996's other proposal), at both ends.

Nexus asks the crucible agent about a region; the agent answers when the region
changes or after ``HOLD_SECONDS`` (30 s), and Nexus asks again at once, until the
region is no longer ``requested``. Three parts, all the benchmark's own:

- **the agent's end** (``python -m bench.longpoll agent``): ``crucible-agent run`` (the
  same settings, records, outbox, events and commands) plus a long-poll endpoint on
  a queue of its own, ``crucible-longpoll.<agent_id>``: a ``RegionGet`` there is held
  (its delivery and a timer, in memory) until a transaction that changed the region
  commits, or the hold passes; a region already past ``requested`` is answered at once.
  The answer is a reply (``RegionInfo``), not a durable message: a held poll whose
  asker is gone is answered into nothing.
- **Nexus's end** (:class:`LongPoller`): one task per region wait in the replica that
  ran the region's node, asking in a loop. When the answer is news it records it at
  the wait's rendezvous as an event would (one transaction) and runs the saga; each
  answer without news is one ``waiting`` log entry (so the benchmark counts requests
  as it counts the pollers'). The task lives in the replica's memory only: if the
  replica dies, nobody asks any more, and the wait stays parked until its deadline's
  reconcile (by any replica) asks once and starts a new loop there.
- **a model of Nexus's end at scale** (``python -m bench.longpoll model``): one
  process holding ``--regions`` long polls against the agents through the same
  loop, without the saga engine (its answers are counted, not recorded), to measure
  what 10,000 waiting regions cost both ends: requests per second, polls held, memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import resource
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible_agent import app as agent_app
from crucible_agent import regions
from crucible_agent.service import RegionService
from crucible_agent.settings import CrucibleSettings
from crucible_agent.store import AgentStore, Cause, Transaction
from schemas.region import (
    Region,
    RegionFound,
    RegionGet,
    RegionInfo,
    RegionRef,
    RegionState,
)
from schemas.service import run_service, settings_from
from schemas.transport import Delivery, PublishFailed, RequestTimedOut, Transport

log = logging.getLogger(__name__)

HOLD_SECONDS = 30.0
# How long Nexus waits for an answer beyond the hold before it asks again.
ANSWER_GRACE_SECONDS = 5.0
# After a request that got no answer (the agent is down), before asking again.
RETRY_SECONDS = 1.0


def longpoll_queue(agent_id: uuid.UUID) -> str:
    return f"crucible-longpoll.{agent_id}"


def crucible_source(agent_id: uuid.UUID) -> str:
    return f"crucible/{agent_id}"


# The agent's end.


class WatchedStore(AgentStore):
    """The agent's store, telling ``on_commit`` which regions a transaction changed once
    it committed (transactions run one at a time, under the store's lock)."""

    changes: list[Region]
    on_commit: Callable[[list[Region]], None] | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with super().transaction() as tx:
            self.changes = []
            yield tx
            changed = self.changes
        if changed and self.on_commit is not None:
            self.on_commit(changed)


class WatchedService(RegionService):
    """The agent's service, noting each recorded region change in its transaction."""

    async def _record(self, tx: Transaction, change: regions.Changed, cause: Cause) -> None:
        await super()._record(tx, change, cause)
        store = self._store
        assert isinstance(store, WatchedStore)
        store.changes.append(change.region)


@dataclass
class Held:
    delivery: Delivery
    timer: asyncio.TimerHandle
    # What the region was when the poll was held; a change since would have answered
    # it, so the hold's end answers with this, without reading again.
    region: Region | None = None


@dataclass
class LongPolls:
    """The endpoint: long polls held per region until news or the hold passes."""

    agent_id: uuid.UUID
    store: AgentStore
    transport: Transport
    hold_seconds: float = HOLD_SECONDS
    held: dict[uuid.UUID, dict[uuid.UUID, Held]] = field(default_factory=dict)
    answered: int = 0
    expired: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def source(self) -> str:
        return crucible_source(self.agent_id)

    @property
    def holding(self) -> int:
        return sum(len(polls) for polls in self.held.values())

    async def handle(self, delivery: Delivery) -> None:
        message = delivery.message
        if not isinstance(message, RegionGet):
            return
        region_id = message.payload.id
        # Held before the read: a change committed during the read answers it.
        timer = asyncio.get_running_loop().call_later(
            self.hold_seconds, self._expire, region_id, message.id
        )
        self.held.setdefault(region_id, {})[message.id] = Held(delivery, timer)
        region = await self.store.region(region_id)
        if region is not None and region.state is not RegionState.REQUESTED:
            held = self._take(region_id, message.id)
            if held is not None:
                await self._answer(held, region_id, region)
            return
        still = self.held.get(region_id, {}).get(message.id)
        if still is not None:
            still.region = region

    def changed(self, changed: list[Region]) -> None:
        """After a commit: answer every poll held on a region it changed."""
        for region in changed:
            for poll_id in list(self.held.get(region.id, {})):
                held = self._take(region.id, poll_id)
                if held is not None:
                    self._spawn(self._answer(held, region.id, region))

    def _expire(self, region_id: uuid.UUID, poll_id: uuid.UUID) -> None:
        held = self._take(region_id, poll_id)
        if held is not None:
            self.expired += 1
            self._spawn(self._answer(held, region_id, held.region))

    def _take(self, region_id: uuid.UUID, poll_id: uuid.UUID) -> Held | None:
        polls = self.held.get(region_id)
        held = polls.pop(poll_id, None) if polls else None
        if polls is not None and not polls:
            del self.held[region_id]
        if held is not None:
            held.timer.cancel()
        return held

    async def _answer(self, held: Held, region_id: uuid.UUID, region: Region | None) -> None:
        found = RegionFound(agent_id=self.agent_id, region=region, region_id=region_id)
        message = held.delivery.message
        self.answered += 1
        try:
            await self.transport.reply(
                held.delivery, RegionInfo(source=self.source, payload=found, **message.caused())
            )
        except PublishFailed as error:
            log.warning("a long poll's answer was not sent: %s", error)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def build_agent(settings: CrucibleSettings) -> agent_app.Agent:
    """:func:`crucible_agent.app.build` with the watched store and service."""
    return await agent_app.build(settings, store_class=WatchedStore, service_class=WatchedService)


async def run_agent(settings: CrucibleSettings, stop: asyncio.Event) -> None:
    agent = await build_agent(settings)
    endpoint = Transport(settings.amqp_url, name=f"crucible-agent/{settings.agent_id}/longpoll")
    store = agent.store
    assert isinstance(store, WatchedStore)
    polls = LongPolls(settings.agent_id, store, endpoint)
    store.on_commit = polls.changed
    serving = asyncio.create_task(agent_app.serve(agent, stop))
    try:
        await endpoint.connect()
        queue = longpoll_queue(settings.agent_id)
        await endpoint.ensure_topology(queue)
        # Each poll's handler returns once the poll is held: the prefetch bounds only
        # the polls being registered at once, not the polls held.
        await endpoint.consume(queue, polls.handle, prefetch=256)
        await serving
    finally:
        await endpoint.close()
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


# Nexus's end.

Record = Callable[[Region, uuid.UUID], Awaitable[bool]]
Note = Callable[[str], Awaitable[bool]]


@dataclass
class LongPoller:
    """Long-poll loops, one per region wait, in this process's memory."""

    transport: Transport
    source: str
    requests: int = 0
    unanswered: int = 0
    loops: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def watch(
        self, key: str, agent_id: uuid.UUID, region_id: uuid.UUID, news: Record, note: Note
    ) -> None:
        """Ask about ``region_id`` until ``news`` took an answer with news (returns True
        when it did); ``note`` is told each answer without news and says whether to go on."""
        if key in self.loops and not self.loops[key].done():
            return
        task = asyncio.create_task(self._loop(agent_id, region_id, news, note))
        self.loops[key] = task
        task.add_done_callback(lambda _: self.loops.pop(key, None))

    async def _loop(
        self, agent_id: uuid.UUID, region_id: uuid.UUID, news: Record, note: Note
    ) -> None:
        try:
            while True:
                answer = await self.ask(agent_id, region_id)
                if answer is None:
                    if not await note("long poll: no answer"):
                        return
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                region = answer.payload.region
                if region is not None and region.state is not RegionState.REQUESTED:
                    if await news(region, agent_id):
                        return
                    continue
                state = region.state.value if region is not None else "unknown"
                if not await note(f"long poll answered: {state}"):
                    return
        except Exception:
            log.exception("the long poll of region %s failed", region_id)

    async def ask(self, agent_id: uuid.UUID, region_id: uuid.UUID) -> RegionInfo | None:
        """One long poll: the agent's answer, or None when none came."""
        self.requests += 1
        try:
            reply = await self.transport.request(
                RegionGet(source=self.source, payload=RegionRef(id=region_id)),
                routing_key=longpoll_queue(agent_id),
                timeout=HOLD_SECONDS + ANSWER_GRACE_SECONDS,
                answerer=crucible_source(agent_id),
            )
        except (RequestTimedOut, PublishFailed):
            self.unanswered += 1
            return None
        return reply if isinstance(reply, RegionInfo) else None


# The model of Nexus's end at scale.


def rss_mib() -> float:
    """This process's resident memory now, MiB (from /proc: ru_maxrss is the peak)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


async def run_model(args: argparse.Namespace) -> dict[str, Any]:
    agents = [uuid.UUID(agent) for agent in args.agents.split(",")]
    transport = Transport(args.amqp, name="bench-longpoll-model")
    await transport.connect()
    await transport.declare_topology()
    poller = LongPoller(transport, "nexus/bench-longpoll-model")
    rss_before = rss_mib()
    # Regions the agents were never asked to create: the endpoint holds a poll for a
    # region it has no record of exactly as one for a requested region (until a change
    # or the hold passes), and each agent has 1,000 ports, so 10,000 regions could not
    # all be recorded by 3 agents. Memory and requests are those of the polls alone.
    placed = [(agents[n % len(agents)], uuid.uuid4()) for n in range(args.regions)]
    news = 0
    no_news = 0

    async def on_news(region: Region, agent_id: uuid.UUID) -> bool:
        nonlocal news
        news += 1
        return True

    async def on_no_news(why: str) -> bool:
        nonlocal no_news
        no_news += 1
        return True

    # One ordinary request first: the transport declares its reply queue on the first
    # request, and 10,000 first requests at once would each declare one (a channel
    # each, past the broker's 2,047 per connection).
    await transport.request(
        RegionGet(source=poller.source, payload=RegionRef(id=uuid.uuid4())),
        routing_key=f"crucible.{agents[0]}",
    )
    started = time.monotonic()
    for n, (agent_id, region_id) in enumerate(placed):
        poller.watch(str(region_id), agent_id, region_id, on_news, on_no_news)
        if n % 500 == 499:
            await asyncio.sleep(0)  # let the first polls leave while the rest are made
    all_asked = time.monotonic() - started
    # Past the first hold: every poll has been answered at least once and asked again.
    await asyncio.sleep(args.settle)
    requests_before, window_started = poller.requests, time.monotonic()
    await asyncio.sleep(args.window)
    window = time.monotonic() - window_started
    result = {
        "regions": args.regions,
        "seconds_to_start_every_loop": all_asked,
        "loops_running": sum(1 for task in poller.loops.values() if not task.done()),
        "window_seconds": window,
        "requests_per_second": (poller.requests - requests_before) / window,
        "requests": poller.requests,
        "unanswered": poller.unanswered,
        "answers_with_news": news,
        "answers_without_news": no_news,
        "rss_mib_before": rss_before,
        "rss_mib_holding": rss_mib(),
    }
    for task in poller.loops.values():
        task.cancel()
    await asyncio.gather(*poller.loops.values(), return_exceptions=True)
    await transport.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.longpoll")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("agent", help="crucible-agent run with a long-poll endpoint (CRUCIBLE_*)")
    model = commands.add_parser("model", help="a model of Nexus's end holding many long polls")
    model.add_argument("--amqp", required=True)
    model.add_argument("--agents", required=True, help="the agents' ids, comma-separated")
    model.add_argument("--regions", type=int, default=10_000)
    model.add_argument("--settle", type=float, default=HOLD_SECONDS + 5)
    model.add_argument("--window", type=float, default=HOLD_SECONDS)
    model.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "agent":
        settings = settings_from("crucible-agent", CrucibleSettings, {})
        run_service("crucible-agent", settings.log_level, functools.partial(run_agent, settings))
    else:
        result = asyncio.run(run_model(args))
        args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
