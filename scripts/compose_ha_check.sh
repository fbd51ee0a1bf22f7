#!/usr/bin/env bash
# compose.ha.yaml as its users run it, with a node of each cluster lost on the way. Not
# part of scripts/test.sh (it would add about 150 s with the images built, measured); run it
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
#   5. a disk create whose saga waits for its regions, and meanwhile the RabbitMQ node
#      leading nexus.events killed (docker kill): the create must finish; doctor; then a
#      fresh disk create and doctor,
#   6. the same with the Patroni primary killed: the create must finish (on the standby
#      Patroni promotes); doctor; a fresh disk create and doctor,
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
work=$(mktemp -d /tmp/eventplane-compose-ha.XXXXXX)

finish() {
    local status=$?
    rm -rf "$work"
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
kill_in_flight() { # kill_in_flight DISK SERVICE WHAT: SERVICE killed while DISK's saga waits
    local disk=$1 service=$2 what=$3 out="$work/$1.out" pid
    step "nexusctl disk create $disk --wait; $service ($what) killed while the saga waits"
    nexusctl disk create "$disk" --size 1GiB --wait >"$out" 2>&1 &
    pid=$!
    # The first `waiting` line: the saga sent its region commands and parked (the regions
    # take 3 s: compose.ci.yaml); the kill follows that line, nothing sleeps.
    if ! timeout 120 grep -q -m1 ' waiting ' <(tail -n +1 -f "$out" --pid "$pid"); then
        cat "$out"
        docker_die "the disk create of $disk ended or hung before its saga waited"
    fi
    docker kill "$("${compose[@]}" ps --quiet "$service")" >/dev/null
    echo "== compose ha: $service killed at $((SECONDS - step_started)) s"
    local status=0
    wait "$pid" || status=$?
    sed 's/^/    /' "$out"
    ((status == 0)) || docker_die "disk create $disk --wait exited $status after $service was killed"
    took "disk $disk created, $service killed on the way"
}

patronictl list
create_disk ha-disk-1

broker=$(rabbitmq_leader)
[[ $broker == rabbitmq-[123] ]] || docker_die "no leader of nexus.events found ($broker)"
kill_in_flight ha-disk-2 "$broker" "the RabbitMQ node leading nexus.events"
echo "nexus.events now led by $(rabbitmq_leader)"
nexusctl doctor
create_disk ha-disk-3

primary=$(patroni_leader)
[[ $primary == postgres-[123] ]] || docker_die "no Patroni leader found ($primary)"
kill_in_flight ha-disk-4 "$primary" "the Patroni primary"
leader=$(patroni_leader)
[[ -n $leader && $leader != "$primary" ]] || docker_die "no standby promoted ($leader)"
echo "== compose ha: $leader is the primary now"
patronictl list
nexusctl doctor
create_disk ha-disk-5

step "start $broker and $primary again (up --wait)"
"${compose[@]}" up --detach --wait --no-build
took "all services healthy again"
patronictl list
in_service rabbitmq-1 rabbitmqctl -q list_queues -p control-plane name leader members online
nexusctl disk list
nexusctl doctor
