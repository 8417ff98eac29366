//! The Markdown report: setup, targets, one table per workload, lost updates.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::{Machine, Measurement, Results, Workload, CASES, WORKLOADS};

pub(crate) const SECTION: &str = "## HTTP comparison";

fn find<'a>(results: &'a Results, case: &str, workload: Workload) -> Option<&'a Measurement> {
    let index = CASES.iter().position(|candidate| candidate.id == case)?;
    results
        .measurements
        .iter()
        .find(|m| m.case == index && m.workload == workload)
}

fn rps(m: &Measurement) -> f64 {
    m.wrk.requests_per_second()
}

/// Thousands separated with a thin comma: 41,234.
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The bare-axum case with the same topology.
fn bare_of(processes: usize) -> &'static str {
    if processes == 1 {
        "1a"
    } else {
        "1b"
    }
}

struct Target {
    what: &'static str,
    want: f64,
    /// (measured ratio, how it was computed)
    got: Option<(f64, String)>,
}

fn ratio_target(
    results: &Results,
    what: &'static str,
    want: f64,
    (case, workload): (&str, Workload),
    (base_case, base_workload): (&str, Workload),
) -> Target {
    let got = find(results, case, workload)
        .zip(find(results, base_case, base_workload))
        .map(|(m, base)| {
            (
                rps(m) / rps(base),
                format!("{} / {} req/s", thousands(rps(m)), thousands(rps(base))),
            )
        });
    Target { what, want, got }
}

fn targets(results: &Results) -> Vec<Target> {
    use Workload::{Counter, Hot};
    let p99 = find(results, "2", Counter)
        .zip(find(results, "4", Counter))
        .map(|(m, base)| {
            // Met when ≤ 1: mmap-session's p99 over the memory store's.
            (
                base.wrk.p99_us as f64 / m.wrk.p99_us.max(1) as f64,
                format!("p99 {} ms vs {} ms", ms(m.wrk.p99_us), ms(base.wrk.p99_us)),
            )
        });
    vec![
        ratio_target(
            results,
            "counter, 1 process: mmap-session ≥ 0.9× bare axum",
            0.9,
            ("2", Counter),
            ("1a", Counter),
        ),
        ratio_target(
            results,
            "counter, 1 process: mmap-session ≥ 1.5× tower-sessions MemoryStore",
            1.5,
            ("2", Counter),
            ("4", Counter),
        ),
        Target {
            what: "counter, 1 process: mmap-session p99 no worse than MemoryStore's",
            want: 1.0,
            got: p99,
        },
        ratio_target(
            results,
            "counter, 3 processes + nginx: mmap-session ≥ 0.9× bare axum behind the same nginx",
            0.9,
            ("3", Counter),
            ("1b", Counter),
        ),
        ratio_target(
            results,
            "counter, 3 processes + nginx: mmap-session ≥ 2× tower-sessions + Redis",
            2.0,
            ("3", Counter),
            ("5", Counter),
        ),
        ratio_target(
            results,
            "counter, 3 processes + nginx: mmap-session ≥ 5× tower-sessions + SQLite",
            5.0,
            ("3", Counter),
            ("6", Counter),
        ),
        ratio_target(
            results,
            "hot session, 1 process: mmap-session ≥ 0.5× its distinct-session req/s",
            0.5,
            ("2", Hot),
            ("2", Counter),
        ),
        ratio_target(
            results,
            "hot session, 3 processes + nginx: mmap-session ≥ 0.5× its distinct-session req/s",
            0.5,
            ("3", Hot),
            ("3", Counter),
        ),
    ]
}

