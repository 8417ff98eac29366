//! What the end-to-end tests share: finding the example binaries, free ports, child processes that
//! are killed whatever happens, nginx in front of them, and an HTTP client that carries a cookie by
//! hand (so that many clients can share one).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::fs::{self, File};
use std::future::Future;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mmap_session_redis::test_server::RedisServer;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;

/// How long a process may take to answer `/health` after being started.
pub(crate) const STARTUP: Duration = Duration::from_secs(30);
/// Gap between two polls of a condition that has a deadline.
const POLL: Duration = Duration::from_millis(20);

/// Runs a test body with a bound on its running time.
pub(crate) async fn bounded<F: Future>(limit: Duration, body: F) -> F::Output {
    match tokio::time::timeout(limit, body).await {
        Ok(output) => output,
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// Path of an example binary that cargo built next to this test binary.
///
/// Test binaries live in `target/<profile>/deps/`, examples in `target/<profile>/examples/`; plain
/// `cargo test` builds the examples before it runs the tests.
pub(crate) fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    let advice = "run the tests with plain `cargo test` (which builds the examples first; a test \
                  filter such as `--test cluster` skips that), or `cargo build --examples` with the \
                  same profile first";
    let built = fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|_| panic!("example binary {} is missing: {advice}", path.display()));
    // A stale binary would test yesterday's code: refuse it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let own_source = format!("examples/{name}.rs");
    let sources = [
        own_source.as_str(),
        "examples/common",
        "crates/mmap-session/src",
        "crates/mmap-session-store/src",
        "crates/mmap-session-redis/src",
    ];
    for source in sources {
        let source = root.join(source);
        let newest = if source.is_dir() {
            newest_file(&source)
        } else {
            modified(&source).map(|time| (source, time))
        };
        if let Some((source, changed)) = newest {
            assert!(
                changed <= built,
                "example binary {} is older than {}: {advice}",
                path.display(),
                source.display()
            );
        }
    }
    path
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

/// The most recently modified Rust source file under `dir`, recursively.
fn newest_file(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            modified(&path).map(|time| (path, time))
        } else {
            None
        };
        if let Some((path, time)) = candidate {
            if newest.as_ref().is_none_or(|(_, best)| time > *best) {
                newest = Some((path, time));
            }
        }
    }
    newest
}

/// A program that must be installed for the end-to-end tests (`tests/run.sh` installs it): the
/// path in `$env` if set, else `path_or_name` (a name is looked for in PATH and the sbin
/// directories).
pub(crate) fn required_program(env: &str, path_or_name: &str, debian_package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "${env} is {}, which is not a file",
            path.display()
        );
        return path;
    }
    let found = if path_or_name.contains('/') {
        Some(PathBuf::from(path_or_name)).filter(|path| path.is_file())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .map(|dir| dir.join(path_or_name))
                .find(|path| path.is_file())
        })
    };
    found.unwrap_or_else(|| {
        panic!(
            "`{path_or_name}` is required by this end-to-end test and was not found (nor set in \
             ${env}): run tests/run.sh, which installs it, or install it yourself (Debian: \
             `apt-get install {debian_package}`)"
        )
    })
}

/// A TCP port that was free a moment ago (the kernel picked it for a socket that is closed again).
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A child process that is killed when the guard is dropped, panics included. Its stdout and stderr
/// go to a log file, whose end is printed when a test fails.
pub(crate) struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Kill the whole process group (the child was made the leader of a new one).
    group: bool,
    /// On drop, first ask the process to stop with SIGTERM and give it this long, so that it can
    /// stop and reap its own children (nginx's workers).
    grace: Option<Duration>,
}

impl Proc {
    /// Starts `command` with its output sent to `log`.
    pub(crate) fn spawn(name: impl Into<String>, mut command: Command, log: PathBuf) -> Self {
        Self::spawn_inner(name.into(), &mut command, log, false)
    }

