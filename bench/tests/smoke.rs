//! The harness cannot rot: `ppu-bench --smoke` (tiny sizes) must run every figure against the
//! real daemon and print each as a well-formed line. No timing is asserted — figures belong in
//! docs/BENCHMARKS.md, not in pass/fail tests.

use std::collections::HashMap;
use std::process::Command;

/// A parsed figure line: `NAME VALUE UNIT key=value ...`.
#[derive(Debug)]
struct Line {
    name: String,
    value: f64,
    params: HashMap<String, String>,
}

fn parse(line: &str) -> Result<Line, String> {
    let mut words = line.split_whitespace();
    let name = words.next().ok_or("empty line")?.to_owned();
    let value: f64 = words
        .next()
        .ok_or("no value")?
        .parse()
        .map_err(|e| format!("value: {e}"))?;
    let unit = words.next().ok_or("no unit")?;
    if unit.contains('=') {
        return Err(format!("unit {unit:?} looks like a parameter"));
    }
    let mut params = HashMap::new();
    for kv in words {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("parameter {kv:?} is not key=value"))?;
        params.insert(k.to_owned(), v.to_owned());
    }
    Ok(Line {
        name,
        value,
        params,
    })
}

#[test]
fn smoke_run_prints_every_figure() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ppu-bench"))
        .arg("--smoke")
        .arg("--work-dir")
        .arg(work.path())
        .output()
        .expect("run ppu-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ppu-bench --smoke failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Line> = stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| parse(l).unwrap_or_else(|e| panic!("malformed figure line {l:?}: {e}")))
        .collect();
    for l in &lines {
        assert!(
            l.value.is_finite() && l.value >= 0.0,
            "{} measured nothing: {l:?}",
            l.name
        );
    }
    let has = |name: &str, key: Option<(&str, &str)>| {
        lines.iter().any(|l| {
            l.name == name
                && key.is_none_or(|(k, v)| l.params.get(k).map(String::as_str) == Some(v))
        })
    };
    let mut expected: Vec<(&str, Option<(&str, &str)>)> = Vec::new();
    for b in ["1", "100", "1000"] {
        expected.push(("submit.throughput", Some(("batch", b))));
    }
    expected.push(("submit.single_p50", Some(("batch", "1"))));
    expected.push(("submit.concurrent", Some(("clients", "16"))));
    for s in ["1", "10", "100"] {
        expected.push(("events.latency_p50", Some(("subscribers", s))));
        expected.push(("events.latency_p99", Some(("subscribers", s))));
    }
    expected.extend([
        ("driver.read_overhead", None),
        ("driver.status_overhead", None),
        ("scale.rss", None),
        ("scale.rss_after_log_read", None),
        ("scale.list_first_page", None),
        ("startup.daemon_start", None),
        ("campaign.wall_time", Some(("time_scale", "100000"))),
        ("memory.idle_rss", None),
        ("memory.cancel_burst", None),
        ("memory.stream_burst", Some(("round", "1"))),
    ]);
    // The fleet figures need nats-server; without it the section says so and is skipped.
    let fleet = !stdout.contains("fleet: skipped");
    if fleet {
        for n in ["1", "2", "3"] {
            expected.push(("fleet.campaign", Some(("labs", n))));
        }
        for n in ["2", "3"] {
            expected.push(("fleet.throughput_ratio", Some(("labs", n))));
        }
        expected.extend([
            ("fleet.direct_first_event_p50", None),
            ("fleet.first_event_p50", None),
            ("fleet.first_event_p99", None),
        ]);
    }
    let missing: Vec<_> = expected.iter().filter(|(n, k)| !has(n, *k)).collect();
    assert!(
        missing.is_empty(),
        "figures missing: {missing:?}\nstdout:\n{stdout}"
    );
    assert_eq!(
        lines.len(),
        expected.len(),
        "unexpected extra lines:\n{stdout}"
    );

    // Every figure prints its bare baseline (or the run's own reference) from the same run.
    let baselines: [(&str, &[&str]); 15] = [
        ("submit.throughput", &["bare_redb_rows_per_s", "vs_bare"]),
        (
            "submit.single_p50",
            &["bare_commit_p50_ms", "bare_grpc_rtt_p50_ms", "bare_p50_ms"],
        ),
        ("submit.concurrent", &["bare_redb_rows_per_s", "vs_bare"]),
        ("events.latency_p50", &["bare_p50_ms", "log_fallbacks"]),
        (
            "events.latency_p99",
            &["bare_p99_ms", "commit_p99_ms", "log_fallbacks"],
        ),
        ("driver.read_overhead", &["bare_p50_us"]),
        ("scale.rss", &["baseline_mb"]),
        ("scale.rss_after_log_read", &["baseline_mb"]),
        ("scale.list_first_page", &["baseline_p50_ms"]),
        ("startup.daemon_start", &["store_open_ms", "baseline_ms"]),
        ("campaign.wall_time", &["physics_floor_s", "busiest_pct"]),
        ("memory.idle_rss", &["bare_grpc_process_mb"]),
        (
            "fleet.throughput_ratio",
            &["base_exp_per_s", "exactly_once"],
        ),
        ("fleet.first_event_p50", &["direct_p50_ms", "vs_direct"]),
        ("fleet.first_event_p99", &["direct_p99_ms", "vs_direct"]),
    ];
    for (name, keys) in baselines {
        for l in lines.iter().filter(|l| l.name == name) {
            for k in keys {
                assert!(l.params.contains_key(*k), "{name} lacks {k}: {l:?}");
            }
        }
    }
    // The goals the issue sets are on their lines, each with a verdict.
    let mut goals = vec![
        ("submit.throughput", Some(("batch", "1000"))),
        ("submit.single_p50", None),
        ("submit.concurrent", None),
        ("events.latency_p99", Some(("subscribers", "10"))),
        ("events.latency_p99", Some(("subscribers", "100"))),
        ("scale.rss", None),
        ("scale.rss_after_log_read", None),
        ("startup.daemon_start", None),
        ("campaign.wall_time", None),
    ];
    if fleet {
        goals.push(("fleet.throughput_ratio", Some(("labs", "2"))));
        goals.push(("fleet.throughput_ratio", Some(("labs", "3"))));
    }
    for (name, key) in goals {
        let l = lines
            .iter()
            .find(|l| {
                l.name == name
                    && key.is_none_or(|(k, v)| l.params.get(k).map(String::as_str) == Some(v))
            })
            .unwrap_or_else(|| panic!("{name} {key:?} missing"));
        assert!(
            l.params.contains_key("target"),
            "{name} has no target: {l:?}"
        );
        assert!(
            matches!(l.params.get("met").map(String::as_str), Some("yes" | "NO")),
            "{name} has no verdict: {l:?}"
        );
    }
    // The campaign says how many of its experiments succeeded, out of how many.
    let campaign = lines
        .iter()
        .find(|l| l.name == "campaign.wall_time")
        .expect("campaign line");
    let succeeded = campaign.params.get("succeeded").expect("succeeded=");
    let (ok, all) = succeeded.split_once('/').expect("succeeded=N/M");
    assert!(
        ok.parse::<usize>().is_ok()
            && all.parse::<usize>().ok()
                == campaign
                    .params
                    .get("experiments")
                    .and_then(|n| n.parse().ok()),
        "succeeded={succeeded} is not N/experiments"
    );
    // Whatever the timing, every fleet experiment ran exactly once across the labs.
    for l in lines.iter().filter(|l| l.name == "fleet.campaign") {
        assert_eq!(
            l.params.get("exactly_once").map(String::as_str),
            Some("true"),
            "{l:?}"
        );
    }
}

#[test]
fn the_parser_rejects_malformed_lines() {
    assert!(parse("submit.throughput 12.5 exp/s batch=1").is_ok());
    assert!(parse("submit.throughput fast exp/s").is_err());
    assert!(parse("submit.throughput 12.5 batch=1").is_err());
    assert!(parse("submit.throughput 12.5 exp/s batch").is_err());
}
