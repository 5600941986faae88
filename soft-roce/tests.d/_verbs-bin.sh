# Sourced by the verbs scripts of tests.d: finds a test binary that `cargo test` built on the host
# (cargo does not run in the lab). Usage: verbs_bin NAME PATTERN -> prints the newest executable
# target/debug/deps/NAME-<hash> whose `--list --ignored` shows PATTERN, or fails saying how to build it.
verbs_bin() {
    local name=$1 pattern=$2 dir f best="" list
    dir=${CARGO_TARGET_DIR:-target}/debug/deps
    for f in $(ls -t "$dir/$name"-* 2>/dev/null); do
        [[ -x $f && ! -d $f && $f != *.d ]] || continue
        # The whole list first: `grep -q` in a pipe would stop reading at the first match, and
        # the test binary, writing the rest into a closed pipe, exits non-zero (pipefail).
        list=$("$f" --list --ignored 2>/dev/null) || continue
        if grep -q -- "$pattern" <<<"$list"; then
            best=$f
            break
        fi
    done
    if [[ -z $best ]]; then
        echo "verbs tests: DID NOT RUN: no prebuilt test binary $dir/$name-* listing '$pattern';" \
             "build it on the host first: cargo test --workspace --no-run" >&2
        return 1
    fi
    echo "$best"
}

# Fails (never passes silently) when the lab gave no device.
verbs_need_device() {
    if [[ -z ${AGENTFABRIC_LAB_DEVICE:-} ]] || ! ibv_devices 2>/dev/null | grep -q "${AGENTFABRIC_LAB_DEVICE}"; then
        echo "verbs tests: DID NOT RUN: no RDMA device (AGENTFABRIC_LAB_DEVICE='${AGENTFABRIC_LAB_DEVICE:-}'); run through soft-roce/lab test" >&2
        return 1
    fi
}
