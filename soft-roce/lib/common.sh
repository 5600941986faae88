# shellcheck shell=bash disable=SC2034 # the LAB_* variables are for the scripts that source this
# Helpers shared by tests.sh, perftest.sh and bench.sh. They run where the device is: inside the
# lab VM (the usual case) or on a host with rdma_rxe, with the AGENTFABRIC_LAB_* variables set by
# soft-roce/lab.

LAB_DEV=${AGENTFABRIC_LAB_DEVICE:-rxe0}
LAB_GID=${AGENTFABRIC_LAB_GID_INDEX:-1}
LAB_ADDR=${AGENTFABRIC_LAB_ADDR_A:-10.77.0.1}
LAB_WORK=$(mktemp -d "${TMPDIR:-/tmp}/lab-work.XXXXXX")
trap 'rm -rf "$LAB_WORK"' EXIT
LAB_PORT=${LAB_PORT_BASE:-18600}

# wait_listen PORT SECONDS: until something listens on TCP PORT.
wait_listen() {
    local port=$1 n=$(($2 * 10)) i
    for ((i = 0; i < n; i++)); do
        ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# run_pair NAME SECONDS LISTEN SERVER-ARGV... --- CLIENT-ARGV...
# Starts the server, waits until it listens (LISTEN=tcp: its TCP port; LISTEN=none: one second),
# runs the client, and waits for the server. "@PORT@" in either argv becomes a fresh port. Up to
# three attempts, each with a fresh server and port. Logs: $LAB_WORK/NAME.server, NAME.client.
run_pair() {
    local name=$1 secs=$2 listen=$3
    shift 3
    local -a srv=() cli=()
    while [[ $# -gt 0 && $1 != --- ]]; do
        srv+=("$1")
        shift
    done
    shift
    cli=("$@")
    local attempt port spid crc src
    for attempt in 1 2 3; do
        port=$LAB_PORT
        LAB_PORT=$((LAB_PORT + 1))
        timeout --kill-after=5 "$secs" "${srv[@]//@PORT@/$port}" >"$LAB_WORK/$name.server" 2>&1 &
        spid=$!
        if [[ $listen == tcp ]]; then
            wait_listen "$port" 20 || true
        else
            sleep 1
        fi
        crc=0
        timeout --kill-after=5 "$secs" "${cli[@]//@PORT@/$port}" >"$LAB_WORK/$name.client" 2>&1 || crc=$?
        if [[ $crc == 0 ]]; then
            src=0
            wait "$spid" || src=$?
            [[ $src == 0 ]] && return 0
            echo "($name: server exited with $src)" >>"$LAB_WORK/$name.client"
            return 1
        fi
        kill "$spid" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
        echo "$name: attempt $attempt failed (client exit $crc)" >&2
        sleep 1
    done
    return 1
}

# show_logs NAME: both sides' output, indented.
show_logs() {
    local side
    for side in server client; do
        [[ -s $LAB_WORK/$1.$side ]] || continue
        echo "  --- $side:"
        sed 's/^/  | /' "$LAB_WORK/$1.$side"
    done
}

# perftest_row LABEL TOOL SIZE ITERS: runs perftest's TOOL (server and client on $LAB_DEV, the
# server at $LAB_ADDR) and sets PERFTEST_ROW to its result row (the first numeric row after
# "#bytes"; a variable, not output, so the port counter of run_pair advances).
# perftest derives its clock from a TSC-vs-gettimeofday fit; under emulation that fit sometimes
# fails ("Correlation coefficient r^2 < 0.9") and the latencies come out as inf: it runs again,
# three attempts in all. Logs: $LAB_WORK/LABEL.server, LABEL.client. Fails without a valid row.
perftest_row() {
    local label=$1 tool=$2 size=$3 iters=$4 row="" try
    PERFTEST_ROW=""
    local -a common=(-d "$LAB_DEV" -x "$LAB_GID" -p @PORT@ -F -s "$size" -n "$iters")
    for try in 1 2 3; do
        run_pair "$label" 180 tcp "$tool" "${common[@]}" --- "$tool" "${common[@]}" "$LAB_ADDR" || return 1
        row=$(awk '/#bytes/ { h = 1; next } h && $1 ~ /^[0-9]+$/ { print; exit }' "$LAB_WORK/$label.client")
        if [[ -n $row && $row != *inf* && $row != *nan* ]]; then
            PERFTEST_ROW=$row
            return 0
        fi
        echo "($tool: no valid figures in attempt $try (perftest's clock calibration failed under emulation); again)" >&2
    done
    return 1
}
