//! Run: `cargo run --release --manifest-path bench/Cargo.toml --bin bench-runner` (add `--quick`
//! for a ~3 minute smoke run).
//!
//! The HTTP benchmark in one command: builds `bench-server` in release mode, and for every case
//! (bare axum, mmap-session, tower-sessions with its memory, Redis and SQLite stores; 1 process, or
//! 3 behind nginx) starts the servers (and nginx, and redis-server) in a temporary directory on
//! free ports, creates the sessions through HTTP, drives each workload with wrk, reads the
//! server-side CPU time from /proc, counts lost updates on one hot session, and stops everything
//! it started (also on error and on Ctrl-C). Writes `bench/results/results.md`,
//! `bench/results/results.json` and `bench/results/chart.svg`, and (full runs) the "HTTP
//! comparison" section of BENCHMARKS.md.

mod chart;
mod cluster;
mod http;
mod procs;
mod report;
mod scaling;
mod wrk;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde::Serialize;

use cluster::{Backend, Cluster, Tools};

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    about = "Benchmarks mmap-session against bare axum and tower-sessions over HTTP with wrk"
)]
pub(crate) struct Cli {
    /// A ~3 minute smoke run: shorter runs and fewer sessions (BENCHMARKS.md is left alone).
    #[arg(long)]
    quick: bool,
    /// Seconds of each measured run (default 4, or 3 with --quick).
    #[arg(long)]
    duration: Option<u64>,
    /// Measured runs per case and workload, interleaved across the cases; the median is
    /// reported (default 3, or 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds of the warm-up before each measured run (default 2, or 1 with --quick).
    #[arg(long)]
    warmup: Option<u64>,
    /// Seconds of the lost-update run (64 connections incrementing one session).
    #[arg(long, default_value_t = 5)]
    lost_duration: u64,
    /// Distinct small sessions created before the runs (default 100000, or 10000 with --quick).
    #[arg(long)]
    sessions: Option<usize>,
    /// Distinct 16 KiB sessions for the large-session workload (default 1000, or 200 with --quick).
    #[arg(long)]
    large_sessions: Option<usize>,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// nginx `worker_processes` for the 3-process cases.
    #[arg(long, default_value_t = 2)]
    nginx_workers: u32,
    /// Only the cases whose ids are listed (e.g. `--cases 1a,2,4`); all by default.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    #[arg(long, default_value = "/usr/bin/wrk")]
    wrk: PathBuf,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_server: PathBuf,
    /// Where results.md, results.json and chart.svg go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// The BENCHMARKS.md whose "HTTP comparison" section a full run rewrites.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"))]
    benchmarks_md: PathBuf,
    /// Do not touch BENCHMARKS.md.
    #[arg(long)]
    no_benchmarks_md: bool,
    /// Run the scaling benchmark instead (cost per request by session size and by number of
    /// sessions; cases 1a, 2 and 4 unless `--cases` says otherwise). Writes `scaling.md`,
    /// `scaling.json` and `scaling.svg`; BENCHMARKS.md is left alone.
    #[arg(long)]
    scaling: bool,
    /// `--scaling`: the session payloads, in bytes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,1024,4096,16384,65536"
    )]
    scale_sizes: Vec<usize>,
    /// `--scaling`: distinct sessions for the size sweep.
    #[arg(long, default_value_t = 1000)]
    scale_size_sessions: usize,
    /// `--scaling`: the numbers of stored sessions (small sessions), created one after the other
    /// in the same servers.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    scale_counts: Vec<usize>,
}

impl Cli {
    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration.unwrap_or(if self.quick { 3 } else { 4 }))
    }
    fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }
    fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup.unwrap_or(if self.quick { 1 } else { 2 }))
    }
    fn sessions(&self) -> usize {
        self.sessions
            .unwrap_or(if self.quick { 10_000 } else { 100_000 })
    }
    fn large_sessions(&self) -> usize {
        self.large_sessions
            .unwrap_or(if self.quick { 200 } else { 1_000 })
    }
}

/// One configuration of the servers.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Case {
    pub(crate) id: &'static str,
    pub(crate) label: &'static str,
    pub(crate) backend: Backend,
    pub(crate) processes: usize,
}

/// The session payload of the large-session workload.
const LARGE_BYTES: usize = 16 * 1024;

