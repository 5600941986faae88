#!/bin/bash
# `soft-roce/lab perftest`: the perftest baseline on one rxe device, server and client on the same
# device (the server's side is reached at $AGENTFABRIC_LAB_ADDR_A). Short runs: about a minute
# under TCG. Figures under emulation are for ratios within one run only.
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LAT_ITERS=${AGENTFABRIC_LAB_LAT_ITERS:-1000}
BW_ITERS=${AGENTFABRIC_LAB_BW_ITERS:-300}
pass=0
fail=0
summary=()

# Runs one perftest (server and client on $LAB_DEV) and records its figures.
one() {
    local label=$1 tool=$2 size=$3 iters=$4 row="" ok=0
    echo
    echo "=== $tool -s $size -n $iters (-d $LAB_DEV -x $LAB_GID, server $LAB_ADDR)"
    perftest_row "$label" "$tool" "$size" "$iters" && ok=1
    row=$PERFTEST_ROW
    if [[ $ok == 1 ]]; then
        pass=$((pass + 1))
        cat "$LAB_WORK/$label.client"
        case $tool in
        *_lat) summary+=("$(awk -v t="$tool" '{ printf "%-13s %8s B  t_typical %9s us  t_avg %9s us  p99 %9s us  p99.9 %9s us", t, $1, $5, $6, $8, $9 }' <<<"$row")") ;;
        *_bw) summary+=("$(awk -v t="$tool" '{ printf "%-13s %8s B  BW average %9s MB/s  peak %9s MB/s  %s Mpps", t, $1, $4, $3, $5 }' <<<"$row")") ;;
        esac
    else
        fail=$((fail + 1))
        echo "FAILED: $tool -s $size"
        show_logs "$label"
        summary+=("$(printf '%-13s %8s B  FAILED' "$tool" "$size")")
    fi
}

echo "perftest on $LAB_DEV (GID index $LAB_GID, $LAB_ADDR), lab mode ${AGENTFABRIC_LAB_MODE:-?}"
one send_lat_64 ib_send_lat 64 "$LAT_ITERS"
one write_lat_64 ib_write_lat 64 "$LAT_ITERS"
one write_lat_4k ib_write_lat 4096 "$LAT_ITERS"
one write_bw_64k ib_write_bw 65536 "$BW_ITERS"
one write_bw_1m ib_write_bw 1048576 "$BW_ITERS"

echo
echo "perftest summary ($LAB_DEV; emulated: compare ratios within one run, never absolute figures):"
printf '  %s\n' "${summary[@]}"
echo "perftest: $pass passed, $fail failed"
[[ $fail == 0 ]]
