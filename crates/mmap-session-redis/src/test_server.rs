//! A throwaway `redis-server` for tests (feature `test-server`): started on a free port in a
//! temporary directory of its own, with persistence off, and killed when dropped; or a throwaway
//! local Redis Cluster of such servers ([`RedisServer::start_cluster`]).
//!
//! With `MMAP_SESSION_TEST_REDIS=cluster` in the environment, [`RedisServer::start`] starts a
//! cluster of 3 primaries instead of one server, so that every test suite that uses it (the
//! layer's route tests, the multi-process tests) runs on a cluster unchanged.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);
/// How long a cluster may take to be created and agree on its state.
const CLUSTER_STARTUP: Duration = Duration::from_secs(60);
/// How many free ports are tried (another process may take the port between probe and bind).
const ATTEMPTS: usize = 5;

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestServerError {
    /// `redis-server` is not installed.
    #[error(
        "`redis-server` was not found (looked for $REDIS_SERVER, then in PATH); install it \
         (Debian: `apt-get install redis-server`)"
    )]
    NotInstalled,
    /// Starting it, or preparing its directory, failed.
    #[error("cannot start redis-server: {0}")]
    Io(#[from] std::io::Error),
    /// `redis-cli` (which creates a cluster) is not installed.
    #[error(
        "`redis-cli` was not found (looked for $REDIS_CLI, then in PATH); install it \
         (Debian: `apt-get install redis-tools`)"
    )]
    NoCli,
    /// The cluster's nodes did not agree on a working cluster in time.
    #[error("the Redis Cluster did not come up within {CLUSTER_STARTUP:?}: {0}")]
    ClusterNotReady(String),
    /// It did not answer `PING` in time.
    #[error(
        "redis-server did not answer PING within {STARTUP:?} on {ATTEMPTS} ports; its log: {log}"
    )]
    NotReady {
        /// The end of the server's log.
        log: String,
    },
}