    /// Starts `command` as the leader of a new process group, so that dropping the guard also kills
    /// whatever it started (nginx's workers, chromedriver's browser).
    pub(crate) fn spawn_group(name: impl Into<String>, mut command: Command, log: PathBuf) -> Self {
        use std::os::unix::process::CommandExt as _;
        command.process_group(0);
        Self::spawn_inner(name.into(), &mut command, log, true)
    }

    fn spawn_inner(name: String, command: &mut Command, log: PathBuf, group: bool) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create the log file");
        let err = out.try_clone().expect("clone the log file");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Self {
            name,
            child,
            log,
            group,
            grace: None,
        }
    }

    /// On drop, SIGTERM the process and wait up to `grace` before killing what is left.
    pub(crate) fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `Some(status)` if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGSTOP (the process alone, not its group), and waits up to `limit` until the kernel shows
    /// it stopped. False if it did not stop in time (or is gone).
    pub(crate) async fn suspend(&self, limit: Duration) -> bool {
        self.signal_process(Signal::SIGSTOP);
        let deadline = Instant::now() + limit;
        loop {
            if process_state(self.child.id()).is_some_and(|state| state == 'T' || state == 't') {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGCONT (the process alone).
    pub(crate) fn resume(&self) {
        self.signal_process(Signal::SIGCONT);
    }

    fn signal_process(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // An error means the process is already gone.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }

    fn signal(&self, signal: Signal) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        let pid = Pid::from_raw(pid);
        // An error means the process (group) is already gone, which is what we want anyway.
        let _ = if self.group {
            nix::sys::signal::killpg(pid, signal)
        } else {
            nix::sys::signal::kill(pid, signal)
        };
    }

    /// SIGKILL, and reap it. A group leader takes its process group and every descendant with it
    /// (a browser started by chromedriver may sit in a process group of its own).
    pub(crate) fn kill(&mut self) {
        if self.group {
            for pid in descendants(self.child.id()) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
            self.signal(Signal::SIGKILL);
        } else if self.exited().is_none() {
            self.signal(Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `limit` for the process to exit and returns how it exited.
    pub(crate) async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?} of SIGTERM\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of the process's log.
    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log, 4000)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}), end of {} -----\n{}",
                self.name,
                self.child.id(),
                self.log.display(),
                self.log_tail()
            );
        }
        if let Some(grace) = self.grace {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.kill();
    }
}

/// Every live descendant of process `root`, from `/proc`.
fn descendants(root: u32) -> Vec<Pid> {
    let mut parents = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        index += 1;
    }
    found
        .into_iter()
        .skip(1)
        .filter_map(|pid| i32::try_from(pid).ok().map(Pid::from_raw))
        .collect()
}

/// The state letter of process `pid` in `/proc/<pid>/stat` (`R`, `S`, `T` stopped, `Z`...).
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The last `bytes` bytes of a file, as text.
pub(crate) fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

/// An HTTP client that follows no redirect, uses no proxy and gives up on a request after a while.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build the HTTP client")
}

