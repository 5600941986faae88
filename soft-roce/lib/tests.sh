#!/bin/bash
# `soft-roce/lab test`: smoke checks of the rxe device, then every executable in tests.d/ (name
# order). Closes with "lab: N passed, N failed"; exits 1 if anything failed.
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TESTS_D=${1:-$(dirname "${BASH_SOURCE[0]}")/../tests.d}
PER_TEST=${AGENTFABRIC_LAB_TEST_TIMEOUT:-900}
pass=0
fail=0

ok() {
    pass=$((pass + 1))
    echo "ok   $((pass + fail)) $1"
}
notok() {
    fail=$((fail + 1))
    echo "FAIL $((pass + fail)) $1"
}

echo "lab: smoke checks on $LAB_DEV (GID index $LAB_GID, $LAB_ADDR)${AGENTFABRIC_LAB_DEVICE_B:+ and $AGENTFABRIC_LAB_DEVICE_B (GID index ${AGENTFABRIC_LAB_GID_INDEX_B:-1}, ${AGENTFABRIC_LAB_ADDR_B:-})}"

if ibv_devices >"$LAB_WORK/devices" 2>&1 && grep -qw "$LAB_DEV" "$LAB_WORK/devices"; then
    ok "ibv_devices lists $LAB_DEV"
else
    notok "ibv_devices lists $LAB_DEV"
fi
sed 's/^/  | /' "$LAB_WORK/devices"

if ibv_devinfo -d "$LAB_DEV" >"$LAB_WORK/devinfo" 2>&1 && grep -q 'state:.*PORT_ACTIVE' "$LAB_WORK/devinfo"; then
    ok "ibv_devinfo -d $LAB_DEV: PORT_ACTIVE"
else
    notok "ibv_devinfo -d $LAB_DEV: PORT_ACTIVE"
fi
grep -E 'hca_id|transport|fw_ver|node_guid|port:|state:|active_mtu|link_layer' "$LAB_WORK/devinfo" | sed 's/^/  | /'

name="ibv_rc_pingpong -g $LAB_GID -d $LAB_DEV ($LAB_ADDR)"
if run_pair rc_pingpong 60 tcp \
    ibv_rc_pingpong -d "$LAB_DEV" -g "$LAB_GID" -p @PORT@ -n 200 --- \
    ibv_rc_pingpong -d "$LAB_DEV" -g "$LAB_GID" -p @PORT@ -n 200 "$LAB_ADDR"; then
    ok "$name"
    grep -E 'bytes in' "$LAB_WORK/rc_pingpong.client" | sed 's/^/  | client: /'
else
    notok "$name"
    show_logs rc_pingpong
fi

if [[ -n ${AGENTFABRIC_LAB_DEVICE_B:-} ]]; then
    dev_b=$AGENTFABRIC_LAB_DEVICE_B gid_b=${AGENTFABRIC_LAB_GID_INDEX_B:-1} addr_b=${AGENTFABRIC_LAB_ADDR_B:-10.77.0.2}
    name="ibv_rc_pingpong $LAB_DEV -> $dev_b over the veth pair ($LAB_ADDR -> $addr_b)"
    if run_pair rc_pingpong_b 60 tcp \
        ibv_rc_pingpong -d "$dev_b" -g "$gid_b" -p @PORT@ -n 200 --- \
        ibv_rc_pingpong -d "$LAB_DEV" -g "$LAB_GID" -p @PORT@ -n 200 "$addr_b"; then
        ok "$name"
        grep -E 'bytes in' "$LAB_WORK/rc_pingpong_b.client" | sed 's/^/  | client: /'
    else
        notok "$name"
        show_logs rc_pingpong_b
    fi
fi

name="rping (rdma_cm) $LAB_ADDR"
if run_pair rping 60 none \
    rping -s -a "$LAB_ADDR" -p @PORT@ -C 20 --- \
    rping -c -a "$LAB_ADDR" -p @PORT@ -C 20; then
    ok "$name"
else
    notok "$name"
    show_logs rping
fi

# The rxe ports' non-zero counters (retransmissions, duplicates, send errors) and the packets the
# kernel's backlog dropped: after a failed script (so a failure under emulation shows what the
# link went through), and once at the end of a clean run.
link_counters() {
    echo "lab: link counters since boot:"
    rdma statistic show 2>/dev/null | awk '{
        line = "  | " $1 " " $2;
        for (i = 3; i < NF; i += 2) if ($(i + 1) != "0") line = line " " $i "=" $(i + 1);
        print line
    }'
    local drops=0 _cpu dropped _rest
    while read -r _cpu dropped _rest; do
        drops=$((drops + 16#$dropped))
    done </proc/net/softnet_stat
    echo "  | backlog drops=$drops"
}

shopt -s nullglob
scripts=()
for f in "$TESTS_D"/*; do
    [[ -f $f && -x $f ]] && scripts+=("$f")
done
if [[ ${#scripts[@]} == 0 ]]; then
    echo "lab: no executable tests in $TESTS_D"
fi
for f in "${scripts[@]}"; do
    echo "lab: === tests.d/${f##*/}"
    rc=0
    timeout --kill-after=10 "$PER_TEST" "$f" || rc=$?
    if [[ $rc == 0 ]]; then
        ok "tests.d/${f##*/}"
    elif [[ $rc == 124 ]]; then
        notok "tests.d/${f##*/} (timed out after ${PER_TEST} s)"
    else
        notok "tests.d/${f##*/} (exit $rc)"
    fi
    [[ $rc == 0 ]] || link_counters
done

[[ $fail == 0 ]] && link_counters
echo "lab: $pass passed, $fail failed"
[[ $fail == 0 ]]
