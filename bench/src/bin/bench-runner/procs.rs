//! The processes the runner starts: each in a process group of its own, stopped by a guard when it
//! goes out of scope (also on error), and listed in a registry so that Ctrl-C stops them too.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Process groups started and not yet stopped, and temporary directories not yet removed: what the
/// Ctrl-C handler cleans up.
static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    groups: Vec::new(),
    dirs: Vec::new(),
});

struct Registry {
    groups: Vec<i32>,
    dirs: Vec<PathBuf>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// On Ctrl-C or SIGTERM: stop every process group still running, remove the temporary
/// directories, exit.
pub(crate) fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping everything the runner started");
        let (groups, dirs) = {
            let registry = registry();
            (registry.groups.clone(), registry.dirs.clone())
        };
        for &group in &groups {
            let _ = killpg(Pid::from_raw(group), Signal::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(500));
        for &group in &groups {
            let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
        }
        for dir in &dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")
}

/// A temporary directory that the Ctrl-C handler also removes.
pub(crate) struct TempDir {
    dir: Option<tempfile::TempDir>,
}

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("cannot create a temporary directory")?;
        registry().dirs.push(dir.path().to_path_buf());
        Ok(Self { dir: Some(dir) })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |dir| dir.path())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            registry().dirs.retain(|registered| *registered != path);
            drop(dir);
        }
    }
}

/// A running child process (and its process group), stopped on drop: SIGTERM, then SIGKILL after
/// a grace period.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `command` in a new process group, stdout and stderr to `log`.
    pub(crate) fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut registry = registry();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        if let Ok(pid) = i32::try_from(child.id()) {
            registry.groups.push(pid);
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, with the end of its log.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits until `ready` says yes, failing if the process exits or `timeout` passes.
    pub(crate) fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; end of its log:\n{}",
                    self.name,
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Proc {
    /// Asks the process group to stop without waiting (drop waits), so that many stop at once.
    pub(crate) fn terminate(&mut self) {
        if let Ok(raw) = i32::try_from(self.child.id()) {
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = killpg(Pid::from_raw(raw), Signal::SIGTERM);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Ok(raw) = i32::try_from(self.child.id()) else {
            return;
        };
        let group = Pid::from_raw(raw);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = killpg(group, Signal::SIGTERM);
            let started = Instant::now();
            let deadline = started + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if started.elapsed() > Duration::from_secs(1) {
                eprintln!(
                    "{} took {:.1}s to stop after SIGTERM",
                    self.name,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        // Whatever is left of the group (nginx workers, a stuck server) goes now.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
        registry().groups.retain(|&registered| registered != raw);
    }
}

/// The last `lines` lines of a file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A port free on 127.0.0.1 right now.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn can_connect(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
}

/// Server-side CPU time (user + system) of a process and all its threads, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let fields = stat_fields(&stat)?;
    let field = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse::<u64>().ok())
            .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
    };
    // After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    Ok(field(14 - 3)? + field(15 - 3)?)
}

/// Resident memory of a process from `/proc/<pid>/status`, in bytes: all of it (`VmRSS`) and the
/// part that is file-backed (`RssFile`: for mmap-session, the pages of the store file it mapped).
pub(crate) fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((kib("VmRSS")?, kib("RssFile")?))
}

/// The fields of a /proc stat line after the parenthesised command name.
fn stat_fields(stat: &str) -> Result<Vec<&str>> {
    let after = stat
        .rfind(')')
        .map(|index| &stat[index + 1..])
        .context("unexpected /proc stat format")?;
    Ok(after.split_whitespace().collect())
}

/// Children of `parent` (nginx's workers), found by scanning /proc.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    stat_fields(&stat)
                        .ok()?
                        .get(1)
                        .and_then(|ppid| ppid.parse::<u32>().ok())
                })
                == Some(parent)
        })
        .collect()
}

/// Clock ticks per second of the times in /proc/<pid>/stat.
pub(crate) fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}
