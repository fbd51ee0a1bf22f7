"""Broker addresses: one RabbitMQ URL or several nodes of one cluster, and a connection
that fails over between them.

A setting that names the broker (``NEXUS_AMQP_URL``, ``CRUCIBLE_AMQP_URL``,
``SLED_AMQP_URL``, ``--amqp-url``) takes one URL, or several separated by commas, one per
node of a RabbitMQ cluster::

    amqp://nexus:pw@10.0.0.1:5672/control-plane,amqp://nexus:pw@10.0.0.2:5672/control-plane

Every URL names the same user and vhost (they are the cluster's, not a node's). A
process connects to the first node that answers, in the order given; when its
connection is lost (the node died, was stopped, or closed it) each reconnection attempt
goes to the next node after the one it lost or could not reach, round the list. What
the connection had (channels, exchanges and queues it declared, bindings, consumers) is
restored on the new node by aio-pika's robust connection, as after a broker restart.

The connection itself is :mod:`schemas.failover`; this module only reads the setting,
and imports nothing heavy (``nexusctl``'s start-up and ``schemas.redact`` use it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

# A comma starts the next address only where a URL begins, so a comma inside a password
# (which should be percent-encoded anyway) does not split one URL in two.
NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_urls(value: str) -> list[str]:
    """The URLs of a broker setting: one, or several separated by commas."""
    urls = [url for url in NEXT_URL.split(value.strip()) if url]
    if not urls:
        raise ValueError("no broker URL given")
    return urls


def same_identity(urls: Sequence[str]) -> None:
    """ValueError unless every URL names the same user and vhost: a client's messages
    carry its user as ``user_id``, and its queues live in one vhost, on every node."""
    identities = {(urlsplit(url).username, urlsplit(url).path or "/") for url in urls}
    if len(identities) > 1:
        raise ValueError(
            "the broker URLs must all name the same user and vhost (nodes of one cluster)"
        )


def address(url: str) -> str:
    """Where a URL points, without credentials: ``host:port/vhost``, for logs."""
    parsed = urlsplit(url)
    return f"{parsed.hostname}:{parsed.port}{parsed.path or '/'}"


def rotated(value: str, by: int) -> str:
    """A broker setting's URLs, the list begun ``by`` places later (round the list):
    clients given rotations of one cluster's list spread their connections over it."""
    urls = broker_urls(value)
    start = by % len(urls)
    return ",".join(urls[start:] + urls[:start])
