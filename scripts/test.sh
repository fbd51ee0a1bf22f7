#!/usr/bin/env bash
# Install what is missing, then run every check: ruff, mypy, the whole pytest suite
# against private server processes, the integration tests again against testcontainers
# (scripts/testcontainers_check.sh), and the compose stack (scripts/compose_check.sh).
# Extra arguments go to the first pytest run. Every check runs even after one fails, so
# one run shows all the problems; the exit status is non-zero if any failed.
#
# The two Docker steps need a Docker engine, which they install and start on a private
# socket (scripts/docker/lib.sh) and stop afterwards; a machine where it cannot run fails
# them. EVENTPLANE_NO_DOCKER=1 leaves them out, and says so: never by default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh

failed=()

echo "== ruff check"
.venv/bin/ruff check . || failed+=(ruff)

echo "== mypy"
.venv/bin/mypy schemas nexus crucible_agent sled_agent tests bench deploy examples || failed+=(mypy)

echo "== pytest (private servers)"
# TEST_SERVERS=private: a Docker engine that happens to answer is not used here; the
# testcontainers run below is the one that uses containers, and says so.
TEST_SERVERS=${TEST_SERVERS:-private} .venv/bin/pytest -p no:cacheprovider "$@" || failed+=(pytest)

if [[ ${EVENTPLANE_NO_DOCKER:-} == 1 ]]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!! SKIPPED: the testcontainers run and the compose step (EVENTPLANE_NO_DOCKER=1)"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
else
    echo "== pytest (testcontainers)"
    bash scripts/testcontainers_check.sh || failed+=(testcontainers)
    echo "== compose"
    bash scripts/compose_check.sh || failed+=(compose)
fi

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
if [[ ${EVENTPLANE_NO_DOCKER:-} == 1 ]]; then
    echo "all checks passed, except the Docker steps, which were SKIPPED (EVENTPLANE_NO_DOCKER=1)"
else
    echo "all checks passed"
fi
