"""``python -m examples.trip``: see examples/README.md."""

from examples.trip.main import cli

raise SystemExit(cli())
