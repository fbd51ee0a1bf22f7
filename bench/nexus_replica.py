"""The benchmark's Nexus replica: ``nexus run`` that also runs the polling baselines.

    python -m bench.nexus_replica [--disk-create-saga disk_create_backoff]

It runs every saga Nexus runs plus :mod:`bench.polling`'s, and ``disk create`` starts
the saga named (``disk_create`` by default). Otherwise it is ``nexus run``: the same
NEXUS_* settings, start, stop and failure.
"""

from __future__ import annotations

import argparse

from bench import polling
from nexus.app import NexusApp
from nexus.main import run_replica
from nexus.sagas import ALL_SAGAS, disk_create
from nexus.settings import NexusSettings
from schemas.service import settings_from

# The saga `disk create` may start: Nexus's own or a polling baseline, same parameters.
DISK_CREATE_SAGAS = {
    definition.name: definition for definition in (disk_create.DEFINITION, *polling.DEFINITIONS)
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nexus_replica")
    parser.add_argument(
        "--disk-create-saga",
        choices=sorted(DISK_CREATE_SAGAS),
        default="disk_create",
        help="the saga that `disk create` starts",
    )
    arguments = parser.parse_args()
    settings = settings_from("nexus", NexusSettings, {})
    nexus = NexusApp(
        settings,
        definitions=[*ALL_SAGAS, *polling.DEFINITIONS],
        disk_create_saga=DISK_CREATE_SAGAS[arguments.disk_create_saga],
    )
    # The long-poll baseline's loops run in this replica and need its parts.
    polling.LONG_POLLS = polling.LongPolls(nexus)
    run_replica(nexus)


if __name__ == "__main__":
    main()
