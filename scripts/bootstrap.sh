#!/usr/bin/env bash
# Make this machine ready to run the project, from a fresh Debian 12 on. Safe to run again:
# each step is skipped when what it makes is already there.
#
# Only the RabbitMQ, PostgreSQL, Patroni and etcd binaries are needed: the tests and the local
# stack start private server processes of their own, so no system service is enabled or started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root=()
if [[ $EUID -ne 0 ]]; then
    as_root=(sudo)
fi

venv_ok() {
    [[ -x .venv/bin/python ]] &&
        .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

packages=()
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || packages+=(rabbitmq-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
# Tests start a Nexus replica with its clock skewed (tests/integration/test_skewed_clock.py).
command -v faketime >/dev/null || packages+=(faketime)
# The replicated database (tests/integration/test_ha_database.py, `dev run-all --ha-db`):
# PostgreSQL with a synchronous standby, managed by Patroni, which keeps its leader in etcd.
command -v patroni >/dev/null || packages+=(patroni)
command -v etcd >/dev/null || packages+=(etcd-server)
command -v etcdctl >/dev/null || packages+=(etcd-client)
if ! venv_ok && ! command -v python3.11 >/dev/null; then
    packages+=(python3.11 python3.11-venv)
fi

if ((${#packages[@]})); then
    echo "bootstrap: installing ${packages[*]}"
    # Without a policy-rc.d, package scripts would try to start the system services, which
    # fails on machines without an init system and would otherwise hold ports 5672/5432.
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
        "${as_root[@]}" chmod 755 "$policy"
        own_policy=true
    fi
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${packages[@]}" </dev/null
    if $own_policy; then
        "${as_root[@]}" rm -f "$policy"
    fi
fi

if ! venv_ok; then
    echo "bootstrap: creating .venv"
    rm -rf .venv
    python3.11 -m venv .venv
fi

# pip is slow even when it has nothing to do, so it runs only when pyproject.toml changed.
stamp=.venv/.bootstrap-pyproject.sha256
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(<"$stamp") != "$wanted" ]]; then
    echo "bootstrap: installing the project, its test tools and the benchmark's plotting into .venv"
    # pip warns about every local index location it cannot use; shown only on failure.
    log=.venv/bootstrap-pip.log
    if ! .venv/bin/python -m pip install --quiet -e '.[test,bench]' >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: pip install failed" >&2
        exit 1
    fi
    echo "$wanted" >"$stamp"
fi
