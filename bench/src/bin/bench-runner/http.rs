//! A minimal HTTP/1.1 keep-alive client over `std::net`, enough to create sessions before a timed
//! run and to read a counter after one (the servers answer with `Content-Length` bodies).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

pub(crate) struct Response {
    pub(crate) status: u16,
    /// `name=value` of the `Set-Cookie` header, if any.
    pub(crate) cookie: Option<String>,
    pub(crate) body: Vec<u8>,
}

pub(crate) struct Client {
    address: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
}

impl Client {
    pub(crate) fn new(address: SocketAddr) -> Self {
        Self {
            address,
            reader: None,
        }
    }

    fn connection(&mut self) -> Result<&mut BufReader<TcpStream>> {
        if self.reader.is_none() {
            let stream = TcpStream::connect(self.address)
                .with_context(|| format!("cannot connect to {}", self.address))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.reader = Some(BufReader::new(stream));
        }
        self.reader.as_mut().context("no connection")
    }

    /// `GET path`, with `cookie` (`name=value`) when given. Retries once on a fresh connection
    /// when a kept-alive one turns out closed.
    pub(crate) fn get(&mut self, path: &str, cookie: Option<&str>) -> Result<Response> {
        match self.try_get(path, cookie) {
            Ok(response) => Ok(response),
            Err(_) => {
                self.reader = None;
                self.try_get(path, cookie)
            }
        }
    }

    fn try_get(&mut self, path: &str, cookie: Option<&str>) -> Result<Response> {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n");
        if let Some(cookie) = cookie {
            request.push_str(&format!("Cookie: {cookie}\r\n"));
        }
        request.push_str("\r\n");
        let reader = self.connection()?;
        reader.get_mut().write_all(request.as_bytes())?;

        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|status| status.parse::<u16>().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = 0usize;
        let mut cookie = None;
        let mut close = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse()?,
                "set-cookie" => {
                    cookie = value.split(';').next().map(str::to_owned);
                }
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "transfer-encoding" => bail!("chunked responses are not supported"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if close {
            self.reader = None;
        }
        Ok(Response {
            status,
            cookie,
            body,
        })
    }
}

/// Creates `count` sessions by requesting `/` without a cookie from `threads` connections, and
/// returns their cookies.
pub(crate) fn create_sessions(
    address: SocketAddr,
    count: usize,
    threads: usize,
) -> Result<Vec<String>> {
    let next = AtomicUsize::new(0);
    let cookies = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut client = Client::new(address);
                    let mut mine = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        let response = client.get("/", None)?;
                        if response.status != 200 {
                            bail!("creating a session: status {}", response.status);
                        }
                        mine.push(
                            response
                                .cookie
                                .context("creating a session: no Set-Cookie in the answer")?,
                        );
                    }
                    cookies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend(mine);
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(result) => result?,
                Err(_) => bail!("a session-creating thread panicked"),
            }
        }
        Ok(())
    })?;
    Ok(cookies
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// The session's counter as `/peek` reports it.
pub(crate) fn peek(address: SocketAddr, cookie: &str) -> Result<u64> {
    let response = Client::new(address).get("/peek", Some(cookie))?;
    if response.status != 200 {
        bail!("/peek answered {}", response.status);
    }
    let value: serde_json::Value = serde_json::from_slice(&response.body)?;
    value
        .get("count")
        .and_then(serde_json::Value::as_u64)
        .context("/peek: no count in the answer")
}
