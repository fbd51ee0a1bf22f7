#!/bin/sh
# compose.ha.yaml's RabbitMQ containers run this (mounted at /etc/rabbitmq/cluster.sh):
#
#   cluster.sh server       a node of the cluster: rabbitmq-server in the foreground
#   cluster.sh cluster      one-shot (the services wait for it to succeed): join
#                           rabbitmq-2 and -3 to rabbitmq-1 unless they are in its cluster
#                           already, wait for the 3 to run as one, import the definitions
#                           once, and check that every queue is a quorum queue with a
#                           member on each node
#
# Nodes of a cluster, and the CLI tools that talk to them (health checks, `docker compose
# exec rabbitmq-1 rabbitmqctl ...`), must share one Erlang cookie: it is written from
# RABBITMQ_ERLANG_COOKIE to $HOME/.erlang.cookie at every start (RabbitMQ 3.10, the
# Debian stand-in's, no longer reads the variable itself).
set -eu

: "${RABBITMQ_ERLANG_COOKIE:?the cluster's Erlang cookie}"
cookie="$HOME/.erlang.cookie"
rm -f "$cookie"
printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$cookie"
chmod 400 "$cookie"

nodes="rabbit@rabbitmq-1 rabbit@rabbitmq-2 rabbit@rabbitmq-3"
vhost=control-plane

case ${1:-server} in
server)
    exec rabbitmq-server
    ;;
cluster)
    seed=rabbit@rabbitmq-1
    for node in rabbit@rabbitmq-2 rabbit@rabbitmq-3; do
        if rabbitmqctl -n "$node" -q cluster_status --formatter json | grep -q "\"$seed\""; then
            echo "cluster: $node is in $seed's cluster"
            continue
        fi
        # The documented way; a fresh node has nothing to lose.
        echo "cluster: joining $node to $seed"
        rabbitmqctl -n "$node" -q stop_app
        rabbitmqctl -n "$node" -q join_cluster "$seed"
        rabbitmqctl -n "$node" -q start_app
    done
    rabbitmqctl -n "$seed" -q await_online_nodes 3 --timeout 120
    rabbitmqctl -n "$seed" -q import_definitions /etc/rabbitmq/definitions.json
    # A quorum queue's members are chosen when it is declared: all three nodes now. (The
    # clients' exclusive reply queues, classic and not durable, are not the definitions'.)
    rabbitmqctl -n "$seed" -q list_queues -p "$vhost" --no-table-headers name durable type members |
        while read -r name durable type members; do
            [ "$durable" = true ] || continue
            [ "$type" = quorum ] || { echo "cluster: $name is $type, not quorum" >&2; exit 1; }
            for node in $nodes; do
                case $members in
                *"$node"*) ;;
                *) echo "cluster: $name has no member on $node ($members)" >&2; exit 1 ;;
                esac
            done
            echo "cluster: $name quorum on $members"
        done
    ;;
*)
    echo "usage: cluster.sh server|cluster" >&2
    exit 2
    ;;
esac
