# Shared by the scripts under scripts/docker/ and scripts/*_check.sh (sourced, not run).
#
# One Docker engine for this project, on a PRIVATE socket: an engine on the default
# /var/run/docker.sock is found by every program on the machine, and the test harness
# (tests/harness/servers.py) would then switch everyone's tests to testcontainers. Its
# state (images included, so they are built once and reused) lives in
# $EVENTPLANE_DOCKER_DIR, one directory for the whole machine: two engines at once would
# each create a docker0 bridge on the same subnet, so the steps that use the engine take
# a lock (docker_lock) and run one at a time.
#
# The engine comes from Debian bookworm's packages (docker.io, containerd, runc); Compose
# v2 and buildx, which bookworm lacks, from Debian trixie's packages, fetched with a
# private apt configuration (the system's sources stay as they are) into
# $DOCKER_CONFIG/cli-plugins. Facts behind these choices: docs/docker.md.

EVENTPLANE_DOCKER_DIR=${EVENTPLANE_DOCKER_DIR:-/var/lib/eventplane-docker}
export DOCKER_HOST="unix://$EVENTPLANE_DOCKER_DIR/docker.sock"
export DOCKER_CONFIG="$EVENTPLANE_DOCKER_DIR/cli"
# Compose and buildx print progress bars meant for a terminal; CI logs want lines.
export BUILDKIT_PROGRESS=plain
export COMPOSE_PROGRESS=plain
export COMPOSE_ANSI=never

# Local image names. The project's own image is compose.yaml's; the stand-ins for the
# official RabbitMQ, PostgreSQL and Prometheus images are chosen by the variables that
# compose.yaml and tests/harness/servers.py read (their defaults are the official
# images, for machines that reach a registry).
BASE_IMAGE=eventplane-debian:bookworm
APP_IMAGE=oxide-eventplane:dev
STANDIN_RABBITMQ_IMAGE=eventplane-rabbitmq:dev
STANDIN_POSTGRES_IMAGE=eventplane-postgres:dev
# PostgreSQL under Patroni, and etcd: compose.ha.yaml's (images.sh --ha).
PATRONI_IMAGE=eventplane-patroni:dev
PROMETHEUS_IMAGE=eventplane-prometheus:dev

# Debian mirror for the base image and the trixie plugins (the builds use the machine's
# own apt sources, passed at build time: scripts/docker/images.sh).
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

ENGINE_START_TIMEOUT=${ENGINE_START_TIMEOUT:-90}
ENGINE_LOCK_TIMEOUT=${ENGINE_LOCK_TIMEOUT:-900}

_as_root=()
if [[ $EUID -ne 0 ]]; then
    _as_root=(sudo)
fi

docker_say() { echo "docker: $*"; }
docker_die() {
    echo "docker: FAILURE: $*" >&2
    exit 1
}

