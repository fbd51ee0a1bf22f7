"""The test harness provides real, working RabbitMQ and PostgreSQL servers."""

from __future__ import annotations

import uuid

import aio_pika
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.harness.servers import RabbitMQServer

pytestmark = pytest.mark.integration


async def test_rabbitmq_round_trip(rabbitmq_url: str) -> None:
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"ping", correlation_id="harness"), routing_key=queue.name
        )
        message = await queue.get(timeout=10)
        assert message is not None
        await message.ack()
        assert message.body == b"ping"
        assert message.correlation_id == "harness"


async def test_postgres_select_one(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_fresh_database_is_new_and_writable(
    fresh_postgres_url: str, postgres_url: str
) -> None:
    assert make_url(fresh_postgres_url).drivername == "postgresql+asyncpg"
    assert make_url(fresh_postgres_url).database != make_url(postgres_url).database
    engine = create_async_engine(fresh_postgres_url)
    try:
        async with engine.begin() as connection:
            tables = await connection.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            )
            assert tables.scalar_one() == 0
            await connection.execute(text("CREATE TABLE t (id integer PRIMARY KEY)"))
            await connection.execute(text("INSERT INTO t VALUES (1)"))
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT id FROM t"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_rabbitmq_node_restarts_with_its_data(
    restartable_rabbitmq: RabbitMQServer,
) -> None:
    url = restartable_rabbitmq.url
    queue_name = f"harness-restart-{uuid.uuid4().hex}"
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"survives", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )

    with restartable_rabbitmq.outage(), pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await aio_pika.connect(url, timeout=5)

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=10)
        assert message is not None
        assert message.body == b"survives"
        await message.ack()
        await queue.delete()


def test_rabbitmqctl_manages_the_node(restartable_rabbitmq: RabbitMQServer) -> None:
    vhost = f"harness-{uuid.uuid4().hex[:8]}"
    restartable_rabbitmq.rabbitmqctl("add_vhost", vhost)
    try:
        assert vhost in restartable_rabbitmq.rabbitmqctl("list_vhosts", "--quiet").split()
    finally:
        restartable_rabbitmq.rabbitmqctl("delete_vhost", vhost)
