//! One case's servers: 1 or 3 `bench-server` processes, nginx in front of 3, redis-server for the
//! Redis case; all in a temporary directory of their own, all stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::procs::{self, Proc, TempDir};

#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) enum Backend {
    None,
    Mmap,
    /// `Mmap` with a Prometheus recorder installed (`bench-server --metrics prometheus`).
    MmapMetrics,
    TsMemory,
    TsRedis,
    TsSqlite,
    MmapRedis,
    TsMmap,
    TsMmapLease,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Mmap | Self::MmapMetrics => "mmap",
            Self::TsMemory => "ts-memory",
            Self::TsRedis => "ts-redis",
            Self::TsSqlite => "ts-sqlite",
            Self::MmapRedis => "mmap-redis",
            Self::TsMmap => "ts-mmap",
            Self::TsMmapLease => "ts-mmap-lease",
        }
    }
}

/// What the runner needs to start a case.
pub(crate) struct Tools {
    pub(crate) server: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) redis: PathBuf,
    pub(crate) nginx_workers: u32,
}

/// Processes whose CPU time counts as server-side.
pub(crate) struct Pids {
    /// The application servers.
    pub(crate) app: Vec<u32>,
    /// nginx (master and workers) and redis-server.
    pub(crate) aux: Vec<u32>,
}

pub(crate) struct Cluster {
    // Dropped in this order: the proxy first, then the servers, then what they use, then the
    // directory their files are in.
    nginx: Option<Proc>,
    servers: Vec<Proc>,
    redis: Option<Proc>,
    _dir: TempDir,
    /// Where wrk and the session-creating client connect.
    pub(crate) address: SocketAddr,
    /// mmap-session's store file (absent for the other backends).
    pub(crate) store: PathBuf,
}

const READY: Duration = Duration::from_secs(30);

impl Cluster {
    /// Starts the servers; with `payload`, each new session also gets a string of that many
    /// bytes (`--workload large --large-bytes`).
    pub(crate) fn start(
        tools: &Tools,
        backend: Backend,
        processes: usize,
        payload: Option<usize>,
    ) -> Result<Self> {
        let dir = TempDir::new("httpbench-")?;
        let root = dir.path().to_path_buf();
        let mut cluster = Self {
            nginx: None,
            servers: Vec::new(),
            redis: None,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: root.join("sessions"),
            _dir: dir,
        };

        let redis_url = if matches!(backend, Backend::TsRedis | Backend::MmapRedis) {
            let port = procs::free_port()?;
            let mut command = Command::new(&tools.redis);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&root);
            let mut redis = Proc::spawn("redis-server", command, &root.join("redis.log"))?;
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            redis.wait_ready(READY, || redis_ping(address))?;
            cluster.redis = Some(redis);
            Some(format!("redis://127.0.0.1:{port}"))
        } else {
            None
        };

        let mut ports = Vec::new();
        for index in 0..processes {
            let port = procs::free_port()?;
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            let mut command = Command::new(&tools.server);
            command.args(["--backend", backend.flag()]);
            match payload {
                Some(bytes) => command
                    .args(["--workload", "large", "--large-bytes"])
                    .arg(bytes.to_string()),
                None => command.args(["--workload", "small"]),
            };
            command
                .arg("--listen")
                .arg(address.to_string())
                .arg("--store")
                .arg(&cluster.store)
                .arg("--sqlite-path")
                .arg(root.join("sessions.sqlite"));
            if let Some(url) = &redis_url {
                command.args(["--redis-url", url]);
            }
            if backend == Backend::MmapMetrics {
                command.args(["--metrics", "prometheus"]);
            }
            let mut server = Proc::spawn(
                &format!("bench-server {} #{index}", backend.flag()),
                command,
                &root.join(format!("server-{index}.log")),
            )?;
            // One at a time: the first SQLite server creates and migrates the database alone.
            server.wait_ready(READY, || health(address))?;
            cluster.servers.push(server);
            ports.push(port);
            cluster.address = address;
        }

        if processes > 1 {
            let port = procs::free_port()?;
            let conf = write_nginx_conf(&root, port, &ports, tools.nginx_workers)?;
            let mut command = Command::new(&tools.nginx);
            command
                .arg("-p")
                .arg(&root)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(root.join("nginx-error.log"));
            let mut nginx = Proc::spawn("nginx", command, &root.join("nginx.out"))?;
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            nginx.wait_ready(READY, || health(address))?;
            cluster.nginx = Some(nginx);
            cluster.address = address;
        }
        Ok(cluster)
    }

    /// Fails if any process of the case has died.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for server in &mut self.servers {
            server.check_alive()?;
        }
        if let Some(nginx) = &mut self.nginx {
            nginx.check_alive()?;
        }
        if let Some(redis) = &mut self.redis {
            redis.check_alive()?;
        }
        Ok(())
    }

    pub(crate) fn pids(&self) -> Pids {
        let mut aux = Vec::new();
        if let Some(nginx) = &self.nginx {
            aux.push(nginx.pid());
            aux.extend(procs::children_of(nginx.pid()));
        }
        if let Some(redis) = &self.redis {
            aux.push(redis.pid());
        }
        Pids {
            app: self.servers.iter().map(Proc::pid).collect(),
            aux,
        }
    }
}

impl Cluster {
    /// Asks every process of the case to stop, proxy first, without waiting.
    pub(crate) fn terminate(&mut self) {
        self.nginx.iter_mut().for_each(Proc::terminate);
        self.servers.iter_mut().for_each(Proc::terminate);
        self.redis.iter_mut().for_each(Proc::terminate);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate();
        self.nginx = None;
        self.servers.clear();
        self.redis = None;
    }
}

fn health(address: SocketAddr) -> bool {
    procs::can_connect(address)
        && crate::http::Client::new(address)
            .get("/health", None)
            .is_ok_and(|response| response.status == 200)
}

fn redis_ping(address: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200))
    else {
        return false;
    };
    let mut answer = [0u8; 7];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// nginx as the current user, in the foreground, with a private prefix; round robin over the
/// servers with kept-alive upstream connections.
fn write_nginx_conf(root: &Path, port: u16, upstreams: &[u16], workers: u32) -> Result<PathBuf> {
    let user = if nix::unistd::geteuid().is_root() {
        // As root, nginx would otherwise switch its workers to `nobody`.
        "user root;\n"
    } else {
        ""
    };
    let servers: String = upstreams
        .iter()
        .map(|port| format!("        server 127.0.0.1:{port};\n"))
        .collect();
    let root = root.display();
    let conf = format!(
        "# Written by bench-runner.
{user}daemon off;
master_process on;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    upstream app {{
{servers}        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    );
    let path = std::path::PathBuf::from(format!("{root}/nginx.conf"));
    std::fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