docker_install() {
    # The engine's packages, from the system's own sources.
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v containerd >/dev/null || missing+=(containerd)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker >/dev/null || missing+=(docker.io)
    if ((${#missing[@]})); then
        docker_say "installing ${missing[*]}"
        # Package scripts must not start the system's docker service (it would listen on
        # the default socket): policy-rc.d refuses every start while they run.
        local policy=/usr/sbin/policy-rc.d own_policy=false
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' | "${_as_root[@]}" tee "$policy" >/dev/null
            "${_as_root[@]}" chmod 755 "$policy"
            own_policy=true
        fi
        local install=("${_as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install
            -y -qq --no-install-recommends "${missing[@]}")
        if ! "${install[@]}" </dev/null; then
            "${_as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            "${install[@]}" </dev/null
        fi
        if $own_policy; then
            "${_as_root[@]}" rm -f "$policy"
        fi
    fi

    # Compose v2 and buildx: trixie's static binaries, as CLI plugins of our own client
    # configuration only.
    local plugins="$DOCKER_CONFIG/cli-plugins"
    if [[ -x $plugins/docker-compose && -x $plugins/docker-buildx ]]; then
        return
    fi
    docker_say "fetching docker-compose and docker-buildx from Debian trixie (private apt configuration)"
    local apt="$EVENTPLANE_DOCKER_DIR/apt"
    "${_as_root[@]}" mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$plugins"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR trixie main" |
        "${_as_root[@]}" tee "$apt/sources.list" >/dev/null
    local opts=(
        -o "Dir::Etc::SourceList=$apt/sources.list"
        -o "Dir::Etc::SourceParts=$apt/none"
        -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt/cache"
        -o "APT::Sandbox::User=root"
    )
    "${_as_root[@]}" apt-get -qq "${opts[@]}" update
    (cd "$apt/debs" && "${_as_root[@]}" apt-get -qq "${opts[@]}" download docker-compose docker-buildx)
    local deb
    for deb in "$apt"/debs/docker-compose_*.deb "$apt"/debs/docker-buildx_*.deb; do
        "${_as_root[@]}" dpkg-deb -x "$deb" "$apt/root"
    done
    "${_as_root[@]}" install -m 755 "$apt/root/usr/libexec/docker/cli-plugins/docker-compose" \
        "$apt/root/usr/libexec/docker/cli-plugins/docker-buildx" "$plugins/"
    "${_as_root[@]}" rm -rf "$apt/root" "$apt/debs" "$apt/lists" "$apt/cache"
}

docker_lock() {
    # One user of the engine at a time, machine-wide; released when the calling script
    # exits. The engine started under it must not inherit the descriptor (docker_start
    # closes it), or the lock would live as long as the engine.
    "${_as_root[@]}" mkdir -p "$EVENTPLANE_DOCKER_DIR"
    exec {DOCKER_LOCK_FD}>"$EVENTPLANE_DOCKER_DIR/lock"
    if ! flock -n "$DOCKER_LOCK_FD"; then
        docker_say "waiting for another user of the engine (lock $EVENTPLANE_DOCKER_DIR/lock, up to ${ENGINE_LOCK_TIMEOUT}s)"
        flock -w "$ENGINE_LOCK_TIMEOUT" "$DOCKER_LOCK_FD" ||
            docker_die "the engine stayed locked for ${ENGINE_LOCK_TIMEOUT}s"
    fi
}

docker_answers() {
    timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

_daemon_config() {
    # iptables/ip-forward/ip-masq off: the engine changes nothing in the machine's
    # network; published ports bind to 127.0.0.1 only. The default bridge stays (without
    # it testcontainers cannot map ports and builds fail).
    cat <<EOF
{
  "hosts": ["$DOCKER_HOST"],
  "data-root": "$EVENTPLANE_DOCKER_DIR/data",
  "exec-root": "$EVENTPLANE_DOCKER_DIR/exec",
  "pidfile": "$EVENTPLANE_DOCKER_DIR/dockerd.pid",
  "storage-driver": "overlay2",
  "iptables": false,
  "ip-forward": false,
  "ip-masq": false,
  "ip": "127.0.0.1",
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
EOF
}

# Set by docker_start: the PID of the dockerd this script started, or empty.
DOCKERD_STARTED_PID=

docker_start() {
    # Start dockerd (which starts and stops its own containerd) in the background on the
    # private socket, unless an engine already answers there; fail, never skip, when it
    # does not come up.
    docker_install
    if docker_answers; then
        docker_say "an engine already answers on $DOCKER_HOST: using it (and leaving it running)"
        return
    fi
    local dir=$EVENTPLANE_DOCKER_DIR
    "${_as_root[@]}" mkdir -p "$dir"
    _daemon_config | "${_as_root[@]}" tee "$dir/daemon.json" >/dev/null
    local stale
    stale=$(cat "$dir/dockerd.pid" 2>/dev/null || true)
    if [[ -n $stale ]] && kill -0 "$stale" 2>/dev/null; then
        docker_die "dockerd $stale (from $dir) is running but does not answer on $DOCKER_HOST; see $dir/dockerd.log"
    fi
    "${_as_root[@]}" rm -f "$dir/dockerd.pid" "$dir/docker.sock"
    docker_say "starting dockerd on $DOCKER_HOST (log $dir/dockerd.log)"
    local lock_fd=${DOCKER_LOCK_FD:-}
    if [[ -n $lock_fd ]]; then
        setsid "${_as_root[@]}" dockerd --config-file "$dir/daemon.json" \
            >"$dir/dockerd.log" 2>&1 </dev/null {lock_fd}>&- &
    else
        setsid "${_as_root[@]}" dockerd --config-file "$dir/daemon.json" \
            >"$dir/dockerd.log" 2>&1 </dev/null &
    fi
    DOCKERD_STARTED_PID=$!
    local started=$SECONDS
    until docker_answers; do
        if ! kill -0 "$DOCKERD_STARTED_PID" 2>/dev/null; then
            tail -n 30 "$dir/dockerd.log" >&2 || true
            DOCKERD_STARTED_PID=
            docker_die "dockerd exited during start-up (log above: $dir/dockerd.log)"
        fi
        if ((SECONDS - started > ENGINE_START_TIMEOUT)); then
            tail -n 30 "$dir/dockerd.log" >&2 || true
            docker_stop
            docker_die "dockerd did not answer on $DOCKER_HOST within ${ENGINE_START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    docker_say "engine $(docker version --format '{{.Server.Version}}') up in $((SECONDS - started)) s"
}

docker_stop() {
    # Stop the engine this script started (by its PID; containerd goes with it).
    local pid=$DOCKERD_STARTED_PID
    [[ -n $pid ]] || return 0
    DOCKERD_STARTED_PID=
    kill -0 "$pid" 2>/dev/null || return 0
    docker_say "stopping dockerd $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 60)); then
            docker_say "dockerd $pid still running after 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
}
