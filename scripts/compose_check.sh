#!/usr/bin/env bash
# The compose stack as its users run it, in CI (scripts/test.sh runs this):
#
#   1. start the project's Docker engine on its private socket (scripts/docker/lib.sh),
#   2. build the images, or reuse them when their inputs are unchanged (scripts/docker/images.sh),
#   3. `docker compose up --wait --no-build`: every health check green,
#   4. through the nexusctl service: two disks and an instance created with --wait, then
#      `nexusctl doctor` (exit 0),
#   5. a disk create in flight, the Nexus replica running its saga killed (docker kill):
#      the saga must finish on the other replica (scripts/docker/failover.py),
#   6. `down -v`, and the engine stopped if this script started it.
#
# Fails (exit 1, with the reason) when any step does, the engine's start included: a
# machine that cannot run the engine fails this check rather than skip it. Prints
# "compose step: N s" at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/docker/lib.sh

started_at=$SECONDS
# A project of its own, so a developer's own `docker compose up` (project eventplane) on
# the same engine is left alone; no ports published on the machine (compose.ci.yaml).
project=eventplane-ci
compose=(docker compose --project-name "$project" --file compose.yaml --file scripts/docker/compose.ci.yaml)
export EVENTPLANE_RABBITMQ_IMAGE=$STANDIN_RABBITMQ_IMAGE
export EVENTPLANE_POSTGRES_IMAGE=$STANDIN_POSTGRES_IMAGE
export EVENTPLANE_BASE_IMAGE=$BASE_IMAGE

step() { echo "== compose: $*"; }
stack_up=false

finish() {
    local status=$?
    if $stack_up; then
        if ((status != 0)); then
            echo "== compose: FAILED; the services' state and last log lines:"
            "${compose[@]}" ps --all || true
            "${compose[@]}" logs --no-color --tail 25 || true
        fi
        step "down -v"
        "${compose[@]}" --profile cli down --volumes --remove-orphans --timeout 10 || status=1
    fi
    docker_stop
    if ((status == 0)); then
        echo "compose step: $((SECONDS - started_at)) s"
    else
        echo "compose step: FAILED after $((SECONDS - started_at)) s" >&2
    fi
    exit "$status"
}
trap finish EXIT

docker_lock
docker_start
bash scripts/docker/images.sh

# A stack left behind by an interrupted run would hold its volumes' old state.
"${compose[@]}" --profile cli down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true

step "up --wait --no-build"
stack_up=true
up_started=$SECONDS
"${compose[@]}" up --detach --wait --no-build
echo "== compose: all services healthy in $((SECONDS - up_started)) s"
"${compose[@]}" ps --format 'table {{.Service}}\t{{.Status}}'

# COLUMNS: tables as wide as a CI log line, not the 80 columns of a missing terminal.
nexusctl() { "${compose[@]}" run --rm --no-TTY --env COLUMNS=160 nexusctl "$@"; }

step "nexusctl disk create (x2), instance create, all with --wait"
nexusctl disk create ci-disk-1 --size 1GiB --wait
nexusctl disk create ci-disk-2 --size 2GiB --wait
nexusctl instance create ci-web-1 --ncpus 1 --memory 1GiB --disk ci-disk-1 --wait
nexusctl disk list
nexusctl instance list

step "nexusctl doctor"
nexusctl doctor

step "kill the Nexus replica running a disk create's saga; the other must finish it"
python3 scripts/docker/failover.py -- "${compose[@]}"

step "nexusctl doctor (after the failover)"
nexusctl doctor
