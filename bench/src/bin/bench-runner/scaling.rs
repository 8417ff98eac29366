//! `--scaling`: how the cost of a request grows with the size of the session and with the number
//! of stored sessions. The read-modify-write counter (`GET /`) over
//!
//! - sessions that hold a string of 128 B to 64 KiB (the server's `--large-bytes`), a fresh set of
//!   servers for each size, and
//! - 1 to 1,000,000 small sessions, created one batch after the other in the same servers: the
//!   sessions of one step are those of the step before and some more, and every request picks one
//!   of them at random.
//!
//! After each measured workload the servers' resident memory and mmap-session's store file are
//! read. Everything else (processes, wrk, the CPU time from /proc, rounds and medians) is the
//! comparison's own code.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::chart::{self, Panel, Series};
use crate::report::{ms, preamble, range, thousands};
use crate::{
    machine, new_cookies, procs, stop, Bench, Case, Cli, Machine, Measurement, Running, Workload,
    CASES,
};

/// Bare axum (the floor), mmap-session and tower-sessions' MemoryStore, each in 1 process.
pub(crate) const DEFAULT_CASES: [&str; 3] = ["1a", "2", "4"];

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Axis {
    /// The session's payload in bytes.
    Size,
    /// The number of stored sessions.
    Sessions,
}

/// One case at one step of a sweep.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Point {
    pub(crate) axis: Axis,
    /// Payload bytes or number of sessions, after `axis`.
    pub(crate) value: usize,
    pub(crate) measurement: Measurement,
    /// `VmRSS` of the server after the run, bytes.
    pub(crate) rss: u64,
    /// Of which file-backed (`RssFile`: mmap-session's mapping of the store file).
    pub(crate) rss_file: u64,
    /// The store file's `st_blocks * 512` and `st_size` (mmap-session only).
    pub(crate) store_disk: Option<(u64, u64)>,
}

/// How long creating a step's new sessions through HTTP took.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Creation {
    pub(crate) case: usize,
    pub(crate) sessions: usize,
    pub(crate) created: usize,
    pub(crate) seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ScalingResults {
    pub(crate) cli: Cli,
    pub(crate) command: String,
    pub(crate) cases: Vec<Case>,
    pub(crate) points: Vec<Point>,
    pub(crate) creation: Vec<Creation>,
    pub(crate) machine: Machine,
}

impl ScalingResults {
    /// The cases that have points, with their index in `CASES`.
    fn cases_run(&self) -> Vec<(usize, &'static Case)> {
        CASES
            .iter()
            .enumerate()
            .filter(|(index, _)| self.points.iter().any(|p| p.measurement.case == *index))
            .collect()
    }
}

/// The points of the workload just measured (one per case, the last ones `run_workload` added),
/// with the servers' memory and the store file as they are now.
fn take_points(
    bench: &mut Bench<'_>,
    running: &[Running],
    axis: Axis,
    value: usize,
) -> Result<Vec<Point>> {
    let first = bench.measurements.len() - running.len();
    bench
        .measurements
        .drain(first..)
        .map(|measurement| {
            let run = running
                .iter()
                .find(|run| run.index == measurement.case)
                .context("a measurement of a case that is not running")?;
            let (mut rss, mut rss_file) = (0, 0);
            for pid in run.cluster.pids().app {
                let (all, file) = procs::rss(pid)?;
                rss += all;
                rss_file += file;
            }
            let store_disk = std::fs::metadata(&run.cluster.store)
                .ok()
                .map(|meta| (meta.blocks() * 512, meta.size()));
            Ok(Point {
                axis,
                value,
                measurement,
                rss,
                rss_file,
                store_disk,
            })
        })
        .collect()
}

fn run_sweeps(
    bench: &mut Bench<'_>,
    cases: &[(usize, &Case)],
    cli: &Cli,
) -> Result<(Vec<Point>, Vec<Creation>)> {
    let mut points = Vec::new();
    let mut creation = Vec::new();
    for &size in &cli.scale_sizes {
        bench.log(&format!("size sweep: {size} B sessions"));
        let mut running = bench.start_all(
            cases,
            &format!("size-{size}"),
            Some(size),
            cli.scale_size_sessions,
        )?;
        bench.run_workload(&mut running, Workload::Counter)?;
        points.extend(take_points(bench, &running, Axis::Size, size)?);
        stop(running);
    }

    let mut counts = cli.scale_counts.clone();
    counts.sort_unstable();
    counts.dedup();
    // No distinct sessions yet: the one "hot" session start_all creates is the first of the list.
    let mut running = bench.start_all(cases, "count", None, 0)?;
    let mut cookies = running
        .iter()
        .map(|run| {
            Ok(std::fs::read_to_string(&run.hot)?
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>())
        })
        .collect::<Result<Vec<_>>>()?;
    for &count in &counts {
        for (run, cookies) in running.iter_mut().zip(&mut cookies) {
            let more = count.saturating_sub(cookies.len());
            let started = Instant::now();
            cookies.extend(new_cookies(
                run.case.backend,
                &run.cluster,
                cookies.len(),
                more,
            )?);
            let seconds = started.elapsed().as_secs_f64();
            bench.log(&format!(
                "case {}: {more} sessions created in {seconds:.1}s ({} in all)",
                run.case.id,
                cookies.len()
            ));
            creation.push(Creation {
                case: run.index,
                sessions: count,
                created: more,
                seconds,
            });
            run.many = bench.write_cookies(&format!("count-{}.txt", run.case.id), cookies)?;
        }
        bench.log(&format!("count sweep: {count} sessions"));
        bench.run_workload(&mut running, Workload::Counter)?;
        points.extend(take_points(bench, &running, Axis::Sessions, count)?);
    }
    stop(running);
    Ok((points, creation))
}

