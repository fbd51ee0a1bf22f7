"""nexusctl: what people type is checked before anything is sent, one line per mistake."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from nexus.cli.main import app
from nexus.cli.options import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("10GiB", 10 << 30),
        ("512MiB", 512 << 20),
        ("1.5G", 3 << 29),
        ("2 tib", 2 << 40),
        ("1KB", 1000),
        ("7B", 7),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "0", "10XB", "GiB", "", "1.1B", "ten"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_sizes_format_exactly() -> None:
    assert format_size(10 << 30) == "10 GiB"
    assert format_size(1536 << 20) == "1536 MiB"
    assert format_size(1000) == "1000 B"


def _unreachable_url() -> str:
    # A port nothing listens on: bound, then released.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"amqp://guest:secret@127.0.0.1:{port}/"


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["disk", "create", "d1", "--size", "-1"], "must be more than zero"),
        (["disk", "create", "d1", "--size", "10XB"], "unknown unit 'XB'"),
        (["disk", "create", "Bad_Name", "--size", "1GiB"], "invalid disk name"),
        (["disk", "create", "d1", "--size", "1GiB", "--block-size", "1000"], "block_size"),
        (["disk", "create", "d1", "--size", "2TiB"], "size_bytes"),
        (["disk", "show", "no such"], "invalid resource name"),
        (["disk", "list", "--project", "Nope!"], "invalid project name"),
        (["instance", "create", "vm", "--memory", "lots"], "invalid size 'lots'"),
        (["instance", "create", "vm", "--ncpus", "0"], "ncpus"),
        (["saga", "show", "not-a-uuid"], "invalid saga id"),
    ],
)
def test_bad_input_is_one_line_before_any_connection(args: list[str], expected: str) -> None:
    # The broker URL is unreachable: these fail before they would need it.
    line = _one_line_error([*args, "--amqp-url", _unreachable_url()])
    assert expected in line


@pytest.mark.parametrize(
    "args",
    [
        ["disk", "list"],
        ["disk", "create", "d1", "--size", "1GiB", "--wait"],
        ["instance", "stop", "vm"],
        ["saga", "list", "--state", "stuck"],
        ["doctor"],
    ],
)
def test_unreachable_broker_is_one_line_without_the_password(args: list[str]) -> None:
    line = _one_line_error([*args, "--amqp-url", _unreachable_url(), "--output", "json"])
    assert "cannot reach RabbitMQ" in line
    assert "secret" not in line
