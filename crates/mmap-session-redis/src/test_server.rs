//! A throwaway `redis-server` for tests (feature `test-server`): started on a free port in a
//! temporary directory of its own, with persistence off, and killed when dropped.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);
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
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut server = Self { child, port, dir };
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

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Sends one command (inline form) and returns the raw reply, for tests that look at what is
    /// stored.
    ///
    /// # Errors
    ///
    /// Any I/O error talking to the server.
    pub fn raw_command(&self, command: &str) -> std::io::Result<Vec<u8>> {
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

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