pub(crate) const CASES: [Case; 11] = [
    Case {
        id: "1a",
        label: "bare axum, 1 process",
        backend: Backend::None,
        processes: 1,
    },
    Case {
        id: "1b",
        label: "bare axum, 3 processes + nginx",
        backend: Backend::None,
        processes: 3,
    },
    Case {
        id: "2",
        label: "mmap-session, 1 process",
        backend: Backend::Mmap,
        processes: 1,
    },
    Case {
        id: "3",
        label: "mmap-session, 3 processes + nginx",
        backend: Backend::Mmap,
        processes: 3,
    },
    Case {
        id: "3m",
        label: "mmap-session with a Prometheus exporter installed, 3 processes + nginx",
        backend: Backend::MmapMetrics,
        processes: 3,
    },
    Case {
        id: "4",
        label: "tower-sessions 0.15 MemoryStore, 1 process",
        backend: Backend::TsMemory,
        processes: 1,
    },
    Case {
        id: "5",
        label: "tower-sessions 0.14 + Redis (fred), 3 processes + nginx",
        backend: Backend::TsRedis,
        processes: 3,
    },
    Case {
        id: "6",
        label: "tower-sessions 0.14 + SQLite (sqlx, WAL), 3 processes + nginx",
        backend: Backend::TsSqlite,
        processes: 3,
    },
    Case {
        id: "7",
        label: "mmap-session + its Redis backend, 3 processes + nginx",
        backend: Backend::MmapRedis,
        processes: 3,
    },
    Case {
        id: "8",
        label: "tower-sessions 0.15 + mmap-session file store (adapter), 3 processes + nginx",
        backend: Backend::TsMmap,
        processes: 3,
    },
    Case {
        id: "9",
        label: "tower-sessions 0.15 + adapter + its LeaseLayer, 3 processes + nginx",
        backend: Backend::TsMmapLease,
        processes: 3,
    },
];

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Workload {
    Peek,
    Counter,
    Hot,
    New,
    Large,
}

pub(crate) const WORKLOADS: [Workload; 5] = [
    Workload::Counter,
    Workload::Peek,
    Workload::Hot,
    Workload::New,
    Workload::Large,
];

impl Workload {
    pub(crate) fn title(self, sessions: usize, large: usize) -> String {
        match self {
            Self::Peek => format!("read-only (`GET /peek`), {sessions} distinct small sessions"),
            Self::Counter => {
                format!("read-modify-write counter (`GET /`), {sessions} distinct small sessions")
            }
            Self::Hot => {
                "read-modify-write counter, one hot session shared by every connection".into()
            }
            Self::New => "a new session on every request (`GET /` without a cookie)".into(),
            Self::Large => {
                format!("read-modify-write counter, {large} distinct 16 KiB sessions")
            }
        }
    }

