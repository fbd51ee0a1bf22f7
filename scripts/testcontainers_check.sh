#!/usr/bin/env bash
# The integration tests that need servers, once more against RabbitMQ and PostgreSQL that
# testcontainers starts (scripts/test.sh runs this after the private-process run).
#
# The engine is the project's, on its private socket (scripts/docker/lib.sh); only this
# run is given its DOCKER_HOST, and TEST_SERVERS=testcontainers makes the harness use
# containers or fail, never fall back to private processes. The images are the Debian
# stand-ins (scripts/docker/images.sh). Ryuk, testcontainers' reaper, is off: its image
# cannot be pulled here, and the harness stops every container it starts. The connection
# mode is docker_host because this machine has a /.dockerenv, which would make
# testcontainers connect to the bridge's gateway instead of the published ports.
#
# Tests that stop, start or kill a server (marker private_servers, set by tests/conftest.py)
# always use private processes, so they are deselected here by that marker; the run before
# this one covers them. The subset is the harness itself, the transport, the
# migrations, a saga handed over between replicas, and the PostgreSQL variants of the
# disk and instance sagas and the API: about 2 minutes on 2 cores (every unit test's
# PostgreSQL variant too would be 4.5). TESTCONTAINERS_TESTS (space-separated) replaces
# that list; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/docker/lib.sh

started_at=$SECONDS
finish() {
    local status=$?
    docker_stop
    if ((status == 0)); then
        echo "testcontainers step: $((SECONDS - started_at)) s"
    else
        echo "testcontainers step: FAILED after $((SECONDS - started_at)) s" >&2
    fi
    exit "$status"
}
trap finish EXIT

docker_lock
docker_start
bash scripts/docker/images.sh

if [[ -n ${TESTCONTAINERS_TESTS:-} ]]; then
    read -r -a tests <<<"$TESTCONTAINERS_TESTS"
else
    tests=(
        tests/integration/test_harness.py
        tests/integration/test_transport.py
        tests/integration/test_migrations.py
        "tests/integration/test_nexus_replicas.py::test_a_saga_started_on_one_replica_finishes_on_the_one_that_consumed_its_events"
        tests/unit/test_disk_create_saga.py
        tests/unit/test_instance_sagas.py
        tests/unit/test_api_requests.py
    )
fi

python=${EVENTPLANE_PYTHON:-.venv/bin/python}
[[ -x $python ]] || docker_die "no $python: run scripts/bootstrap.sh first"
echo "== pytest (testcontainers: $STANDIN_RABBITMQ_IMAGE, $STANDIN_POSTGRES_IMAGE on $DOCKER_HOST)"
env -u TEST_RABBITMQ_URL -u TEST_POSTGRES_URL \
    TEST_SERVERS=testcontainers \
    TEST_RABBITMQ_IMAGE="$STANDIN_RABBITMQ_IMAGE" \
    TEST_POSTGRES_IMAGE="$STANDIN_POSTGRES_IMAGE" \
    TESTCONTAINERS_RYUK_DISABLED=true \
    TESTCONTAINERS_CONNECTION_MODE=docker_host \
    "$python" -m pytest -p no:cacheprovider -m "integration and not private_servers" \
    "${tests[@]}" "$@"
