#!/bin/sh
# Run once by Patroni on the node that made the cluster (argument: a connection string
# as the superuser, over the local socket): the application's user and database, as the
# postgres image's POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB make them. The
# standbys get them by replication.
set -eu
user=${POSTGRES_USER:-nexus}
db=${POSTGRES_DB:-$user}
psql "$1" -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --set=user="$user" --set=password="$POSTGRES_PASSWORD" --set=db="$db" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
echo "post_bootstrap: user $user, database $db"