    pub(crate) fn short(self) -> &'static str {
        match self {
            Self::Peek => "peek (read-only)",
            Self::Counter => "counter (RMW)",
            Self::Hot => "counter, 1 hot session",
            Self::New => "new session each request",
            Self::Large => "counter, 16 KiB session",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Measurement {
    pub(crate) case: usize,
    pub(crate) workload: Workload,
    /// The round with the median req/s.
    pub(crate) wrk: wrk::WrkResult,
    /// req/s of every round, lowest first.
    pub(crate) rounds_rps: Vec<f64>,
    /// Server-side CPU time per request, µs: the application processes.
    pub(crate) cpu_app_us: f64,
    /// The same for nginx and redis-server.
    pub(crate) cpu_aux_us: f64,
}

/// One measured run.
struct Sample {
    wrk: wrk::WrkResult,
    app_ticks: u64,
    aux_ticks: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct LostUpdates {
    pub(crate) case: usize,
    /// Success responses wrk counted.
    pub(crate) ok: u64,
    pub(crate) status_errors: u64,
    /// Increments the session shows afterwards.
    pub(crate) applied: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu: String,
    pub(crate) kernel: String,
    pub(crate) rustc: String,
    pub(crate) date: String,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) nginx: String,
    pub(crate) redis: String,
    pub(crate) wrk: String,
    pub(crate) minutes: f64,
    /// The project's commit the servers were built from.
    pub(crate) commit: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Results {
    pub(crate) cli: Cli,
    pub(crate) command: String,
    pub(crate) duration_s: u64,
    pub(crate) rounds: u32,
    pub(crate) warmup_s: u64,
    pub(crate) sessions: usize,
    pub(crate) large_sessions: usize,
    pub(crate) cases: Vec<Case>,
    pub(crate) measurements: Vec<Measurement>,
    pub(crate) lost: Vec<LostUpdates>,
    pub(crate) machine: Machine,
}

/// A case whose servers are running, with the cookies of its sessions.
struct Running {
    index: usize,
    case: Case,
    cluster: Cluster,
    /// Distinct sessions, one cookie a line.
    many: PathBuf,
    /// One session.
    hot: PathBuf,
}

struct Bench<'a> {
    cli: &'a Cli,
    wrk: wrk::Wrk,
    tools: Tools,
    scratch: &'a Path,
    started: Instant,
    ticks: f64,
    measurements: Vec<Measurement>,
    lost: Vec<LostUpdates>,
}

impl Bench<'_> {
    fn log(&self, message: &str) {
        eprintln!("[{:>5.0}s] {message}", self.started.elapsed().as_secs_f64());
    }

    /// Warm-up, then one measured wrk run with the server-side CPU time around it.
    /// One measured wrk run (after a warm-up when `warm_up`), with the server-side CPU time around
    /// it.
    fn sample(&mut self, run: &mut Running, workload: Workload, warm_up: bool) -> Result<Sample> {
        let cookies = match workload {
            Workload::Hot => Some(run.hot.clone()),
            Workload::New => None,
            Workload::Peek | Workload::Counter | Workload::Large => Some(run.many.clone()),
        };
        let cookies = cookies.as_deref();
        let cluster = &mut run.cluster;
        let path = if workload == Workload::Peek {
            "/peek"
        } else {
            "/"
        };
        let url = format!("http://{}{path}", cluster.address);
        if warm_up && !self.cli.warmup().is_zero() {
            self.wrk.run(&url, self.cli.warmup(), cookies)?;
        }
        let pids = cluster.pids();
        let app_before = total_ticks(&pids.app)?;
        let aux_before = total_ticks(&pids.aux)?;
        let wrk = self.wrk.run(&url, self.cli.duration(), cookies)?;
        let app_ticks = total_ticks(&pids.app)?.saturating_sub(app_before);
        let aux_ticks = total_ticks(&pids.aux)?.saturating_sub(aux_before);
        cluster.check_alive()?;
        let cpu = (app_ticks + aux_ticks) as f64 * 1e6 / self.ticks / wrk.requests.max(1) as f64;
        self.log(&format!(
            "  {:<3} {:<26} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  cpu {cpu:>6.1} µs/req  errors {}",
            run.case.id,
            workload.short(),
            wrk.requests_per_second(),
            wrk.p50_us as f64 / 1000.0,
            wrk.p99_us as f64 / 1000.0,
            wrk.status_errors + wrk.socket_errors,
        ));
        Ok(Sample {
            wrk,
            app_ticks,
            aux_ticks,
        })
    }

    /// Runs `workload` against every case, round after round (a warm-up before each case's
    /// first round), and keeps for each case the round with the median req/s; CPU per request is
    /// over all rounds.
    fn run_workload(&mut self, running: &mut [Running], workload: Workload) -> Result<()> {
        let mut samples: Vec<Vec<Sample>> = running.iter().map(|_| Vec::new()).collect();
        for round in 0..self.cli.rounds() {
            self.log(&format!(
                "workload: {}, round {}/{}",
                workload.short(),
                round + 1,
                self.cli.rounds()
            ));
            for (run, samples) in running.iter_mut().zip(&mut samples) {
                samples.push(self.sample(run, workload, round == 0)?);
            }
        }
        for (run, mut samples) in running.iter().zip(samples) {
            let requests: u64 = samples.iter().map(|s| s.wrk.requests).sum();
            let per_request = |ticks: u64| ticks as f64 * 1e6 / self.ticks / requests.max(1) as f64;
            let cpu_app_us = per_request(samples.iter().map(|s| s.app_ticks).sum());
            let cpu_aux_us = per_request(samples.iter().map(|s| s.aux_ticks).sum());
            samples.sort_by(|a, b| {
                a.wrk
                    .requests_per_second()
                    .total_cmp(&b.wrk.requests_per_second())
            });
            let rounds_rps = samples
                .iter()
                .map(|s| s.wrk.requests_per_second())
                .collect();
            let median = samples.swap_remove(samples.len() / 2);
            self.measurements.push(Measurement {
                case: run.index,
                workload,
                wrk: median.wrk,
                rounds_rps,
                cpu_app_us,
                cpu_aux_us,
            });
        }
        Ok(())
    }

    /// Sessions for a run, written to the file `name`.
    fn cookies(
        &self,
        backend: Backend,
        cluster: &Cluster,
        count: usize,
        name: &str,
    ) -> Result<PathBuf> {
        let cookies = new_cookies(backend, cluster, 0, count)?;
        self.write_cookies(name, &cookies)
    }

    /// Writes `cookies` to the file `name` in the scratch directory, one a line, for wrk.
    fn write_cookies(&self, name: &str, cookies: &[String]) -> Result<PathBuf> {
        let path = self.scratch.join(name);
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for cookie in cookies {
            writeln!(file, "{cookie}")?;
        }
        file.flush()?;
        Ok(path)
    }

    /// Starts every case's servers for one workload family (`workload` names its files; with
    /// `payload`, new sessions get a string of that many bytes) and creates their sessions.
    fn start_all(
        &self,
        cases: &[(usize, &Case)],
        workload: &str,
        payload: Option<usize>,
        sessions: usize,
    ) -> Result<Vec<Running>> {
        let mut running = Vec::new();
        for &(index, case) in cases {
            let cluster = Cluster::start(&self.tools, case.backend, case.processes, payload)
                .with_context(|| format!("case {}: {}", case.id, case.label))?;
            let started = Instant::now();
            let many = self.cookies(
                case.backend,
                &cluster,
                sessions,
                &format!("{workload}-{}.txt", case.id),
            )?;
            let hot = self.cookies(
                case.backend,
                &cluster,
                1,
                &format!("{workload}-hot-{}.txt", case.id),
            )?;
            self.log(&format!(
                "case {} ({}): started, {} sessions created in {:.1}s",
                case.id,
                case.label,
                sessions + 1,
                started.elapsed().as_secs_f64()
            ));
            running.push(Running {
                index,
                case: case.clone(),
                cluster,
                many,
                hot,
            });
        }
        Ok(running)
    }

    /// Every case's servers run side by side (idle ones cost nothing), and each workload is run
    /// against every case back to back, so that a change of load on the machine shifts a
    /// workload's cases together instead of skewing the ratios.
    fn run_all(&mut self, cases: &[(usize, &Case)]) -> Result<()> {
        let mut running = self.start_all(cases, "small", None, self.cli.sessions())?;
        for workload in [Workload::Counter, Workload::Peek, Workload::Hot] {
            self.run_workload(&mut running, workload)?;
        }
        self.log("lost updates");
        for run in &mut running {
            if run.case.backend != Backend::None {
                let hot = run.hot.clone();
                self.lost_updates(run, &hot)?;
            }
        }
        self.run_workload(&mut running, Workload::New)?;
        stop(running);

        let mut running =
            self.start_all(cases, "large", Some(LARGE_BYTES), self.cli.large_sessions())?;
        self.run_workload(&mut running, Workload::Large)?;
        stop(running);
        Ok(())
    }

    /// 64 connections increment one session for a few seconds: increments applied vs successes.
    fn lost_updates(&mut self, run: &mut Running, hot: &Path) -> Result<()> {
        let case = run.index;
        let cluster = &mut run.cluster;
        let cookie = std::fs::read_to_string(hot)?;
        let cookie = cookie.trim();
        let before = http::peek(cluster.address, cookie)?;
        let url = format!("http://{}/", cluster.address);
        let result = self
            .wrk
            .run(&url, Duration::from_secs(self.cli.lost_duration), Some(hot))?;
        // Let requests still in flight when wrk stopped finish before reading the count.
        std::thread::sleep(Duration::from_secs(1));
        cluster.check_alive()?;
        let after = http::peek(cluster.address, cookie)?;
        let lost = LostUpdates {
            case,
            ok: result.ok(),
            status_errors: result.status_errors,
            applied: after.saturating_sub(before),
        };
        self.log(&format!(
            "  {:<3} lost updates: {} successes, {} applied, {} lost",
            run.case.id,
            lost.ok,
            lost.applied,
            lost.ok as i64 - lost.applied as i64
        ));
        self.lost.push(lost);
        Ok(())
    }
}

/// Stops every case at once (each waits for its own processes when dropped).
fn stop(mut running: Vec<Running>) {
    for run in &mut running {
        run.cluster.terminate();
    }
    for run in running {
        let started = Instant::now();
        let id = run.case.id;
        drop(run);
        if started.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "stopping case {id} took {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Sessions number `first..first + count` of a case: created through HTTP, or (bare axum, which
/// has none) cookies of the same shape, so that every case receives the same requests.
fn new_cookies(
    backend: Backend,
    cluster: &Cluster,
    first: usize,
    count: usize,
) -> Result<Vec<String>> {
    let cookies = if backend == Backend::None {
        (first..first + count).map(fake_cookie).collect()
    } else {
        http::create_sessions(cluster.address, count, 8)?
    };
    if cookies.len() != count {
        bail!("created {} sessions instead of {count}", cookies.len());
    }
    Ok(cookies)
}

fn fake_cookie(index: usize) -> String {
    format!("session=bare{index:018}")
}

fn total_ticks(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&pid| procs::cpu_ticks(pid)).sum()
}

/// Builds `bench-server` in release mode and returns the path of the binary.
fn build_server() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--bin", "bench-server"])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("building bench-server failed");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "bench-server")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the bench-server executable")
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_else(|error| format!("unknown ({error})"))
}

