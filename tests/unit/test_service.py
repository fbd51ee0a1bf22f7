"""What every service's entry point shares: refused settings, a failure, a clean stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, Field

from schemas.service import run_service, serve, settings_from


class Settings(BaseModel):
    amqp_url: str = "amqp://localhost/"
    lease_seconds: float = Field(default=15.0, gt=0)


class App:
    def __init__(self) -> None:
        self.state = "new"

    async def start(self) -> None:
        self.state = "running"

    async def stop(self) -> None:
        self.state = "stopped"


@pytest.fixture
def root_logger() -> Iterator[None]:
    """run_service configures the process's logging; the next test gets pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_settings_take_the_flags_given_over_the_defaults() -> None:
    settings = settings_from("svc", Settings, {"amqp_url": None, "lease_seconds": 2.0})

    assert settings == Settings(lease_seconds=2.0)


def test_invalid_settings_end_the_process_with_one_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        settings_from("svc", Settings, {"lease_seconds": -1})

    assert exit_.value.code == 2
    assert capsys.readouterr().err == "svc: lease_seconds: Input should be greater than 0\n"


@pytest.mark.usefixtures("root_logger")
def test_a_failure_is_logged_without_the_password_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main(stop: asyncio.Event) -> None:
        raise ConnectionError("cannot reach amqp://nexus:s3cret@mq:5672/")

    with pytest.raises(SystemExit) as exit_:
        run_service("svc", "INFO", main)

    assert exit_.value.code == 1
    logged = capsys.readouterr().err
    assert "svc failed: ConnectionError: cannot reach amqp://nexus:***@mq:5672/" in logged
    assert "s3cret" not in logged


@pytest.mark.usefixtures("root_logger")
def test_an_app_served_is_stopped_on_sigterm() -> None:
    app = App()

    async def main(stop: asyncio.Event) -> None:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await serve(app, stop)

    run_service("svc", "INFO", main)

    assert app.state == "stopped"
