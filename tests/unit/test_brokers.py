"""Broker addresses: one URL or a cluster's nodes, and the order a connection tries them.

The fail-over itself, against a real 3-node cluster that loses a node, is
``tests/integration/test_broker_cluster.py``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aio_pika import RobustConnection
from yarl import URL

from nexus.devstack.access import Access
from nexus.settings import NexusSettings
from schemas import failover
from schemas.brokers import address, broker_urls, rotated, same_identity
from schemas.failover import ATTEMPT, FailoverConnection
from schemas.redact import redact_url
from schemas.transport import Transport

NODES = "amqp://u:pw@h1:5672/vh, amqp://u:pw@h2:5673/vh,amqp://u:pw@h3:5674/vh"


def test_one_url_is_one_address() -> None:
    assert broker_urls("amqp://guest:guest@localhost:5672/") == [
        "amqp://guest:guest@localhost:5672/"
    ]


def test_several_urls_are_split_where_a_url_begins() -> None:
    assert broker_urls(NODES) == [
        "amqp://u:pw@h1:5672/vh",
        "amqp://u:pw@h2:5673/vh",
        "amqp://u:pw@h3:5674/vh",
    ]
    # A comma in a password does not start another address.
    assert broker_urls("amqp://u:p,w@h1/vh,amqps://u:p,w@h2/vh") == [
        "amqp://u:p,w@h1/vh",
        "amqps://u:p,w@h2/vh",
    ]


def test_no_url_is_refused() -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        broker_urls("  ")


@pytest.mark.parametrize(
    "urls", [["amqp://a:p@h1/vh", "amqp://b:p@h2/vh"], ["amqp://a:p@h1/one", "amqp://a:p@h2/two"]]
)
def test_the_nodes_must_share_user_and_vhost(urls: list[str]) -> None:
    with pytest.raises(ValueError, match="same user and vhost"):
        same_identity(urls)
    with pytest.raises(ValueError, match="same user and vhost"):
        Transport(",".join(urls), name="test")


def test_a_transport_takes_its_user_from_the_urls() -> None:
    assert Transport(NODES, name="test").user == "u"


def test_addresses_are_shown_without_credentials() -> None:
    assert address("amqp://u:secret@h2:5673/vh") == "h2:5673/vh"
    assert redact_url(NODES.replace(" ", "")) == (
        "amqp://u:***@h1:5672/vh,amqp://u:***@h2:5673/vh,amqp://u:***@h3:5674/vh"
    )
    assert "pw" not in repr(NexusSettings(amqp_url=NODES))


def test_access_gives_every_node_the_users_credentials() -> None:
    agent = uuid.uuid4()
    access = Access.generate(crucible_agents=[agent])
    urls = broker_urls(access.url("amqp://guest:guest@h1:1/,amqp://guest:guest@h2:2/", "nexus"))
    password = access.passwords["nexus"]
    assert [URL(url).host for url in urls] == ["h1", "h2"]
    assert {(URL(url).user, URL(url).password, URL(url).path) for url in urls} == {
        ("nexus", password, "/control-plane")
    }


def test_aio_pika_still_has_the_attempt_failover_overrides() -> None:
    """FailoverConnection replaces a private coroutine of aio-pika's RobustConnection; an
    aio-pika without it would never fail over (pyproject.toml pins the version)."""
    assert hasattr(RobustConnection, ATTEMPT)


async def test_each_attempt_after_the_first_goes_to_the_next_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[str] = []

    async def attempt(connection: Any) -> None:
        tried.append(str(connection.url.host))

    monkeypatch.setattr(RobustConnection, ATTEMPT, attempt)
    addresses = [URL(url) for url in broker_urls(NODES)]
    connection = FailoverConnection(addresses[1], addresses=addresses)
    for _ in range(5):
        await getattr(connection, ATTEMPT)()
    # The first attempt where it was made to start, then round the list.
    assert tried == ["h2", "h3", "h1", "h2", "h3"]


async def test_connect_tries_the_nodes_in_order_until_one_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[str] = []

    async def connect(self: FailoverConnection, timeout: float | None = None) -> None:
        tried.append(str(self.url.host))
        if self.url.host != "h3":
            raise ConnectionRefusedError(f"{self.url.host} is down")

    monkeypatch.setattr(FailoverConnection, "connect", connect)
    connection = await failover.connect(broker_urls(NODES), name="t", timeout=1, heartbeat=None)
    assert tried == ["h1", "h2", "h3"]
    assert connection.url.host == "h3"
    assert isinstance(connection, FailoverConnection)
    assert connection.addresses[0].host == "h1"


async def test_connect_raises_the_last_error_when_no_node_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def connect(self: FailoverConnection, timeout: float | None = None) -> None:
        raise ConnectionRefusedError(f"{self.url.host} is down")

    monkeypatch.setattr(FailoverConnection, "connect", connect)
    with pytest.raises(ConnectionRefusedError, match="h3 is down"):
        await failover.connect(broker_urls(NODES), name="t", timeout=1, heartbeat=None)


def test_rotated_lists_begin_at_each_node_in_turn() -> None:
    firsts = [URL(broker_urls(rotated(NODES, index))[0]).host for index in range(4)]
    assert firsts == ["h1", "h2", "h3", "h1"]
    assert rotated("amqp://u:p@h/", 5) == "amqp://u:p@h/"
