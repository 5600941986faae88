#!/bin/bash
# `soft-roce/lab bench`: the perftest baseline, then every executable in bench.d/ (name order), in
# the same boot, so all figures come from one run and can be compared with each other.
set -uo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
BENCH_D=${1:-$here/../bench.d}
PER_BENCH=${AGENTFABRIC_LAB_BENCH_TIMEOUT:-900}
pass=0
fail=0

echo "bench: === perftest baseline"
if bash "$here/perftest.sh"; then pass=$((pass + 1)); else fail=$((fail + 1)); fi

shopt -s nullglob
n=0
for f in "$BENCH_D"/*; do
    [[ -f $f && -x $f ]] || continue
    n=$((n + 1))
    echo
    echo "bench: === bench.d/${f##*/}"
    rc=0
    timeout --kill-after=10 "$PER_BENCH" "$f" || rc=$?
    if [[ $rc == 0 ]]; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        echo "bench: bench.d/${f##*/} failed (exit $rc)"
    fi
done
[[ $n -gt 0 ]] || echo "bench: no executable benchmarks in $BENCH_D"
echo "bench: $pass passed, $fail failed"
[[ $fail == 0 ]]