/// `abc1234`, with a note when crates/ had uncommitted changes at the time of the run.
fn project_commit() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = command_output("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", root, "status", "--porcelain", "--", "crates"])
        .output()
        .is_ok_and(|output| !output.stdout.is_empty());
    if dirty {
        format!("{commit} (with uncommitted changes in crates/)")
    } else {
        commit
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The machine and the run, read at the end of a run that began at `started`.
fn machine(cli: &Cli, load_before: String, started: Instant) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, usize::from),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rustc: command_output("rustc", &["--version"]),
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        load_before,
        load_after: load(),
        nginx: command_output(&cli.nginx.to_string_lossy(), &["-v"]),
        redis: command_output(&cli.redis_server.to_string_lossy(), &["--version"]),
        wrk: command_output(&cli.wrk.to_string_lossy(), &["-v"]),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        commit: project_commit(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    procs::install_interrupt_handler()?;
    for tool in [&cli.wrk, &cli.nginx, &cli.redis_server] {
        if !tool.exists() {
            bail!("{} is not installed", tool.display());
        }
    }
    let wanted: Vec<&str> = match (cli.cases.is_empty(), cli.scaling) {
        (false, _) => cli.cases.iter().map(String::as_str).collect(),
        (true, true) => scaling::DEFAULT_CASES.to_vec(),
        (true, false) => CASES.iter().map(|case| case.id).collect(),
    };
    let cases: Vec<(usize, &Case)> = CASES
        .iter()
        .enumerate()
        .filter(|(_, case)| wanted.contains(&case.id))
        .collect();
    if cases.is_empty() {
        bail!("no case matches {:?}", cli.cases);
    }

    eprintln!("building bench-server (release)");
    let server = build_server()?;
    let load_before = load();
    let scratch = procs::TempDir::new("httpbench-runner-")?;
    let mut bench = Bench {
        cli: &cli,
        wrk: wrk::Wrk::new(&cli.wrk, scratch.path(), cli.threads, cli.connections)?,
        tools: Tools {
            server,
            nginx: cli.nginx.clone(),
            redis: cli.redis_server.clone(),
            nginx_workers: cli.nginx_workers,
        },
        scratch: scratch.path(),
        started: Instant::now(),
        ticks: procs::ticks_per_second() as f64,
        measurements: Vec::new(),
        lost: Vec::new(),
    };
    bench.log(&format!(
        "{} cases, {} rounds of {}s runs after {}s warm-up, wrk -t{} -c{}; load {load_before}",
        cases.len(),
        cli.rounds(),
        cli.duration().as_secs(),
        cli.warmup().as_secs(),
        cli.threads,
        cli.connections
    ));
    if cli.scaling {
        return scaling::run(&mut bench, &cases, &cli, load_before);
    }
    bench.run_all(&cases)?;

    let results = Results {
        command: if cli.quick {
            "cargo run --release --manifest-path bench/Cargo.toml --bin bench-runner -- --quick"
                .into()
        } else {
            "cargo run --release --manifest-path bench/Cargo.toml --bin bench-runner".into()
        },
        duration_s: cli.duration().as_secs(),
        rounds: cli.rounds(),
        warmup_s: cli.warmup().as_secs(),
        sessions: cli.sessions(),
        large_sessions: cli.large_sessions(),
        cases: CASES.to_vec(),
        measurements: bench.measurements.clone(),
        lost: bench.lost.clone(),
        machine: machine(&cli, load_before, bench.started),
        cli: cli.clone(),
    };
    std::fs::create_dir_all(&cli.out)?;
    let markdown = report::markdown(&results, "chart.svg");
    std::fs::write(cli.out.join("results.md"), &markdown)?;
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(cli.out.join("chart.svg"), chart::svg(&results))?;
    eprintln!(
        "wrote {}/results.md, results.json, chart.svg",
        cli.out.display()
    );
    if !cli.quick && !cli.no_benchmarks_md && cli.cases.is_empty() {
        let section = report::markdown(&results, "bench/results/chart.svg");
        report::update_benchmarks_md(&cli.benchmarks_md, &section)?;
        eprintln!("updated {}", cli.benchmarks_md.display());
    }
    println!("{markdown}");
    Ok(())
}