/// Runs both sweeps and writes `scaling.md`, `scaling.json` and `scaling.svg` to `--out`.
pub(crate) fn run(
    bench: &mut Bench<'_>,
    cases: &[(usize, &Case)],
    cli: &Cli,
    load_before: String,
) -> Result<()> {
    let (points, creation) = run_sweeps(bench, cases, cli)?;
    let results = ScalingResults {
        command: format!(
            "cargo run --release --manifest-path bench/Cargo.toml --bin bench-runner -- {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        cases: CASES.to_vec(),
        points,
        creation,
        machine: machine(cli, load_before, bench.started),
        cli: cli.clone(),
    };
    std::fs::create_dir_all(&cli.out)?;
    let markdown = markdown(&results, "scaling.svg");
    std::fs::write(cli.out.join("scaling.md"), &markdown)?;
    std::fs::write(
        cli.out.join("scaling.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(cli.out.join("scaling.svg"), svg(&results))?;
    eprintln!(
        "wrote {}/scaling.md, scaling.json, scaling.svg",
        cli.out.display()
    );
    println!("{markdown}");
    Ok(())
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Bytes per session, or nothing for a step without sessions to divide by.
fn per_session(bytes: u64, sessions: usize) -> String {
    if sessions == 0 {
        String::new()
    } else {
        format!("{:.0}", bytes as f64 / sessions as f64)
    }
}

fn table(md: &mut String, results: &ScalingResults, axis: Axis, first: &str) {
    let _ = writeln!(
        md,
        "| case | {first} | req/s (median) | req/s range | p50 ms | p99 ms | server CPU µs/req | server RSS MiB (of which file) | store file on disk MiB (st_size) | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut points: Vec<&Point> = results.points.iter().filter(|p| p.axis == axis).collect();
    points.sort_by_key(|p| (p.measurement.case, p.value));
    for p in points {
        let m = &p.measurement;
        let label = match axis {
            Axis::Size => size_label(p.value),
            Axis::Sessions => thousands(p.value as f64),
        };
        let disk = p.store_disk.map_or(String::new(), |(disk, size)| {
            format!("{} ({})", mib(disk), mib(size))
        });
        let _ = writeln!(
            md,
            "| {} {} | {label} | {} | {} | {} | {} | {:.1} | {} ({}) | {disk} | {} |",
            CASES[m.case].id,
            CASES[m.case].label,
            thousands(m.wrk.requests_per_second()),
            range(&m.rounds_rps),
            ms(m.wrk.p50_us),
            ms(m.wrk.p99_us),
            m.cpu_app_us + m.cpu_aux_us,
            mib(p.rss),
            mib(p.rss_file),
            m.wrk.status_errors + m.wrk.socket_errors,
        );
    }
}

/// The report of a scaling run; `chart` is the chart's path relative to where it will live.
pub(crate) fn markdown(results: &ScalingResults, chart: &str) -> String {
    let m = &results.machine;
    let mut md = String::new();
    preamble(&mut md, "## HTTP scaling", &results.command, m, &m.wrk);
    let _ = writeln!(
        md,
        "Each case is 1 server process; every request is the read-modify-write counter (`GET /`) with a cookie picked at random \
from the sessions of the step. Load: `wrk -t{} -c{} -d{}s --latency`, a {}s warm-up before a case's first round, {} round(s) \
interleaved over the cases, the round with the median req/s shown (its p50 and p99), CPU per request over all rounds \
(utime+stime of the server from `/proc/<pid>/stat`). RSS is `VmRSS` of the server after the step, \"of which file\" its `RssFile` \
(for mmap-session: the resident pages of the store file it has mapped); the store file is read with `stat` after the step.\n",
        results.cli.threads,
        results.cli.connections,
        results.cli.duration().as_secs(),
        results.cli.warmup().as_secs(),
        results.cli.rounds(),
    );
    let _ = writeln!(
        md,
        "![server CPU per request by session size and by number of sessions]({chart})\n"
    );
    let _ = writeln!(
        md,
        "### By session size: {} distinct sessions, each holding a string of the size shown and the counter\n\nA fresh set of servers for each size; the sessions are created through HTTP before the runs.\n",
        results.cli.scale_size_sessions
    );
    table(&mut md, results, Axis::Size, "payload");
    let _ = writeln!(
        md,
        "\n### By number of stored sessions: small sessions (the counter only)\n\nThe same servers for every step; each step creates the sessions it adds through HTTP (8 client connections, `GET /` without a cookie) and then measures. With 1 session every connection uses the same session.\n"
    );
    table(&mut md, results, Axis::Sessions, "sessions");
    let _ = writeln!(
        md,
        "\nSessions created through HTTP before each step:\n\n| case | sessions after the step | created | seconds | sessions/s |\n|---|---:|---:|---:|---:|"
    );
    for c in &results.creation {
        if c.created == 0 || CASES[c.case].backend == crate::cluster::Backend::None {
            continue;
        }
        let _ = writeln!(
            md,
            "| {} {} | {} | {} | {:.1} | {} |",
            CASES[c.case].id,
            CASES[c.case].label,
            thousands(c.sessions as f64),
            thousands(c.created as f64),
            c.seconds,
            thousands(c.created as f64 / c.seconds.max(1e-9)),
        );
    }
    let _ = writeln!(
        md,
        "\nMemory and disk per stored session: the total after the step divided by the sessions, and the growth since the \
1-session step divided by the sessions added (which leaves out what the process and an empty store take anyway):\n\n\
| case | sessions | server RSS MiB | RSS bytes/session | RSS growth bytes/added session | store file on disk MiB | disk bytes/session | disk growth bytes/added session |\n\
|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &(index, case) in &results.cases_run() {
        if case.backend == crate::cluster::Backend::None {
            continue;
        }
        let mut points: Vec<&Point> = results
            .points
            .iter()
            .filter(|p| p.axis == Axis::Sessions && p.measurement.case == index)
            .collect();
        points.sort_by_key(|p| p.value);
        let Some(base) = points.first().copied() else {
            continue;
        };
        let disk = |p: &Point| p.store_disk.map(|(disk, _)| disk);
        for p in points.iter().skip(1) {
            let added = p.value - base.value;
            let growth = |now: u64, then: u64| per_session(now.saturating_sub(then), added);
            let _ = writeln!(
                md,
                "| {} {} | {} | {} | {} | {} | {} | {} | {} |",
                case.id,
                case.label,
                thousands(p.value as f64),
                mib(p.rss),
                per_session(p.rss, p.value),
                growth(p.rss, base.rss),
                disk(p).map_or(String::new(), mib),
                disk(p).map_or(String::new(), |d| per_session(d, p.value)),
                disk(p)
                    .zip(disk(base))
                    .map_or(String::new(), |(now, then)| growth(now, then)),
            );
        }
    }
    md
}

/// Server CPU per request against session size and against number of sessions, one line per case.
pub(crate) fn svg(results: &ScalingResults) -> String {
    let panel = |axis: Axis, title: &str, x_title: &str| {
        let mut cases: Vec<usize> = results
            .points
            .iter()
            .filter(|p| p.axis == axis)
            .map(|p| p.measurement.case)
            .collect();
        cases.sort_unstable();
        cases.dedup();
        let series: Vec<Series> = cases
            .iter()
            .map(|&case| {
                let mut points: Vec<(f64, f64)> = results
                    .points
                    .iter()
                    .filter(|p| p.axis == axis && p.measurement.case == case)
                    .map(|p| {
                        let m = &p.measurement;
                        (p.value as f64, m.cpu_app_us + m.cpu_aux_us)
                    })
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    label: format!("{} {}", CASES[case].id, CASES[case].label),
                    color: chart::COLORS[case % chart::COLORS.len()],
                    points,
                }
            })
            .collect();
        let mut values: Vec<usize> = results
            .points
            .iter()
            .filter(|p| p.axis == axis)
            .map(|p| p.value)
            .collect();
        values.sort_unstable();
        values.dedup();
        let x_ticks = values
            .into_iter()
            .map(|value| {
                let label = match axis {
                    Axis::Size => size_label(value),
                    Axis::Sessions => thousands(value as f64),
                };
                (value as f64, label)
            })
            .collect();
        Panel {
            title: title.to_owned(),
            x_title: x_title.to_owned(),
            series,
            x_ticks,
        }
    };
    chart::lines(
        &format!(
            "Server CPU µs per request (lower is better): read-modify-write counter, 1 process, wrk -t{} -c{}, {} CPUs",
            results.cli.threads, results.cli.connections, results.machine.nproc
        ),
        &[
            panel(
                Axis::Size,
                "by session size",
                "payload in each session (log scale)",
            ),
            panel(
                Axis::Sessions,
                "by number of stored sessions (small sessions)",
                "sessions stored and visited at random (log scale)",
            ),
        ],
    )
}
