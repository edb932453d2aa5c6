#!/usr/bin/env bash
# Virtual hosts on this machine for multi-node tests: each node is a network namespace with its own address on a
# bridge, its own hostname, its own /dev/shm and an /etc/hosts naming every node. Between them, the project's
# multi-node paths (torchrun's c10d rendezvous on the first node's address, NCCL/gloo between addresses, SLURM
# daemons on distinct hosts, each node's shared-memory blocks) run as they do on a cluster. What it does not give:
# separate CPUs, memory or disks (the nodes share this machine's) and a real network's latency or failures.
#
#   scripts/virtual_nodes.sh up NAME...        # create the nodes (idempotent); prints "NAME ADDRESS" per node
#   scripts/virtual_nodes.sh exec NAME CMD...  # run CMD on node NAME (its network, hostname, /dev/shm, /etc/hosts)
#   scripts/virtual_nodes.sh down [NAME...]    # remove the named nodes (their processes are killed), or all
#   scripts/virtual_nodes.sh list              # the nodes that are up, "NAME ADDRESS"
#
# Each node gets the lowest free 10.231.0.i (nodes of other callers keep theirs). This machine is 10.231.0.254 on the
# bridge, under its own short hostname, so daemons in the root namespace (slurmctld) are reachable from every node.
# VIRTUAL_NODE_BINDS="SRC:DST ..." in the environment of `exec` bind-mounts SRC over DST inside the node only
# (``%n`` in SRC is replaced by the node name): per-node spool, pid and log folders for daemons sharing one config.
# Needs root (ip netns, mounts). Exit status 1 with a message on stderr when the nodes cannot be made.
set -euo pipefail

STATE=/run/biomedgpt-virtual-nodes
BRIDGE=bgvn0
SUBNET=10.231.0
HOST_ADDR=$SUBNET.254
HOST_NAME=$(hostname -s)

die() {
    echo "virtual_nodes: error: $*" >&2
    exit 1
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces and mounts)"; }

write_hosts() {
    # One hosts file for every node: localhost, the host on the bridge, and each node by name.
    local tmp=$STATE/hosts.tmp name addr
    {
        echo "127.0.0.1 localhost"
        echo "$HOST_ADDR $HOST_NAME"
        while read -r name addr; do echo "$addr $name"; done <"$STATE/nodes"
    } >"$tmp"
    # Rewritten in place: running nodes have this very file bind-mounted over their /etc/hosts.
    cat "$tmp" >"$STATE/hosts"
    rm -f "$tmp"
}

free_address() {
    # The lowest 10.231.0.i that no node has: nodes made by different callers never share an address.
    local i
    for i in $(seq 1 249); do
        grep -q " $SUBNET.$i\$" "$STATE/nodes" || {
            echo "$SUBNET.$i"
            return
        }
    done
    die "all 249 addresses are taken"
}

cmd_up() {
    need_root
    (($# > 0)) || die "up needs node names (e.g. up node1 node2)"
    mkdir -p "$STATE"
    touch "$STATE/nodes"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (ip link add)"
        ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local name ns addr
    for name in "$@"; do
        [[ $name =~ ^[a-z][a-z0-9-]{0,11}$ ]] || die "node name '$name': use 1-12 lower-case letters, digits or '-'"
        ns=bgvn-$name
        if grep -q "^$name " "$STATE/nodes" && ip netns list | grep -qw "$ns"; then
            continue # already up
        fi
        sed -i "/^$name /d" "$STATE/nodes"
        addr=$(free_address)
        ip netns del "$ns" 2>/dev/null || true
        ip link del "vn-$name" 2>/dev/null || true # left by a namespace removed by hand
        ip netns add "$ns" || die "cannot create network namespace $ns"
        ip link add "vn-$name" type veth peer name eth0 netns "$ns" || die "cannot create veth vn-$name"
        ip link set "vn-$name" master "$BRIDGE" up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$HOST_ADDR"
        echo "$name $addr" >>"$STATE/nodes"
    done
    write_hosts
    for name in "$@"; do grep "^$name " "$STATE/nodes"; done
}

cmd_exec() {
    (($# >= 2)) || die "usage: exec NAME CMD..."
    local name=$1
    shift
    [[ -f $STATE/nodes ]] && grep -q "^$name " "$STATE/nodes" || die "no virtual node '$name' (run: up $name ...)"
    # The node's network namespace, plus mount and UTS namespaces of its own (the mounts below stay inside). Not
    # `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup from daemons that need it (slurmd).
    exec nsenter --net="/run/netns/bgvn-$name" unshare --mount --propagation private --uts -- bash -c '
        set -e
        name=$1 state=$2
        shift 2
        hostname "$name"
        mount -t tmpfs -o mode=1777 tmpfs /dev/shm
        mount --bind "$state/hosts" /etc/hosts
        for bind in ${VIRTUAL_NODE_BINDS:-}; do
            src=${bind%%:*} dst=${bind#*:}
            src=${src//%n/$name}
            mkdir -p "$src" "$dst"
            mount --bind "$src" "$dst"
        done
        exec "$@"
    ' virtual-node "$name" "$STATE" "$@"
}

remove_node() {
    local name=$1 ns=bgvn-$1
    if ip netns list | grep -qw "$ns"; then
        ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    fi
    ip link del "vn-$name" 2>/dev/null || true
    [[ ! -f $STATE/nodes ]] || sed -i "/^$name /d" "$STATE/nodes"
}

cmd_down() {
    need_root
    local name
    if (($# > 0)); then
        for name in "$@"; do remove_node "$name"; done
        write_hosts
        [[ -s $STATE/nodes ]] && return 0
    else
        for name in $(ip netns list | awk '{print $1}' | sed -n 's/^bgvn-//p'); do remove_node "$name"; done
    fi
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -rf "$STATE"
}

with_lock() {
    # up and down rewrite $STATE/nodes and the hosts file: callers running at once (parallel test workers) take
    # turns. The lock lives beside $STATE, which `down` removes.
    need_root
    exec 9>"$STATE.lock"
    flock 9
    "$@"
}

case ${1:-} in
up) shift && with_lock cmd_up "$@" ;;
exec) shift && cmd_exec "$@" ;;
down) shift && with_lock cmd_down "$@" ;;
list) [[ -f $STATE/nodes ]] && cat "$STATE/nodes" ;;
*) sed -n '2,18p' "$0" && exit 2 ;;
esac
