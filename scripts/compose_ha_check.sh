#!/usr/bin/env bash
# compose.ha.yaml as its users run it, with a node of each cluster lost on the way. Not
# part of scripts/test.sh (it would add 132 s with the images built, measured); run it
# by hand:
#
#   bash scripts/compose_ha_check.sh
#
#   1. start the project's Docker engine on its private socket (scripts/docker/lib.sh),
#   2. build the images, the Patroni one included (scripts/docker/images.sh --ha),
#   3. `up --wait --no-build` with compose.yaml + compose.ha.yaml: 3 RabbitMQ nodes
#      joined into one cluster (rabbitmq-cluster), etcd, 3 PostgreSQL nodes under
#      Patroni; every health check green,
#   4. through the nexusctl service: a disk created with --wait, `nexusctl doctor`,
#   5. the RabbitMQ node leading nexus.events killed (docker kill): a disk created, doctor,
#   6. then the Patroni primary killed: a standby promoted, a disk created, doctor,
#   7. both killed containers started again: they rejoin (up --wait), doctor,
#   8. `down -v`, and the engine stopped if this script started it.
#
# Fails (exit 1, with the reason) when any step does. Prints the time of each step and
# "compose ha step: N s" at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/docker/lib.sh

started_at=$SECONDS
project=eventplane-ha-ci
compose=(docker compose --project-name "$project" --file compose.yaml --file compose.ha.yaml
    --file scripts/docker/compose.ci.yaml --file scripts/docker/compose.ha.ci.yaml)
export EVENTPLANE_RABBITMQ_IMAGE=$STANDIN_RABBITMQ_IMAGE
export EVENTPLANE_POSTGRES_IMAGE=$STANDIN_POSTGRES_IMAGE
export EVENTPLANE_BASE_IMAGE=$BASE_IMAGE

step_started=$SECONDS
step() {
    echo "== compose ha: $* (at $((SECONDS - started_at)) s)"
    step_started=$SECONDS
}
took() { echo "== compose ha: $* in $((SECONDS - step_started)) s"; }
stack_up=false

finish() {
    local status=$?
    if $stack_up; then
        if ((status != 0)); then
            echo "== compose ha: FAILED; the services' state and last log lines:"
            "${compose[@]}" ps --all || true
            "${compose[@]}" logs --no-color --tail 25 || true
        fi
        step "down -v"
        "${compose[@]}" --profile cli down --volumes --remove-orphans --timeout 10 || status=1
        took "down -v"
    fi
    docker_stop
    if ((status == 0)); then
        echo "compose ha step: $((SECONDS - started_at)) s"
    else
        echo "compose ha step: FAILED after $((SECONDS - started_at)) s" >&2
    fi
    exit "$status"
}
trap finish EXIT

docker_lock
docker_start
bash scripts/docker/images.sh --ha

# A stack left behind by an interrupted run would hold its volumes' old state.
"${compose[@]}" --profile cli down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true

step "up --wait --no-build"
stack_up=true
"${compose[@]}" up --detach --wait --no-build
took "all services healthy"
"${compose[@]}" ps --format 'table {{.Service}}\t{{.Status}}'
"${compose[@]}" logs --no-color rabbitmq-cluster | sed 's/^/    /'

# COLUMNS: tables as wide as a CI log line, not the 80 columns of a missing terminal.
# --no-deps: `run` would otherwise start what the service depends on, the killed nodes
# included, and run the one-shot rabbitmq-cluster again.
nexusctl() { "${compose[@]}" run --rm --no-deps --no-TTY --env COLUMNS=160 nexusctl "$@"; }
in_service() { "${compose[@]}" exec --no-TTY "$@"; }
patronictl() { # on the first database node that runs
    local node
    for node in postgres-1 postgres-2 postgres-3; do
        if in_service "$node" patronictl -c /var/lib/postgresql/patroni.yml "$@" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}
patroni_leader() {
    patronictl list --format json |
        python3 -c 'import json, sys; print(next((m["Member"] for m in json.load(sys.stdin) if m["Role"] == "Leader" and m["State"] == "running"), ""))'
}
rabbitmq_leader() { # the node leading nexus.events, as service name (rabbitmq-N)
    local node
    for node in rabbitmq-1 rabbitmq-2 rabbitmq-3; do
        if in_service "$node" rabbitmqctl -q list_queues -p control-plane --no-table-headers \
            name leader 2>/dev/null | awk '$1 == "nexus.events" { sub("rabbit@", "", $2); print $2 }'; then
            return 0
        fi
    done
    return 1
}
create_disk() {
    step "nexusctl disk create $1 --wait"
    nexusctl disk create "$1" --size 1GiB --wait
    took "disk $1 created"
    nexusctl doctor
}

patronictl list
create_disk ha-disk-1

broker=$(rabbitmq_leader)
[[ $broker == rabbitmq-[123] ]] || docker_die "no leader of nexus.events found ($broker)"
step "docker kill $broker (the node leading nexus.events)"
docker kill "$("${compose[@]}" ps --quiet "$broker")" >/dev/null
echo "nexus.events now led by $(rabbitmq_leader)"
create_disk ha-disk-2

primary=$(patroni_leader)
[[ $primary == postgres-[123] ]] || docker_die "no Patroni leader found ($primary)"
step "docker kill $primary (the Patroni primary)"
docker kill "$("${compose[@]}" ps --quiet "$primary")" >/dev/null
until leader=$(patroni_leader) && [[ -n $leader && $leader != "$primary" ]]; do
    if ((SECONDS - step_started > 60)); then
        docker_die "no standby promoted within 60 s"
    fi
    sleep 1
done
took "$leader promoted"
patronictl list
create_disk ha-disk-3

step "start $broker and $primary again (up --wait)"
"${compose[@]}" up --detach --wait --no-build
took "all services healthy again"
patronictl list
in_service rabbitmq-1 rabbitmqctl -q list_queues -p control-plane name leader members online
nexusctl disk list
nexusctl doctor