/// Polls `url` until it answers `200 ok`, `process` exits (a failure) or `limit` passes.
pub(crate) async fn wait_healthy(client: &reqwest::Client, url: &str, process: &mut Proc) {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(response) = client.get(url).send().await {
            if response.status() == StatusCode::OK {
                assert!(
                    response.headers().get(SET_COOKIE).is_none(),
                    "/health set a cookie"
                );
                if response.text().await.ok().as_deref() == Some("ok") {
                    return;
                }
            }
        }
        if let Some(status) = process.exited() {
            panic!(
                "{} exited ({status}) before answering {url}\n{}",
                process.name(),
                process.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer {url} within {STARTUP:?}\n{}",
            process.name(),
            process.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The nginx configuration template shipped with the demo.
const NGINX_TEMPLATE: &str = include_str!("../../examples/nginx/nginx.conf.template");

/// nginx in front of some upstream ports (round robin), run as the current user with its own prefix
/// directory, config, pid file and logs.
pub(crate) struct Nginx {
    pub(crate) port: u16,
    process: Proc,
}

impl Nginx {
    pub(crate) fn start(dir: &Path, upstream_ports: &[u16]) -> Self {
        Self::start_with(dir, upstream_ports, "")
    }

    /// Like [`Nginx::start`], with extra directives in the proxying `location` (e.g.
    /// `proxy_next_upstream off;`).
    pub(crate) fn start_with(
        dir: &Path,
        upstream_ports: &[u16],
        location_directives: &str,
    ) -> Self {
        let nginx = required_program("NGINX", "nginx", "nginx");
        let prefix = dir.join("nginx");
        fs::create_dir_all(&prefix).expect("create the nginx prefix directory");
        let port = free_port();
        let config = render_nginx_config(NGINX_TEMPLATE, &prefix, port, upstream_ports);
        let config = with_location_directives(&config, location_directives);
        let config_path = prefix.join("nginx.conf");
        fs::write(&config_path, config).expect("write nginx.conf");
        let mut command = Command::new(nginx);
        command
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(prefix.join("error.log"));
        let process = Proc::spawn_group("nginx", command, prefix.join("error.log"))
            .with_grace(Duration::from_secs(3));
        Self { port, process }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until nginx answers `/health` (through an upstream that is up).
    pub(crate) async fn wait_ready(&mut self, client: &reqwest::Client) {
        let url = format!("{}/health", self.url());
        wait_healthy(client, &url, &mut self.process).await;
    }
}

/// Fills in the `@...@` placeholders of the template.
pub(crate) fn render_nginx_config(
    template: &str,
    prefix: &Path,
    listen_port: u16,
    upstream_ports: &[u16],
) -> String {
    // The `user` directive only matters when the master runs as root; then the workers stay root
    // too, so that they can use the private (mode 0700) prefix directory.
    let root = nix::unistd::geteuid().is_root();
    let servers: String = upstream_ports
        .iter()
        .map(|port| format!("        server 127.0.0.1:{port} max_fails=0;\n"))
        .collect();
    template
        .replace("@USER@", if root { "user root;" } else { "" })
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@LISTEN@", &format!("127.0.0.1:{listen_port}"))
        .replace("@SERVERS@", &servers)
}

/// Adds `directives` right after the `proxy_pass` line of a rendered configuration.
pub(crate) fn with_location_directives(config: &str, directives: &str) -> String {
    if directives.is_empty() {
        return config.to_owned();
    }
    const ANCHOR: &str = "proxy_pass http://app;";
    assert!(
        config.matches(ANCHOR).count() == 1,
        "the nginx template no longer has exactly one `{ANCHOR}` line"
    );
    config.replace(ANCHOR, &format!("{ANCHOR}\n            {directives}"))
}

/// The `name=value` part of a `Set-Cookie` for the session cookie, if the response sets it.
pub(crate) fn session_set_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with("session="))
        .map(str::to_owned)
}

/// A parsed reply of the counter example.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    /// `count` and `pid` of a 200 answer.
    pub(crate) count: Option<(u64, u32)>,
    /// The full `Set-Cookie` for the session, if any.
    pub(crate) set_cookie: Option<String>,
    /// The `Retry-After` header, if any.
    pub(crate) retry_after: Option<String>,
}

/// Sends `method path` with `cookie` (a `name=value` pair) and parses the counter's JSON answer.
pub(crate) async fn counter_request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    cookie: Option<&str>,
) -> Result<Reply, reqwest::Error> {
    let mut request = client.request(method, url);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await?;
    let status = response.status();
    let set_cookie = session_set_cookie(&response);
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await?;
    let count = if status == StatusCode::OK {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|json| {
                let count = json.get("count")?.as_u64()?;
                let pid = u32::try_from(json.get("pid")?.as_u64()?).ok()?;
                Some((count, pid))
            })
    } else {
        None
    };
    Ok(Reply {
        status,
        count,
        set_cookie,
        retry_after,
    })
}

