#!/usr/bin/env bash
# The project's Docker engine on its private socket, by hand (the check scripts start and
# stop it themselves):
#
#   bash scripts/docker/engine.sh start    # install what is missing, start dockerd
#   eval "$(bash scripts/docker/engine.sh env)"   # DOCKER_HOST, DOCKER_CONFIG for docker
#   bash scripts/docker/engine.sh stop     # the engine `start` started
#
# `start` leaves the engine running and records its PID in $EVENTPLANE_DOCKER_DIR/
# dockerd.pid; `stop` stops that process. While it runs, every program given its
# DOCKER_HOST (and only those) uses it: the test harness picks testcontainers only then.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/docker/lib.sh

case ${1:-} in
start)
    docker_lock
    docker_start
    ;;
stop)
    docker_lock
    DOCKERD_STARTED_PID=$(cat "$EVENTPLANE_DOCKER_DIR/dockerd.pid" 2>/dev/null || true)
    if [[ -z $DOCKERD_STARTED_PID ]]; then
        docker_say "no dockerd pid file in $EVENTPLANE_DOCKER_DIR: nothing to stop"
    fi
    docker_stop
    ;;
env)
    printf 'export DOCKER_HOST=%q DOCKER_CONFIG=%q\n' "$DOCKER_HOST" "$DOCKER_CONFIG"
    ;;
status)
    if docker_answers; then
        docker_say "engine $(docker version --format '{{.Server.Version}}') answers on $DOCKER_HOST"
    else
        docker_say "no engine answers on $DOCKER_HOST"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 start|stop|env|status" >&2
    exit 2
    ;;
esac
