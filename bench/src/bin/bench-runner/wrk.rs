//! Driving wrk: one Lua script for every run (cookies picked at random from a file, or none), and
//! a machine-readable summary line printed by the script's `done` hook.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

/// Every run goes through `request()`, with or without cookies, so that wrk's own cost per request
/// is the same in every case: one table look-up of a pre-formatted request.
const SCRIPT: &str = r#"-- Written by bench-runner.
-- Requests are formatted once, in init: formatting one per request (wrk.format) makes garbage,
-- and LuaJIT's collector then walks the 100,000-cookie table again and again, which halved wrk's
-- own rate on 2 cores and made the load generator the bottleneck.
local prepared = {}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end

function init(args)
  local file = args[1]
  if file ~= nil and file ~= "" then
    for line in io.lines(file) do
      if #line > 0 then prepared[#prepared + 1] = wrk.format(nil, nil, { Cookie = line }) end
    end
  end
  if #prepared == 0 then
    prepared[1] = wrk.format()
  end
  math.randomseed((seed or 1) * 7919 + os.time())
  for _ = 1, 10 do math.random() end
end

function request()
  return prepared[math.random(#prepared)]
end

function done(summary, latency, requests)
  io.write(string.format(
    "BENCH requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

pub(crate) struct Wrk {
    binary: PathBuf,
    script: PathBuf,
    threads: u32,
    connections: u32,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct WrkResult {
    pub(crate) requests: u64,
    pub(crate) duration_us: u64,
    /// Responses with a status of 400 or more.
    pub(crate) status_errors: u64,
    /// connect + read + write + timeout errors.
    pub(crate) socket_errors: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    /// wrk's own report (`--latency`), kept for the record.
    pub(crate) raw: String,
}

impl WrkResult {
    pub(crate) fn requests_per_second(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    /// Responses with a success status.
    pub(crate) fn ok(&self) -> u64 {
        self.requests.saturating_sub(self.status_errors)
    }
}

impl Wrk {
    pub(crate) fn new(binary: &Path, dir: &Path, threads: u32, connections: u32) -> Result<Self> {
        let script = dir.join("bench.lua");
        std::fs::write(&script, SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        Ok(Self {
            binary: binary.to_path_buf(),
            script,
            threads,
            connections,
        })
    }

    /// `wrk -t<threads> -c<connections> -d<duration> --latency` against `url`, each request with a
    /// cookie picked at random from `cookies` (a file, one `name=value` a line) when given.
    pub(crate) fn run(
        &self,
        url: &str,
        duration: Duration,
        cookies: Option<&Path>,
    ) -> Result<WrkResult> {
        let seconds = duration.as_secs().max(1);
        let mut command = Command::new(&self.binary);
        command
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{seconds}s"))
            .arg("--timeout")
            .arg("10s")
            .arg("--latency")
            .arg("-s")
            .arg(&self.script)
            .arg(url)
            .arg("--")
            .arg(cookies.map(Path::as_os_str).unwrap_or_default());
        let output = command
            .output()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "wrk failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        parse(&stdout)
    }
}

fn parse(stdout: &str) -> Result<WrkResult> {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("BENCH "))
        .with_context(|| format!("no summary line in wrk's output:\n{stdout}"))?;
    let field = |name: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse::<u64>().ok())
            .with_context(|| format!("no {name} in {line:?}"))
    };
    Ok(WrkResult {
        requests: field("requests")?,
        duration_us: field("duration_us")?,
        status_errors: field("status")?,
        socket_errors: field("connect")? + field("read")? + field("write")? + field("timeout")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        raw: stdout
            .lines()
            .filter(|line| !line.starts_with("BENCH "))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}
