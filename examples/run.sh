#!/usr/bin/env bash
# The trip example in one command, from a fresh clone: install what is missing (RabbitMQ,
# PostgreSQL and Python binaries, .venv; skipped when there), then run both trips against
# a fresh SQLite file and the RabbitMQ at NEXUS_AMQP_URL (default localhost:5672) if one
# answers, else a private node started and stopped for the run. Extra arguments go to
# `python -m examples.trip` (--help lists them). Exit status 0: both trips ended as expected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.trip "$@"
