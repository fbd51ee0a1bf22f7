"""``amqps://`` against a real RabbitMQ node with a TLS listener and a certificate
generated for the test (openssl): a round trip through the transport, and a client that
does not trust the server's CA refused."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from nexus.devstack.servers import RabbitMQNode, free_port
from schemas.transport import Delivery, Transport
from tests.examples import example

pytestmark = [pytest.mark.integration, pytest.mark.security]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path, name: str) -> Certificates:
    """A CA and a server certificate it signed, for localhost and 127.0.0.1."""
    ca_key, ca = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, request, cert = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem"))
    new_key = ["-newkey", "rsa:2048", "-nodes"]
    openssl("req", "-x509", *new_key, "-days", "2", "-subj", f"/CN={name} test CA",
            "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    openssl("req", *new_key, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(request))
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
            "-out", str(cert))  # fmt: skip
    # The node runs as this user and must read its key; nobody else needs to.
    key.chmod(0o600)
    return Certificates(ca, cert, key)


@dataclass
class TlsNode:
    node: RabbitMQNode
    tls_port: int
    certificates: Certificates

    def url(self, ca: Path) -> str:
        return f"amqps://guest:guest@localhost:{self.tls_port}/?cafile={ca}"


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    certificates = make_certificates(tmp_path_factory.mktemp("tls"), "server")
    tls_port = free_port()
    node = RabbitMQNode(
        extra_config=(
            f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certificates.ca}\n"
            f"ssl_options.certfile = {certificates.cert}\n"
            f"ssl_options.keyfile = {certificates.key}\n"
            # Clients authenticate with a password; the certificate authenticates the server.
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    )
    try:
        yield TlsNode(node, tls_port, certificates)
    finally:
        node.close()


async def test_a_round_trip_over_amqps(tls_node: TlsNode) -> None:
    queue = f"test.{uuid.uuid4()}"
    sent = example("region.get.v1")
    async with Transport(tls_node.url(tls_node.certificates.ca), name="test-tls") as transport:
        await transport.declare_topology()
        await transport.declare_command_queue(queue)
        received: asyncio.Queue[Delivery] = asyncio.Queue()
        await transport.consume(queue, received.put)
        await transport.send_command(sent, queue)
        assert (await asyncio.wait_for(received.get(), 10)).message == sent
        # The server's own word that this connection is the TLS one.
        listing = tls_node.node.rabbitmqctl(
            "list_connections", "port", "ssl", "ssl_protocol", "--quiet", "--no-table-headers"
        )
    (connection,) = [line.split() for line in listing.splitlines() if line.strip()]
    assert connection == [str(tls_node.tls_port), "true", connection[2]]
    assert connection[2] in {"tlsv1.2", "tlsv1.3"}


async def test_a_server_whose_ca_the_client_does_not_trust_is_refused(
    tls_node: TlsNode, tmp_path: Path
) -> None:
    stranger = make_certificates(tmp_path, "stranger")
    transport = Transport(tls_node.url(stranger.ca), name="test-untrusting")
    with pytest.raises((aio_pika.exceptions.AMQPConnectionError, OSError)) as refused:
        await transport.connect(timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value)