/// A running `redis-server`, killed (and its directory removed) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    /// The cluster's other nodes, when this is the first node of a cluster.
    others: Vec<RedisServer>,
    // Last: removed after the server is gone.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1 and waits until it answers `PING`.
    ///
    /// # Errors
    ///
    /// [`TestServerError`] if it is not installed or does not come up.
    pub fn start() -> Result<Self, TestServerError> {
        if std::env::var_os("MMAP_SESSION_TEST_REDIS").is_some_and(|kind| kind == "cluster") {
            return Self::start_cluster(3, 0);
        }
        Self::start_node(&[])
    }

    /// Starts a local Redis Cluster of `primaries` primaries with `replicas` replicas each, every
    /// node on free ports (its own and its cluster bus port) in a directory of its own, creates
    /// it with `redis-cli --cluster create`, and waits until every node says the cluster is ok
    /// and every replica is in sync. The value is the first node; [`RedisServer::url`] names
    /// them all (`redis-cluster://…`). Nodes time out (fail over) after 1 s.
    ///
    /// # Errors
    ///
    /// [`TestServerError`] if `redis-server` or `redis-cli` is missing or the cluster does not
    /// come up.
    pub fn start_cluster(primaries: usize, replicas: usize) -> Result<Self, TestServerError> {
        Self::start_cluster_with(primaries, replicas, &[])
    }

    /// [`RedisServer::start_cluster`], every node started with the `redis-server` options `extra`
    /// as well (`["--cluster-require-full-coverage", "no"]`).
    ///
    /// # Errors
    ///
    /// As [`RedisServer::start_cluster`].
    pub fn start_cluster_with(
        primaries: usize,
        replicas: usize,
        extra: &[&str],
    ) -> Result<Self, TestServerError> {
        let cli = cli_program().ok_or(TestServerError::NoCli)?;
        let count = primaries * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let bus = free_port()?.to_string();
            let mut options = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                &bus,
            ];
            options.extend_from_slice(extra);
            nodes.push(Self::start_node(&options)?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !created.status.success() {
            return Err(TestServerError::ClusterNotReady(
                String::from_utf8_lossy(&created.stdout).into_owned(),
            ));
        }
        let mut nodes = nodes.into_iter();
        let Some(mut first) = nodes.next() else {
            return Err(TestServerError::ClusterNotReady("no nodes".to_owned()));
        };
        first.others = nodes.collect();
        first.wait_cluster_ready(count)?;
        Ok(first)
    }

    /// Waits until every node sees `count` nodes and a cluster in state ok, and every replica's
    /// link to its primary is up.
    fn wait_cluster_ready(&self, count: usize) -> Result<(), TestServerError> {
        let deadline = Instant::now() + CLUSTER_STARTUP;
        let known = format!("cluster_known_nodes:{count}");
        let mut last = String::new();
        loop {
            let ready = self.nodes().all(|node| {
                let info = node.text("CLUSTER INFO");
                let replication = node.text("INFO replication");
                last = format!("{info}\n{replication}");
                info.contains("cluster_state:ok")
                    && info.contains(&known)
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestServerError::ClusterNotReady(last));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// This server and, for a cluster, every other node.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisServer> {
        std::iter::once(self).chain(self.others.iter())
    }

    /// Whether this is the first node of a cluster.
    pub fn is_cluster(&self) -> bool {
        !self.others.is_empty()
    }

    /// The node's reply to `command` as text (empty if it cannot be had).
    fn text(&self, command: &str) -> String {
        self.raw_node_command(command)
            .map(|reply| String::from_utf8_lossy(&reply).into_owned())
            .unwrap_or_default()
    }

    fn start_node(extra: &[&str]) -> Result<Self, TestServerError> {
        let program = program().ok_or(TestServerError::NotInstalled)?;
        let mut log = String::new();
        for _ in 0..ATTEMPTS {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let log_path = dir.path().join("redis.log");
            let child = Command::new(&program)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log_path)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut server = Self {
                child,
                port,
                others: Vec::new(),
                dir,
            };
            if server.wait_ready() {
                return Ok(server);
            }
            log = std::fs::read_to_string(&log_path).unwrap_or_default();
            server.stop();
        }
        Err(TestServerError::NotReady { log })
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`; for a cluster,
    /// `redis-cluster://127.0.0.1:<port>?node=127.0.0.1:<port>&…` with every node.
    pub fn url(&self) -> String {
        if !self.is_cluster() {
            return format!("redis://127.0.0.1:{}", self.port);
        }
        let others: Vec<String> = self
            .others
            .iter()
            .map(|node| format!("node=127.0.0.1:{}", node.port))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.port,
            others.join("&")
        )
    }

    /// The server's working directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Sends one command (inline form) and returns the raw reply, for tests that look at what is
    /// stored. On a cluster it goes to every primary, and array replies (`KEYS`) are joined into
    /// one; any other reply is the first node's.
    ///
    /// # Errors
    ///
    /// Any I/O error talking to the server.
    pub fn raw_command(&self, command: &str) -> std::io::Result<Vec<u8>> {
        if !self.is_cluster() {
            return self.raw_node_command(command);
        }
        let mut count = 0usize;
        let mut items = Vec::new();
        for node in self.nodes() {
            if !node.text("ROLE").contains("master") {
                continue;
            }
            let reply = node.raw_node_command(command)?;
            let header_end = reply.windows(2).position(|pair| pair == b"\r\n");
            let parsed = header_end.and_then(|end| {
                let header = std::str::from_utf8(reply.get(1..end)?).ok()?;
                (reply.first() == Some(&b'*')).then(|| header.parse::<usize>().ok())?
            });
            match (parsed, header_end) {
                (Some(n), Some(end)) => {
                    count += n;
                    items.extend_from_slice(&reply[end + 2..]);
                }
                _ => return self.raw_node_command(command),
            }
        }
        let mut joined = format!("*{count}\r\n").into_bytes();
        joined.extend_from_slice(&items);
        Ok(joined)
    }

    /// [`RedisServer::raw_command`] on this node only.
    pub fn raw_node_command(&self, command: &str) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\r\n").as_bytes())?;
        // Enough for the small replies tests ask for: read until the server pauses.
        let mut reply = Vec::new();
        let mut buffer = [0u8; 64 << 10];
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buffer[..n]),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(error) => return Err(error),
            }
        }
        Ok(reply)
    }

    /// Sends one command (inline form) to this node only and returns its one reply, read to its
    /// end as RESP says (a line, a bulk string or an array of those), without waiting for the
    /// server to pause as [`RedisServer::raw_node_command`] does: for tests that poll a node
    /// (`INFO replication`) and time what they see.
    ///
    /// # Errors
    ///
    /// Any I/O error talking to the node, or a reply that is not RESP (`InvalidData`).
    pub fn query(&self, command: &str) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\r\n").as_bytes())?;
        let mut reader = std::io::BufReader::new(stream);
        let mut reply = Vec::new();
        read_reply(&mut reader, &mut reply)?;
        Ok(reply)
    }

    /// Kills the node of the cluster (this one or another) that listens on `port` with SIGKILL, as
    /// a crash would, and reaps it. Its directory is kept until `self` is dropped.
    ///
    /// # Errors
    ///
    /// `NotFound` if no node listens on `port`; any error killing or reaping it.
    pub fn kill_node(&mut self, port: u16) -> std::io::Result<()> {
        let node = if self.port == port {
            Some(self)
        } else {
            self.others.iter_mut().find(|node| node.port == port)
        };
        let node = node.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no node on port {port}"),
            )
        })?;
        // `Child::kill` sends SIGKILL on Unix.
        node.child.kill()?;
        node.child.wait()?;
        Ok(())
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The SHA-1 (hex) the backend sends with `EVALSHA` for its script `name` (`acquire`, `renew`,
/// `commit`, `remove`, `release`), for [`FaultProxy::on_script`](crate::fault_proxy::FaultProxy::on_script);
/// `None` for another name.
pub fn script_sha1(name: &str) -> Option<String> {
    crate::scripts::Scripts::new()
        .named(name)
        .map(|script| script.sha1().to_string())
}

/// Reads one RESP reply from `reader` into `reply`, as it came.
fn read_reply(reader: &mut impl std::io::BufRead, reply: &mut Vec<u8>) -> std::io::Result<()> {
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a RESP reply");
    let start = reply.len();
    if reader.read_until(b'\n', reply)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = reply.get(start..).ok_or_else(invalid)?;
    let kind = *line.first().ok_or_else(invalid)?;
    let count = || -> std::io::Result<i64> {
        std::str::from_utf8(line.get(1..).ok_or_else(invalid)?)
            .map_err(|_| invalid())?
            .trim_end()
            .parse()
            .map_err(|_| invalid())
    };
    match kind {
        b'+' | b'-' | b':' => Ok(()),
        b'$' => {
            let Ok(len) = usize::try_from(count()?) else {
                return Ok(()); // `$-1`: nil
            };
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            reply.extend_from_slice(&body);
            Ok(())
        }
        b'*' => {
            for _ in 0..count()?.max(0) {
                read_reply(reader, reply)?;
            }
            Ok(())
        }
        _ => Err(invalid()),
    }
}

fn program() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

fn cli_program() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_CLI") {
        return Some(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("redis-cli"))
        .find(|path| path.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
