#!/bin/bash
# Runs inside the lab VM, chrooted into the host's root (read-only 9p + tmpfs overlay), started by
# lib/init. Builds the guest-only network and the rxe devices, then runs the caller's command with
# the caller's environment and working directory. Output and exit code go to the writable 9p
# share mounted at $IO, which the host reads live.
#
#   veth0 10.77.0.1/24  <->  veth1 10.77.0.2/24      (both in the guest, no NIC in the VM)
#   rxe0 on veth0, rxe1 on veth1 (if it can be made); GID index 1 = RoCE v2 IPv4-mapped GID.
#
# Traffic 10.77.0.1 <-> 10.77.0.2 is routed over the veth wire (not the kernel's local shortcut),
# so rxe0 <-> rxe1 works and `tc qdisc ... netem` on veth0/veth1 impairs it.
set -u
IO=/run/agentfabric-lab/io
exec </dev/null >>"$IO/stdout" 2>>"$IO/stderr"

setup_error() {
    echo "$*" >"$IO/setup_error"
    echo "lab(guest): setup failed: $*" >&2
    exit 1
}
note() {
    [[ ${AGENTFABRIC_LAB_VERBOSE:-0} == 1 ]] && echo "lab(guest): [$(cut -d' ' -f1 /proc/uptime)] $*" >&2
    return 0
}

# shellcheck source=/dev/null
source "$IO/env" || setup_error "cannot read the environment file"
cmd=() cwd=/
# shellcheck source=/dev/null
source "$IO/cmd" || setup_error "cannot read the command file" # defines cmd=(...) and cwd=...

export PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
export HOME=${HOME:-/root}
mkdir -p /run/agentfabric-lab/tmp /run/agentfabric-lab/io/out
chmod 1777 /run/agentfabric-lab/tmp
export TMPDIR=/run/agentfabric-lab/tmp
hostname agentfabric-lab 2>/dev/null || true

addr_a=10.77.0.1 addr_b=10.77.0.2
sysw() { echo "$2" >"/proc/sys/$1" 2>/dev/null; }

note "guest.sh started"
# One `ip -batch` per step: every fork of a host binary costs time under emulation.
ip -batch - <<EOB || setup_error "cannot create the veth pair"
link set lo up
link add veth0 type veth peer name veth1
EOB
for i in 0 1; do
    # No IPv6 on the lab links: it keeps the GID table to {0: link-local default, 1: IPv4}.
    sysw "net/ipv6/conf/veth$i/disable_ipv6" 1
    sysw "net/ipv4/conf/veth$i/accept_local" 1
    sysw "net/ipv4/conf/veth$i/rp_filter" 0
done
sysw net/ipv4/conf/all/rp_filter 0
sysw net/ipv4/conf/all/accept_local 1
ip -batch - <<EOB || setup_error "cannot address the veth pair or bring it up"
addr add $addr_a/24 dev veth0
addr add $addr_b/24 dev veth1
link set veth0 up
link set veth1 up
EOB

# Route A<->B over the wire: locally generated packets to the other end leave by the veth, and the
# local table is consulted after these rules (pref 1000 instead of 0).
wire=1
mac0=$(</sys/class/net/veth0/address) mac1=$(</sys/class/net/veth1/address)
ip -batch - <<EOB || {
rule add pref 1000 lookup local
rule del pref 0 lookup local
route add $addr_b/32 dev veth0 src $addr_a table 100
route add $addr_a/32 dev veth1 src $addr_b table 101
rule add pref 100 iif lo to $addr_b lookup 100
rule add pref 101 iif lo to $addr_a lookup 101
neigh replace $addr_b lladdr $mac1 dev veth0 nud permanent
neigh replace $addr_a lladdr $mac0 dev veth1 nud permanent
EOB
    wire=0
    echo "lab(guest): warning: could not route 10.77.0.1<->10.77.0.2 over the veth pair" >&2
}

note "network ready"
rdma link add rxe0 type rxe netdev veth0 || setup_error "rdma link add rxe0 type rxe netdev veth0 failed"
dev_b=""
if [[ $wire == 1 ]] && rdma link add rxe1 type rxe netdev veth1; then
    dev_b=rxe1
fi

# The RoCE v2 GID whose address is IPv4 $2 on device $1 (prints its index).
gid_index() {
    local dev=$1 ip=$2 want f idx g t
    local -a o
    IFS=. read -r -a o <<<"$ip"
    printf -v want '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "${o[@]}"
    # The table has hundreds of entries; the interesting ones come first. No forks: `read`.
    for ((idx = 0; idx < 16; idx++)); do
        f=/sys/class/infiniband/$dev/ports/1/gids/$idx
        g=""
        read -r g <"$f" 2>/dev/null || true
        [[ $g == "$want" ]] || continue
        t=""
        read -r t <"/sys/class/infiniband/$dev/ports/1/gid_attrs/types/$idx" 2>/dev/null || true
        [[ $t == "RoCE v2" ]] || continue
        echo "$idx"
        return 0
    done
    return 1
}

wait_active() {
    local dev=$1 ip=$2 i st
    for ((i = 0; i < 300; i++)); do
        st=""
        read -r st <"/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null || true
        if [[ $st == *ACTIVE* ]] &&
            gid_index "$dev" "$ip" >/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
note "rxe devices added"
wait_active rxe0 "$addr_a" || setup_error "rxe0 did not become ACTIVE with an IPv4 GID within 30 s"
gid_a=$(gid_index rxe0 "$addr_a")
if [[ -n $dev_b ]]; then
    if wait_active rxe1 "$addr_b"; then
        gid_b=$(gid_index rxe1 "$addr_b")
    else
        echo "lab(guest): warning: rxe1 did not become ACTIVE; only rxe0 is available" >&2
        rdma link delete rxe1 2>/dev/null
        dev_b=""
    fi
fi
[[ $gid_a == 1 ]] || echo "lab(guest): note: the IPv4 GID of rxe0 has index $gid_a, not 1" >&2

export AGENTFABRIC_LAB=1
export AGENTFABRIC_LAB_MODE=vm
export AGENTFABRIC_LAB_DEVICE=rxe0
export AGENTFABRIC_LAB_GID_INDEX=$gid_a
export AGENTFABRIC_LAB_ADDR_A=$addr_a
export AGENTFABRIC_LAB_ADDR_B=$addr_b
export AGENTFABRIC_LAB_NETDEV_A=veth0
export AGENTFABRIC_LAB_NETDEV_B=veth1
export AGENTFABRIC_LAB_OUT=$IO/out
if [[ -n $dev_b ]]; then
    export AGENTFABRIC_LAB_DEVICE_B=$dev_b
    export AGENTFABRIC_LAB_GID_INDEX_B=$gid_b
else
    unset AGENTFABRIC_LAB_DEVICE_B AGENTFABRIC_LAB_GID_INDEX_B
fi
note "rxe0 gid $gid_a${dev_b:+, $dev_b gid $gid_b}, wire routing $wire"

cd -- "$cwd" 2>/dev/null || setup_error "working directory $cwd is not visible in the guest"
cut -d' ' -f1 /proc/uptime >"$IO/started"
"${cmd[@]}"
rc=$?
echo "$rc" >"$IO/rc.tmp" && mv "$IO/rc.tmp" "$IO/rc"
exit 0