/// The `name=value` pair of a `Set-Cookie` header.
pub(crate) fn cookie_pair(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// True if a `Set-Cookie` header tells the client to drop the cookie.
pub(crate) fn is_removal(set_cookie: &str) -> bool {
    let value_empty = cookie_pair(set_cookie).ends_with('=');
    let lower = set_cookie.to_ascii_lowercase();
    value_empty || lower.contains("max-age=0") || lower.contains("expires=thu, 01 jan 1970")
}

/// Cheap pseudo-random numbers for choosing when to kill (printed, so a failure can be repeated
/// in spirit): xorshift seeded from the clock.
pub(crate) struct Chance(u64);

impl Chance {
    pub(crate) fn from_clock() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        Self((nanos as u64) | 1)
    }

    /// A generator seeded with `seed` (e.g. one drawn from another generator).
    pub(crate) fn from_seed(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(crate) fn seed(&self) -> u64 {
        self.0
    }

    /// A number in `low..high`.
    pub(crate) fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + self.0 % (high - low).max(1)
    }
}

/// Where the copies of a [`Cluster`] keep their sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sessions {
    /// One session file in the cluster's directory (`--store`).
    File,
    /// A redis-server that the cluster starts for itself on a free port (`--redis`).
    Redis,
}

/// Several copies of one example server sharing one session file (or one Redis), behind nginx, in
/// a temporary directory of their own. Dropping it kills every process it started.
pub(crate) struct Cluster {
    pub(crate) client: reqwest::Client,
    pub(crate) nginx: Nginx,
    servers: Vec<Option<Proc>>,
    ports: Vec<u16>,
    example: PathBuf,
    store: PathBuf,
    redis: Option<RedisServer>,
    extra_args: Vec<String>,
    starts: usize,
    // Last: removed after every process above has been killed.
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    /// A failed test keeps its directory (the session file, nginx's and every process's log,
    /// killed ones included) for a post-mortem, and says where it is.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "kept the failed cluster's files in {}",
                self.dir.path().display()
            );
        }
    }
}

impl Cluster {
    /// Starts `copies` copies of the example `name` (with `--insecure-cookies` and `extra_args`)
    /// and nginx in front of them, and waits until all answer.
    pub(crate) async fn start(name: &str, copies: usize, extra_args: &[&str]) -> Self {
        Self::start_on(Sessions::File, name, copies, extra_args).await
    }

    /// Like [`Cluster::start`], with the sessions where `sessions` says.
    pub(crate) async fn start_on(
        sessions: Sessions,
        name: &str,
        copies: usize,
        extra_args: &[&str],
    ) -> Self {
        Self::launch(sessions, name, copies, extra_args, "", |_| {}).await
    }

    /// Like [`Cluster::start`], with extra directives for nginx's proxying `location` (see
    /// [`Nginx::start_with`]) and a `prepare` step that gets the session file's path before any
    /// process starts (to create the file with options of the test's choosing).
    pub(crate) async fn start_with(
        name: &str,
        copies: usize,
        extra_args: &[&str],
        nginx_directives: &str,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        Self::launch(
            Sessions::File,
            name,
            copies,
            extra_args,
            nginx_directives,
            prepare,
        )
        .await
    }

