//! The report of a round-trip workload (`pingpong`, `frames`): the fabric's round trips against
//! another side's, as JSON (`bench/JSON.md`) and as a table, with the session's counters.

use serde_json::json;

use crate::devices::Devices;
use crate::pair::fabric_stats_words;
use crate::report::{fmt_ratio, ratio, Output, Summary, Table};
use crate::settings::Settings;

/// What the fabric's round trips are measured against.
pub struct Against<'a> {
    /// Its JSON key (`baseline`, `frames`), also the ratio's name in the table.
    pub key: &'a str,
    /// The `"name"` its JSON summary starts with, if any.
    pub json_name: Option<&'a str>,
    /// Its row's label in the table.
    pub label: String,
    /// The note beside its row.
    pub note: &'a str,
    /// Its round trips; `None` when not measured (the JSON's value and the ratios are null).
    pub summary: Option<Summary>,
}

/// The JSON object and the table of one run of `workload`.
pub fn report(
    s: &Settings,
    workload: &str,
    fabric: Summary,
    against: Against<'_>,
    fabric_stats: serde_json::Value,
) -> Output {
    let r = |f: fn(&Summary) -> f64| against.summary.and_then(|b| ratio(f(&fabric), f(&b)));
    let (r50, r99, r999) = (r(|x| x.p50_us), r(|x| x.p99_us), r(|x| x.p999_us));
    let mut json = json!({
        "transport": s.transport.name(),
        "workload": workload,
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
        "version": env!("CARGO_PKG_VERSION"),
        "fabric": fabric.to_json(None),
    });
    let tail = json!({
        against.key: against.summary.map(|b| b.to_json(against.json_name)),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "ratio_p999": r999,
        "fabric_stats": fabric_stats,
    });
    if let (Some(head), serde_json::Value::Object(tail)) = (json.as_object_mut(), tail) {
        head.extend(tail);
    }

    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload={workload} size={} B duration={:.2} s \
         warmup={:.2} s threads={}",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        s.size,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.threads
    ));
    let ratios = format!(
        "fabric/{}: p50 {} p99 {} p99.9 {}",
        against.key,
        fmt_ratio(r50),
        fmt_ratio(r99),
        fmt_ratio(r999)
    );
    t.row("fabric", &fabric, &ratios);
    match &against.summary {
        Some(b) => t.row(&against.label, b, against.note),
        None => t.line(&format!("{}: not given", against.label)),
    }
    t.line(&format!(
        "session: {}",
        fabric_stats_words(&json["fabric_stats"])
    ));
    Output {
        json,
        table: t.finish(),
    }
}
