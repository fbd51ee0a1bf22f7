#!/bin/sh
# One database node of compose.ha.yaml: its Patroni configuration, written from the
# environment at every start (nothing in it is state: that is in etcd and the data
# directory), then Patroni in the foreground. Patroni runs PostgreSQL itself: it
# bootstraps the cluster (initdb, then post_bootstrap.sh) on the node that wins the
# initialize key in etcd, and clones the primary with pg_basebackup on the others.
#
#   PATRONI_NAME            the node's name, and the host name the others reach it by
#   PATRONI_SCOPE           the cluster's name in etcd
#   PATRONI_ETCD3_HOSTS     etcd's address, host:port
#   POSTGRES_PASSWORD       the application user's (POSTGRES_USER, default nexus), owner
#                           of database POSTGRES_DB (default: the user's name)
#   PATRONI_SUPERUSER_PASSWORD, PATRONI_REPLICATION_PASSWORD
#
# A standby is cloned with pg_basebackup --checkpoint=fast: with the default (spread) it
# waits for the primary's next checkpoint, which took 95 s here. Timings as nexus/devstack/patroni.py's (ttl 10 s, loop_wait 1 s, retry_timeout 4 s):
# a primary that dies is replaced about 10 s later. Synchronous mode: a commit is
# acknowledged once a standby has it, and only that standby may be promoted.
set -eu

: "${PATRONI_NAME:?}" "${PATRONI_SCOPE:?}" "${PATRONI_ETCD3_HOSTS:?}"
: "${POSTGRES_PASSWORD:?}" "${PATRONI_SUPERUSER_PASSWORD:?}" "${PATRONI_REPLICATION_PASSWORD:?}"

config=/var/lib/postgresql/patroni.yml
# JSON is YAML; the passwords are not in it (Patroni reads PATRONI_*_PASSWORD itself).
cat >"$config" <<YAML
{
  "scope": "$PATRONI_SCOPE",
  "namespace": "/eventplane/",
  "name": "$PATRONI_NAME",
  "log": {"level": "INFO"},
  "restapi": {"listen": "0.0.0.0:8008", "connect_address": "$PATRONI_NAME:8008"},
  "etcd3": {"hosts": ["$PATRONI_ETCD3_HOSTS"]},
  "bootstrap": {
    "dcs": {
      "ttl": 10, "loop_wait": 1, "retry_timeout": 4,
      "synchronous_mode": true,
      "postgresql": {
        "use_pg_rewind": true,
        "parameters": {
          "max_connections": 200, "wal_level": "replica", "hot_standby": "on",
          "max_wal_senders": 10, "max_replication_slots": 10, "wal_keep_size": "128MB",
          "password_encryption": "scram-sha-256"
        }
      }
    },
    "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, {"auth-local": "trust"}],
    "post_bootstrap": "/usr/local/bin/post_bootstrap.sh"
  },
  "postgresql": {
    "listen": "0.0.0.0:5432",
    "connect_address": "$PATRONI_NAME:5432",
    "data_dir": "/var/lib/postgresql/patroni/data",
    "bin_dir": "/usr/lib/postgresql/15/bin",
    "pgpass": "/tmp/pgpass",
    "basebackup": [{"checkpoint": "fast"}],
    "pg_hba": [
      "local all all trust",
      "local replication all trust",
      "host replication replicator all scram-sha-256",
      "host all all all scram-sha-256"
    ],
    "authentication": {
      "superuser": {"username": "postgres"},
      "replication": {"username": "replicator"},
      "rewind": {"username": "postgres"}
    },
    "parameters": {"unix_socket_directories": "/var/run/postgresql"}
  }
}
YAML
exec patroni "$config"
