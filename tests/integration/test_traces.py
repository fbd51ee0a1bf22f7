"""One disk create is one trace across real processes (issue #16, traces).

Two Nexus replicas and three crucible agents run as real processes, each writing its
finished spans to a trace file of its own. Replica A takes the API request and runs
the saga until its regions' nodes park; it is stopped; B consumes the agents' events
and finishes the saga. The files together hold one trace: the API request on A, the
saga's nodes on A and on B, each agent's handling of its ensure and its worker's create,
each event, and B's resume a descendant of the agent's work.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from nexus.cli.trace_view import Span, load, saga_trace, tree_lines
from nexus.db.migrate import upgrade_async
from schemas.transport import Transport
from tests.integration.test_dependency_outages import datasets, until
from tests.processes import BIN, ApiClient, crucible, nexus

pytestmark = pytest.mark.integration

FAST = {"lease_seconds": "1.5", "sweep_seconds": "0.2"}


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    """``span``'s parent, its parent's parent, ... up to the root."""
    chain: list[Span] = []
    while span.parent_span_id is not None:
        parent = by_id.get(span.parent_span_id)
        assert parent is not None, f"{span.name} [{span.service}]: parent span missing"
        chain.append(parent)
        span = parent
    return chain


async def test_a_disk_create_resumed_on_the_other_replica_is_one_trace(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> None:
    await upgrade_async(fresh_postgres_url)
    spans_dir = tmp_path / "spans"
    # Once A parked, the agents are frozen (SIGSTOP) until A has stopped (SIGTERM) and B
    # runs: no region event can reach A, however slowly A stops, so B handles each one
    # (A handling one while it stopped left B's resume without its event's span: a race
    # seen under load).
    agents = [
        crucible(
            vhost_url,
            tmp_path,
            create_delay="fixed:2",
            trace_file=str(spans_dir / f"crucible-{index}.jsonl"),
        )
        for index in range(3)
    ]
    a, b = (
        nexus(
            name,
            database_url=fresh_postgres_url,
            amqp_url=vhost_url,
            workdir=tmp_path,
            trace_file=str(spans_dir / f"{name}.jsonl"),
            **FAST,
        )
        for name in ("replica-a", "replica-b")
    )
    for agent in agents:
        agent.service.start()
    try:
        async with Transport(vhost_url, name="test-traces") as transport:
            await transport.declare_topology()
            client = ApiClient(transport)
            a.start()

            async def announced() -> bool:
                return await datasets(fresh_postgres_url) == 3

            await until(announced, 30, "replica A knows the three agents")
            accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
            await client.saga_in(accepted.saga_id, {"waiting"})
            for agent in agents:
                agent.service.send(signal.SIGSTOP)
            assert await a.stop(signal.SIGTERM) == 0
            b.start()
            for agent in agents:
                agent.service.send(signal.SIGCONT)
            view = await client.saga_in(accepted.saga_id, {"done"}, timeout=60)
    finally:
        for agent in agents:
            if agent.service.running:
                agent.service.send(signal.SIGCONT)
        await a.stop()
        await b.stop()
        for agent in agents:
            await agent.service.stop()

    resumed_on = {entry.replica for entry in view.log if entry.event == "resumed"}
    assert resumed_on == {"replica-b"}, "the saga was to resume on the other replica"

    saga_id = str(accepted.saga_id)
    spans = saga_trace(load([spans_dir]), saga_id)
    tree = "\n".join(tree_lines(spans))
    assert len({s.trace_id for s in spans}) == 1, f"more than one trace:\n{tree}"
    services = {s.service for s in spans}
    expected = {"nexus/replica-a", "nexus/replica-b"} | {
        f"crucible/{agent.agent_id}" for agent in agents
    }
    assert expected <= services, f"missing {expected - services}:\n{tree}"

    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_span_id is None]
    assert [(r.name, r.service) for r in roots] == [
        ("handle api.disk.create.v1", "nexus/replica-a")
    ], tree
    for span in spans:
        ancestors(span, by_id)  # every parent is in the files: no broken link

    resumes = [s for s in spans if s.name.startswith("disk_create.region_") and "resume" in s.name]
    assert len(resumes) == 3 and {s.service for s in resumes} == {"nexus/replica-b"}, tree
    for resume in resumes:
        chain = ancestors(resume, by_id)
        names = f"{resume.name}: {[(s.name, s.service) for s in chain]}\n{tree}"
        # B handled the agent's event, published by the agent's worker in the trace of
        # the ensure it handled, which A's node for this region sent.
        assert chain[0].name == "handle region.state_changed.v1", names
        assert chain[0].service == "nexus/replica-b", names
        worker = next(s for s in chain if s.name == "crucible region create")
        assert worker.service.startswith("crucible/"), names
        ensure = next(s for s in chain if s.name == "handle region.ensure.v1")
        assert ensure.service == worker.service, names
        action = next(s for s in chain if s.name.endswith(" action"))
        assert action.service == "nexus/replica-a", names
        # Usually this region's own action; but when the run that a first event started
        # resumes a node whose event was committed before its handling recorded the wake
        # (Parts.woken, in memory, after the commit), the resume hangs under the event
        # that started the run: still this saga's trace, another region's chain. Known,
        # not fixed (the wake's context would have to be kept in the rendezvous row).
        assert action.attributes["saga.node"].startswith("region_"), names
    finalize = [s for s in spans if s.name == "disk_create.disk_finalize action"]
    assert [s.service for s in finalize] == ["nexus/replica-b"], tree

    shown = await asyncio.create_subprocess_exec(
        str(BIN / "nexusctl"),
        "saga",
        "trace",
        saga_id,
        "--file",
        str(spans_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    printed = (await shown.communicate())[0].decode()
    assert shown.returncode == 0, printed
    assert "handle api.disk.create.v1  [nexus/replica-a]" in printed
    assert "disk_create.disk_finalize action  [nexus/replica-b]" in printed
