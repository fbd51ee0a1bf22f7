#!/bin/sh
# The first start makes the cluster as the official postgres image does: superuser
# POSTGRES_USER (default postgres) with POSTGRES_PASSWORD (required), database
# POSTGRES_DB (default: the user's name), password (scram-sha-256) logins from any
# host. The temporary server that creates the database listens on its socket only, so
# nothing sees the server up before it is ready. Then the server runs in the foreground.
set -eu

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
for arg in "$@"; do
    case $arg in
    -V | --version | --help | --describe-config | -C) exec "$@" ;;
    esac
done

user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is required" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$db" != postgres ]; then
        echo 'CREATE DATABASE :"db"' | psql -v ON_ERROR_STOP=1 --username="$user" \
            --dbname=postgres --no-psqlrc --set=db="$db" >/dev/null
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres-entrypoint: cluster made (user $user, database $db)"
fi

if [ $# -gt 0 ]; then shift; fi
exec postgres -c listen_addresses='*' "$@"
