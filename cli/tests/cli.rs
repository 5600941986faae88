//! End-to-end tests of the `agentfabric` binary: short runs on the in-process transport.

use std::process::{Command, Output};

fn agentfabric(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentfabric"))
        .args(args)
        .output()
        .expect("the agentfabric binary runs")
}

/// Runs a bench with `--json` and returns the single JSON object it printed.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = agentfabric(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}; stderr:\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 on stdout");
    // Exactly one JSON value on stdout, nothing else.
    let mut values = serde_json::Deserializer::from_str(&stdout).into_iter::<serde_json::Value>();
    let v = values
        .next()
        .expect("one JSON value on stdout")
        .expect("valid JSON on stdout");
    assert!(
        values.next().is_none(),
        "more than one JSON value: {stdout}"
    );
    assert!(v.is_object(), "not an object: {v}");
    v
}

fn check_summary(v: &serde_json::Value, what: &str) {
    for key in ["count", "p50_us", "p99_us", "p999_us", "max_us"] {
        assert!(v[key].is_number(), "{what}.{key} missing in {v}");
    }
    assert!(v["count"].as_u64().unwrap() > 0, "{what}.count is 0");
    let p50 = v["p50_us"].as_f64().unwrap();
    let p99 = v["p99_us"].as_f64().unwrap();
    let max = v["max_us"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{what}: {v}");
}

fn check_common(v: &serde_json::Value, workload: &str) {
    check_common_on(v, "mem", workload);
}

fn check_common_on(v: &serde_json::Value, transport: &str, workload: &str) {
    assert_eq!(v["transport"], transport);
    assert_eq!(v["workload"], workload);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["size_bytes"].as_u64().unwrap() > 0);
    assert!(v["duration_s"].as_f64().unwrap() > 0.0);
    // The default: one fewer than the cores, at least 1.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(v["threads"], cores.saturating_sub(1).max(1));
    assert!(v["fabric_stats"].is_object());
    assert!(v["spin_us"].is_null(), "spin_us is a verbs setting: {v}");
    check_debug_build(v);
}

/// `debug_build` says how the binary was built (the tests run the binary of their own profile),
/// as the object's last key.
fn check_debug_build(v: &serde_json::Value) {
    assert_eq!(v["debug_build"], cfg!(debug_assertions), "{v}");
    let last = v.as_object().unwrap().keys().next_back().unwrap();
    assert_eq!(last, "debug_build", "{v}");
}