/// A report's heading, the command that produced it, and the machine and run (`tools`: the
/// versions of the tools it used).
pub(crate) fn preamble(md: &mut String, heading: &str, command: &str, m: &Machine, tools: &str) {
    let _ = writeln!(md, "{heading}\n");
    let _ = writeln!(
        md,
        "Written by the benchmark runner ([`bench/`](bench/README.md)); do not edit by hand. Command:\n\n```sh\n{command}\n```\n"
    );
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), Linux {}, {}; run on {} and took {:.1} min, servers built from commit {}. Load average (1, 5, 15 min) before: {}, after: {}. {tools}.\n",
        m.nproc, m.cpu, m.kernel, m.rustc, m.date, m.minutes, m.commit, m.load_before, m.load_after
    );
}

/// The report; `chart` is the chart's path relative to where the Markdown will live.
pub(crate) fn markdown(results: &Results, chart: &str) -> String {
    let mut md = String::new();
    let m = &results.machine;
    preamble(
        &mut md,
        SECTION,
        &results.command,
        m,
        &format!("{}, {}, {}", m.nginx, m.redis, m.wrk),
    );
    let _ = writeln!(
        md,
        "Every case runs the same two handlers (`bench/src/bin/bench-server.rs`, generic over the session type): \
`GET /` reads a counter from the session, adds one and writes it back (a new session starts at 1; in the 16 KiB workload \
a new session also gets a 16 KiB string); `GET /peek` only reads it (mmap-session: `ReadOnlySession`; tower-sessions has no \
read-only handle, so it uses its `Session`, which saves nothing unchanged). Bare axum runs the handlers over an always-empty session. \
All cases' servers run side by side (idle ones cost nothing) and each workload is run against every case back to back, \
so a change of load on the machine moves a workload's cases together; each workload is run over all cases {} times (rounds), and \
each cell shows the round with the median req/s (its p50 and p99), the range of req/s over the rounds, and CPU per request over \
all rounds. Load: `wrk -t{} -c{} -d{}s --latency` (a {}s warm-up before a case's first round), a Lua script picking each request's cookie at random from a file of \
sessions created through HTTP beforehand (by the process under test for the 1-process cases, through nginx for the others). \
nginx: `worker_processes {}`, upstream `keepalive 64`, `proxy_http_version 1.1`, `Connection \"\"`, `keepalive_requests 1000000`. \
Redis 7 and SQLite pools: 4 connections per process; SQLite `journal_mode=WAL`, `synchronous=NORMAL`, file in /tmp like mmap-session's. \
Versions: tower-sessions 0.15 for the MemoryStore case; tower-sessions 0.14 for Redis and SQLite, because the newest \
tower-sessions-redis-store (0.16, fred 10) and tower-sessions-sqlx-store (0.15, sqlx 0.8) are built on tower-sessions-core 0.14 \
and do not compile against 0.15 (both versions are linked side by side through cargo package renaming). \
Server CPU is utime+stime from `/proc/<pid>/stat` of the server processes (and nginx master and workers, and redis-server) \
around the measured run, divided by the requests wrk completed; wrk's own CPU is not in it. On a 2-core machine wrk, nginx and the \
servers share the cores, so req/s measures the whole system; CPU per request is the fairer measure of the server's own cost.\n",
        results.rounds,
        results.cli.threads,
        results.cli.connections,
        results.duration_s,
        results.warmup_s,
        results.cli.nginx_workers,
    );
    let _ = writeln!(
        md,
        "![requests per second and server CPU per request]({chart})\n"
    );

    let _ = writeln!(md, "### Targets\n");
    let _ = writeln!(
        md,
        "| target | measured | ratio | met |\n|---|---|---:|---|"
    );
    for target in targets(results) {
        match &target.got {
            Some((ratio, how)) => {
                let met = if *ratio >= target.want {
                    "**met**"
                } else {
                    "**missed**"
                };
                let _ = writeln!(md, "| {} | {how} | {ratio:.2}× | {met} |", target.what);
            }
            None => {
                let _ = writeln!(md, "| {} | not measured | | |", target.what);
            }
        }
    }
    let _ = writeln!(md);

    for workload in WORKLOADS {
        let _ = writeln!(
            md,
            "### {}\n",
            capitalise(&workload.title(results.sessions, results.large_sessions))
        );
        let _ = writeln!(
            md,
            "| case | req/s (median) | req/s range | p50 ms | p99 ms | server CPU µs/req (app + nginx/redis) | × bare axum (same topology) | × case 4 (ts MemoryStore) | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (index, case) in CASES.iter().enumerate() {
            let Some(m) = results
                .measurements
                .iter()
                .find(|m| m.case == index && m.workload == workload)
            else {
                continue;
            };
            let versus = |base: &str| {
                find(results, base, workload)
                    .map(|base| format!("{:.2}", rps(m) / rps(base)))
                    .unwrap_or_default()
            };
            let cpu = if m.cpu_aux_us > 0.0 {
                format!(
                    "{:.1} ({:.1} + {:.1})",
                    m.cpu_app_us + m.cpu_aux_us,
                    m.cpu_app_us,
                    m.cpu_aux_us
                )
            } else {
                format!("{:.1}", m.cpu_app_us)
            };
            let _ = writeln!(
                md,
                "| {} {} | {} | {} | {} | {} | {cpu} | {} | {} | {} |",
                case.id,
                case.label,
                thousands(rps(m)),
                range(&m.rounds_rps),
                ms(m.wrk.p50_us),
                ms(m.wrk.p99_us),
                versus(bare_of(case.processes)),
                versus("4"),
                m.wrk.status_errors + m.wrk.socket_errors,
            );
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(
        md,
        "### Lost updates: {} connections increment one session for {} s\n",
        results.cli.connections, results.cli.lost_duration
    );
    let _ = writeln!(
        md,
        "| case | success responses (wrk) | increments applied (peek after − before) | lost | errors |\n|---|---:|---:|---:|---:|"
    );
    for lost in &results.lost {
        let Some(case) = CASES.get(lost.case) else {
            continue;
        };
        let difference = lost.ok as i64 - lost.applied as i64;
        let shown = if difference > 0 {
            format!(
                "**{difference}** ({:.1}%)",
                100.0 * difference as f64 / lost.ok.max(1) as f64
            )
        } else {
            "0".to_owned()
        };
        let _ = writeln!(
            md,
            "| {} {} | {} | {} | {shown} | {} |",
            case.id, case.label, lost.ok, lost.applied, lost.status_errors
        );
    }
    let _ = writeln!(
        md,
        "\nBare axum has no session, so nothing to lose. wrk counts only the responses it received before its deadline; a request \
in flight then may still be applied by the server, so \"applied\" can exceed \"success responses\" by up to {} (shown as 0 lost).\n",
        results.cli.connections
    );
    md
}

/// `41k–45k` over the rounds (one round: empty).
pub(crate) fn range(rounds: &[f64]) -> String {
    match (rounds.first(), rounds.last()) {
        (Some(low), Some(high)) if rounds.len() > 1 => {
            format!("{:.1}k–{:.1}k", low / 1000.0, high / 1000.0)
        }
        _ => String::new(),
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().collect::<String>() + chars.as_str())
        .unwrap_or_default()
}

/// Replaces the "HTTP comparison" section of BENCHMARKS.md (from its heading to the next level-2
/// heading), or appends it; other sections are left as they are.
pub(crate) fn update_benchmarks_md(path: &Path, section: &str) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = old.lines().collect();
    let start = lines.iter().position(|line| line.trim_end() == SECTION);
    let mut new = String::new();
    match start {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|line| line.starts_with("## "))
                .map_or(lines.len(), |offset| start + 1 + offset);
            for line in &lines[..start] {
                new.push_str(line);
                new.push('\n');
            }
            new.push_str(section.trim_end());
            new.push_str("\n\n");
            for line in &lines[end..] {
                new.push_str(line);
                new.push('\n');
            }
        }
        None => {
            new.push_str(old.trim_end());
            new.push_str("\n\n");
            new.push_str(section.trim_end());
            new.push('\n');
        }
    }
    std::fs::write(path, new.trim_end().to_owned() + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}