    async fn launch(
        sessions: Sessions,
        name: &str,
        copies: usize,
        extra_args: &[&str],
        nginx_directives: &str,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        let example = example(name);
        let redis = (sessions == Sessions::Redis)
            .then(|| RedisServer::start().unwrap_or_else(|error| panic!("{error}")));
        let dir = tempfile::tempdir().expect("create a temporary directory");
        prepare(&dir.path().join("sessions"));
        let ports: Vec<u16> = (0..copies).map(|_| free_port()).collect();
        let nginx = Nginx::start_with(dir.path(), &ports, nginx_directives);
        let mut cluster = Self {
            client: http_client(),
            nginx,
            servers: (0..copies).map(|_| None).collect(),
            ports,
            example,
            store: dir.path().join("sessions"),
            redis,
            extra_args: extra_args.iter().map(|&arg| arg.to_owned()).collect(),
            starts: 0,
            dir,
        };
        for index in 0..copies {
            cluster.spawn(index);
        }
        for index in 0..copies {
            cluster.wait_healthy(index).await;
        }
        cluster.nginx.wait_ready(&cluster.client).await;
        cluster
    }

    fn spawn(&mut self, index: usize) {
        self.starts += 1;
        let name = format!(
            "{}-{index}-start{}",
            self.example
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            self.starts
        );
        let mut command = Command::new(&self.example);
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.ports[index]));
        match &self.redis {
            Some(redis) => command.arg("--redis").arg(redis.url()),
            None => command.arg("--store").arg(&self.store),
        };
        command
            .arg("--insecure-cookies")
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let log = self.dir.path().join(format!("{name}.log"));
        self.servers[index] = Some(Proc::spawn(name, command, log));
    }

    async fn wait_healthy(&mut self, index: usize) {
        let url = format!("http://127.0.0.1:{}/health", self.ports[index]);
        let process = self.servers[index]
            .as_mut()
            .expect("the server was started");
        wait_healthy(&self.client, &url, process).await;
    }

    /// URL of `path` through nginx.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.nginx.url())
    }

    /// URL of `path` on copy `index` directly, bypassing nginx.
    pub(crate) fn server_url(&self, index: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[index])
    }

    /// Pids of the running copies.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.servers.iter().flatten().map(Proc::pid).collect()
    }

    pub(crate) fn copies(&self) -> usize {
        self.servers.len()
    }

    /// The running copy `index`, if it is running (not killed, not stopped by `stop_all`).
    pub(crate) fn server(&mut self, index: usize) -> Option<&mut Proc> {
        self.servers[index].as_mut()
    }

    /// Kills copy `index` with SIGKILL.
    pub(crate) fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.servers[index].take() {
            process.kill();
        }
    }

    /// Starts copy `index` again (after [`Cluster::kill`] or [`Cluster::stop_all`]) and waits until
    /// it answers.
    pub(crate) async fn restart(&mut self, index: usize) {
        assert!(self.servers[index].is_none(), "copy {index} is running");
        self.spawn(index);
        self.wait_healthy(index).await;
    }

    /// Stops every copy with SIGTERM and checks that each exits cleanly (graceful shutdown).
    pub(crate) async fn stop_all(&mut self) {
        for slot in &mut self.servers {
            if let Some(mut process) = slot.take() {
                let status = process.terminate(Duration::from_secs(20)).await;
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM\n{}",
                    process.name(),
                    process.log_tail()
                );
            }
        }
    }

    /// Restarts every stopped copy.
    pub(crate) async fn restart_all(&mut self) {
        for index in 0..self.servers.len() {
            if self.servers[index].is_none() {
                self.spawn(index);
            }
        }
        for index in 0..self.servers.len() {
            self.wait_healthy(index).await;
        }
    }

    /// How many lines of all the server logs so far (dead processes' included) contain `needle`.
    pub(crate) fn log_lines_containing(&self, needle: &str) -> usize {
        let Ok(entries) = fs::read_dir(self.dir.path()) else {
            return 0;
        };
        entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
            .filter_map(|path| fs::read_to_string(path).ok())
            .map(|text| text.lines().filter(|line| line.contains(needle)).count())
            .sum()
    }

    /// The shared session file (unused when the sessions are in Redis).
    pub(crate) fn store_path(&self) -> &Path {
        &self.store
    }

    /// The Redis server holding the sessions, if they are in Redis.
    pub(crate) fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}