#[test]
fn pingpong_mem_prints_one_json_object() {
    let v = bench_json(&[
        "bench",
        "--transport",
        "mem",
        "--workload",
        "pingpong",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--json",
    ]);
    check_common(&v, "pingpong");
    assert_eq!(v["size_bytes"], 64);
    check_summary(&v["fabric"], "fabric");
    check_summary(&v["baseline"], "baseline");
    assert_eq!(v["baseline"]["name"], "tokio-mpsc");
    for key in ["ratio_p50", "ratio_p99", "ratio_p999"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
}

/// `frames` over `transport`: raw transport frame round trips (no session) beside the fabric's
/// coordination round trips, both measured, the ratios fabric / frames.
fn frames_json(transport: &str) -> serde_json::Value {
    let v = bench_json(&[
        "bench",
        "--transport",
        transport,
        "--workload",
        "frames",
        "--size",
        "256",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--json",
    ]);
    check_common_on(&v, transport, "frames");
    assert_eq!(v["size_bytes"], 256);
    assert_eq!(v["busy_poll"], false);
    assert!(v["devices"].is_null(), "{v}");
    check_summary(&v["fabric"], "fabric");
    check_summary(&v["frames"], "frames");
    assert!(
        v.get("baseline").is_none(),
        "frames has no baseline key: {v}"
    );
    for key in ["ratio_p50", "ratio_p99", "ratio_p999"] {
        let r = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number in {v}"));
        assert!(r.is_finite() && r > 0.0, "{key} in {v}");
    }
    // The session's own frames went over the transport while the fabric was measured.
    assert!(
        v["fabric_stats"]["frames_sent"].as_u64().unwrap() > 0,
        "{v}"
    );
    v
}

#[test]
fn frames_mem_prints_one_json_object() {
    frames_json("mem");
}

#[test]
fn frames_tcp_prints_one_json_object() {
    frames_json("tcp");
}

/// The table names the raw row by its transport and gives the ratios on the fabric's row.
#[test]
fn frames_mem_prints_a_table() {
    let out = agentfabric(&[
        "bench",
        "--transport",
        "mem",
        "--workload",
        "frames",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("] done"), "{stderr}");
    // A debug build (as the tests' own binary, unless they run with --release) says its
    // figures are not meaningful.
    assert_eq!(
        stderr.contains("warning: this agentfabric is a debug build")
            && stderr.contains("--release"),
        cfg!(debug_assertions),
        "{stderr}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("workload=frames size=64 B"), "{table}");
    assert!(table.contains("fabric/frames: p50 "), "{table}");
    assert!(table.contains("\nmem frames "), "{table}");
    check_session_words(&table, "session: ");
}

/// The table gives the session's counters a person reads, in words, after `label`; not the
/// JSON object of all of them.
fn check_session_words(table: &str, label: &str) {
    let line = table
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in\n{table}"));
    for words in [
        "srtt ",
        " µs (min ",
        "cwnd ",
        " retransmits",
        " credit stalls",
        " resumes",
    ] {
        assert!(line.contains(words), "{words:?} missing: {line}");
    }
    assert!(
        !table.contains("fabric_stats") && !table.contains('{'),
        "{table}"
    );
}

/// mixed's table: the session's counters in words for the loaded and fifo phases.
#[test]
fn mixed_mem_prints_a_table() {
    let out = agentfabric(&[
        "bench",
        "--transport",
        "mem",
        "--workload",
        "mixed",
        "--size",
        "65536",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("\nloaded (priorities) "), "{table}");
    check_session_words(&table, "session, loaded: ");
    check_session_words(&table, "session, fifo: ");
}

/// A size the transport cannot carry in one frame is refused with the transport's limit.
#[test]
fn frames_refuses_a_size_beyond_one_frame() {
    let out = agentfabric(&[
        "bench",
        "--transport",
        "mem",
        "--workload",
        "frames",
        "--size",
        "1048577",
        "--duration",
        "0.2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at most 1048576 B in one"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn mixed_mem(bulk_api: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--transport",
        "mem",
        "--workload",
        "mixed",
        "--size",
        "65536",
        "--bulk-api",
        bulk_api,
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--json",
    ];
    args.extend(extra);
    let v = bench_json(&args);
    check_common(&v, "mixed");
    assert_eq!(v["block_bytes"], 65536);
    assert_eq!(v["bulk_api"], bulk_api);
    for phase in ["idle", "loaded", "fifo"] {
        check_summary(&v[phase], phase);
    }
    assert!(v["bulk_mb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["bulk_solo_mb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ratio_loaded_idle_p99"].as_f64().unwrap() > 0.0, "{v}");
    v
}

#[test]
fn mixed_mem_prints_one_json_object() {
    let v = mixed_mem("channel", &[]);
    // Back to back unless asked otherwise.
    assert_eq!(v["coord_interval_us"], 0, "{v}");
}

/// Paced coordination: round trips start at least `--coord-interval-us` apart, so the idle
/// phase's 4 slices of 50 ms hold at most 26 starts each; back to back over mem makes thousands.
#[test]
fn mixed_mem_paces_its_round_trips_when_asked() {
    let v = mixed_mem("channel", &["--coord-interval-us", "2000"]);
    assert_eq!(v["coord_interval_us"], 2000, "{v}");
    let idle = v["idle"]["count"].as_u64().unwrap();
    assert!(
        (1..=4 * 26).contains(&idle),
        "{idle} paced round trips in 200 ms: {v}"
    );
}

/// The bulk load through region writes: bytes land (counted per completed batch) while the
/// coordination round trips run.
#[test]
fn mixed_mem_with_region_transfers_prints_one_json_object() {
    let v = mixed_mem("transfer", &[]);
    assert!(v["fifo_bulk_mb_s"].as_f64().unwrap() > 0.0, "{v}");
}

/// The tcp bulk baseline is the region-sized stream; the one-block stream is reported beside it.
#[test]
fn bulk_tcp_reports_both_raw_streams() {
    let v = bench_json(&[
        "bench",
        "--transport",
        "tcp",
        "--workload",
        "bulk",
        "--block-bytes",
        "65536",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--json",
    ]);
    assert_eq!(v["workload"], "bulk");
    check_debug_build(&v);
    assert!(v["fabric_mb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["baseline"]["name"], "raw-tcp-stream");
    assert!(v["baseline"]["mb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["baseline_hot"]["name"], "raw-tcp-stream-one-block");
    assert!(v["baseline_hot"]["mb_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["direction"], "push");
}

/// `--pull` moves the blocks by region reads.
#[test]
fn bulk_pull_reads_the_blocks() {
    let v = bench_json(&[
        "bench",
        "--transport",
        "mem",
        "--workload",
        "bulk",
        "--block-bytes",
        "65536",
        "--pull",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--json",
    ]);
    assert_eq!(v["direction"], "pull");
    assert!(v["fabric_mb_s"].as_f64().unwrap() > 0.0, "{v}");
}

/// `register` times registrations of reclaimed and fresh buffers; over tcp the regions are
/// registered with its one-sided lane, which keeps nothing across a revocation.
#[test]
fn register_tcp_times_reclaimed_and_fresh_buffers() {
    let v = bench_json(&[
        "bench",
        "--transport",
        "tcp",
        "--workload",
        "register",
        "--size",
        "1048576",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--json",
    ]);
    assert_eq!(v["workload"], "register");
    assert_eq!(v["size_bytes"], 1048576);
    check_summary(&v["fabric"], "fabric");
    check_summary(&v["baseline"], "baseline");
    check_summary(&v["reclaim"], "reclaim");
    assert_eq!(v["fabric"]["count"], v["baseline"]["count"]);
    assert_eq!(v["one_sided"], true);
    assert_eq!(v["kept_registration"], false);
    assert!(v["ratio_p50"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn unknown_transport_exits_2_naming_the_available_ones() {
    let out = agentfabric(&[
        "bench",
        "--transport",
        "carrier-pigeon",
        "--workload",
        "pingpong",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("carrier-pigeon"), "{stderr}");
    assert!(stderr.contains("mem, tcp, quic, verbs"), "{stderr}");
}

/// Outside the lab, verbs fails with a message that says what is missing (no panic, no JSON);
/// in a build without the verbs transport, the message says how to build it in.
#[test]
fn verbs_without_the_lab_says_what_is_missing() {
    for workload in ["pingpong", "frames"] {
        let out = Command::new(env!("CARGO_BIN_EXE_agentfabric"))
            .args([
                "bench",
                "--transport",
                "verbs",
                "--workload",
                workload,
                "--json",
            ])
            .env_remove("AGENTFABRIC_LAB_ADDR_A")
            .output()
            .expect("run agentfabric");
        assert_eq!(out.status.code(), Some(1), "{workload}");
        assert!(out.stdout.is_empty(), "{workload}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let missing = if cfg!(feature = "verbs") {
            "AGENTFABRIC_LAB_ADDR_A"
        } else {
            "the verbs transport is not in this build: build agentfabric with the `verbs` feature"
        };
        assert!(stderr.contains(missing), "{workload}: {stderr}");
        // A failed run does not say it is done.
        assert!(!stderr.contains("] done"), "{workload}: {stderr}");
        if !cfg!(feature = "verbs") {
            assert!(
                stderr.contains("libibverbs-dev librdmacm-dev libclang-dev"),
                "{stderr}"
            );
        }
    }
}

/// An option the chosen workload or transport does not use is refused, not ignored (the run
/// would not measure what was asked), and the error names the option and where it applies.
#[test]
fn options_that_do_not_apply_are_refused() {
    for (transport, workload, extra, expect) in [
        (
            "tcp",
            "pingpong",
            &["--busy-poll"][..],
            "--busy-poll applies to the verbs transport only",
        ),
        (
            "mem",
            "mixed",
            &["--spin-us", "100"][..],
            "--spin-us applies to the verbs transport only",
        ),
        (
            "mem",
            "pingpong",
            &["--bulk-api", "transfer"][..],
            "--bulk-api applies to the mixed workload only",
        ),
        (
            "mem",
            "mixed",
            &["--block-bytes", "65536"][..],
            "--block-bytes applies to the bulk workload (mixed takes --size) only",
        ),
        (
            "mem",
            "pingpong",
            &["--coord-interval-us", "100"][..],
            "--coord-interval-us applies to the mixed workload only",
        ),
        (
            "tcp",
            "mixed",
            &["--pull"][..],
            "--pull applies to the bulk workload only",
        ),
        (
            "tcp",
            "bulk",
            &["--perftest", "/nonexistent"][..],
            "--perftest applies to the verbs transport only",
        ),
        (
            "tcp",
            "bulk",
            &["--devices", "rxe0,rxe1:rxe1,rxe0"][..],
            "--devices applies to the verbs transport only",
        ),
    ] {
        let mut args = vec!["bench", "--transport", transport, "--workload", workload];
        args.extend(extra);
        let out = agentfabric(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

#[test]
fn bad_numbers_are_refused_without_a_panic() {
    for args in [
        ["--duration", "-1"],
        ["--duration", "1e300"],
        ["--size", "0"],
        ["--warmup", "nan"],
        ["--threads", "0"],
        ["--devices", "rxe0"],
        ["--devices", "rxe0,:rxe1"],
    ] {
        let mut all = vec!["bench", "--transport", "mem", "--workload", "pingpong"];
        all.extend(args);
        let out = agentfabric(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn info_lists_the_transports_and_says_whether_verbs_is_usable() {
    let out = agentfabric(&["info"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for t in ["mem", "tcp", "quic", "verbs"] {
        assert!(text.contains(&format!("  {t} ")), "{text}");
    }
    // The tcp transport's lanes, all three.
    assert!(
        text.contains("  tcp    three lanes per connection (latency, bulk, one-sided)"),
        "{text}"
    );
    if cfg!(feature = "verbs") {
        // Either devices are listed, or it says plainly why verbs cannot be used here.
        assert!(
            text.contains("verbs  available") || text.contains("verbs  not available"),
            "{text}"
        );
    } else {
        // Not built in: how to get it.
        assert!(text.contains("verbs  not in this build"), "{text}");
        assert!(text.contains("`verbs` feature"), "{text}");
        assert!(
            text.contains("libibverbs-dev librdmacm-dev libclang-dev"),
            "{text}"
        );
    }
}

/// `certs dev` on a directory it wrote before issues from the CA there (the nodes of both runs
/// trust each other; `agentfabric-quic`'s tests connect them), and refuses to replace a node's
/// files without `--force`, or to work with half a CA.
#[test]
fn certs_dev_keeps_the_ca_and_replaces_a_node_only_with_force() {
    let dir = std::env::temp_dir().join(format!("af-cli-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();

    let out = agentfabric(&["certs", "dev", d, "alpha"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("new development CA"), "{stderr}");
    let (ca_pem, ca_key, alpha) = (read("ca.pem"), read("ca.key"), read("alpha.pem"));

    // A second run: the same CA, a new node.
    let out = agentfabric(&["certs", "dev", d, "beta"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("kept the existing CA"), "{stderr}");
    assert_eq!(read("ca.pem"), ca_pem);
    assert_eq!(read("ca.key"), ca_key);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("beta.pem") && stdout.contains("beta.key"),
        "{stdout}"
    );

    // An existing node: refused, naming the file and the flag; nothing changes.
    let out = agentfabric(&["certs", "dev", d, "gamma", "alpha"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}", dir.join("alpha.pem").display()))
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(read("alpha.pem"), alpha);
    assert!(!dir.join("gamma.pem").exists());

    // With --force: a new certificate for alpha, still from the same CA.
    let out = agentfabric(&["certs", "dev", "--force", d, "alpha"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(read("alpha.pem"), alpha);
    assert_eq!(read("ca.pem"), ca_pem);

    // Half a CA is an error that names the missing half.
    std::fs::remove_file(dir.join("ca.key")).unwrap();
    let out = agentfabric(&["certs", "dev", d, "gamma"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca.key is missing"), "{stderr}");
    assert!(!dir.join("gamma.pem").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
